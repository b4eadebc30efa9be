"""What every client verb shares: the --server options, and server failures as one-line errors."""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

from genserve.clients.verbs import CommandError

DEFAULT_SERVER = "127.0.0.1:50051"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--server", default=os.environ.get("GENSERVE_SERVER", DEFAULT_SERVER),
                       help="HOST:PORT of a genserve server ($GENSERVE_SERVER, else 127.0.0.1:50051)")
    group.add_argument("--timeout", type=float, default=300.0, help="seconds per call, retries included")
    group.add_argument("--retries", type=int, default=3, help="retries after UNAVAILABLE (only)")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca-cert", help="PEM file of the CA that signed the server's certificate (implies --tls)")
    group.add_argument("--token-file", help="file holding a bearer token sent with every call")


def client_options(args: argparse.Namespace) -> dict:
    """ClientConfig fields from the flags (for Client or AsyncClient)."""
    from pathlib import Path

    roots = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    return dict(timeout=args.timeout, retries=args.retries, tls=args.tls or roots is not None,
                root_certificates=roots, token=token)


def connect(args: argparse.Namespace):
    from genserve.clients import Client

    return Client(args.server, **client_options(args))


def reports_server_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turns a GenserveError into a one-line CommandError: `NOT_FOUND from 127.0.0.1:50051: ...`."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        from genserve.clients.errors import GenserveError

        try:
            return run(args)
        except GenserveError as error:
            raise CommandError(f"{error.code.name} from {args.server}: {error.message}") from None

    return wrapped
