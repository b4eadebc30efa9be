"""`genserve soak --duration 300 --concurrency 64 --pid PID`: mixed valid and invalid traffic, then a report."""

from __future__ import annotations

import argparse

from genserve.clients.verbs import CommandError, Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of a genserve server (plaintext)")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    parser.add_argument("--invalid-fraction", type=float, default=0.3, help="share of requests that are mistakes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--pid", type=int, action="append", default=[],
                        help="a process on this machine whose resident memory to report (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    import grpc

    from genserve.clients.soak import SoakConfig, run_soak

    try:
        config = SoakConfig(args.server, args.duration, args.concurrency, args.invalid_fraction, args.timeout,
                            tuple(args.pid), args.seed)
    except ValueError as error:
        raise CommandError(str(error)) from None
    try:
        report = asyncio.run(run_soak(config))
    except grpc.aio.AioRpcError as error:  # ListModels at the start: the server is not there
        raise CommandError(f"{error.code().name} from {args.server}: {error.details()}") from None
    print(report.table())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        report.write_json(Path(args.json))
    return 0 if report.passed else 1


VERB = Verb(
    help="mixed valid and invalid traffic for a duration: statuses, latency, and memory of the server",
    description="Workers send a mix of valid calls (every capability of every served model) and client "
    "mistakes (unknown model, over-limit counts, NaN temperature, wrong shapes, overflowing shapes, wrong "
    "byte lengths, bytes that are no message) for --duration seconds at --concurrency. Reports requests by "
    "status code and kind, p50/p99 latency of the valid ones, and the resident memory of each --pid at "
    "start, peak and end. Exits 1 if any request ended INTERNAL or UNKNOWN or a valid one was refused as a "
    "mistake (valid requests ending DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED are overload: reported, not failed).",
    add_arguments=add_arguments,
    run=run,
)
