"""`genserve triton --repository model_repository`: run the pip-installable Triton on loopback."""

from __future__ import annotations

import argparse

from genserve.clients.verbs import Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port (printed when ready)")
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port")
    parser.add_argument("--address", default="127.0.0.1", help="interface to bind (loopback by default)")


def run(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path

    from genserve.serving.tritonserver import TritonServer, TritonServerConfig

    config = TritonServerConfig(Path(args.repository), args.grpc_port, args.http_port, args.metrics_port, args.address)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # Block them so sigwait receives them: the server (its own session) is then always stopped.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with TritonServer(config) as server:  # a port given as 0 is chosen at start: server.config has it
        c = server.config
        print(f"tritonserver ready: gRPC {c.grpc_url}, HTTP {c.address}:{c.http_port}, "
              f"metrics {c.address}:{c.metrics_port}; Ctrl-C stops it", flush=True)
        try:
            signal.sigwait(stop_signals)
        finally:
            server.stop()
    return 0


VERB = Verb(
    help="run a real Triton Inference Server (nvidia-pytriton wheel) over a model repository",
    description="Start the tritonserver binary shipped in the nvidia-pytriton wheel with its Python "
    "backend, bound to --address, and wait until it is ready. On GPUs, NVIDIA's containers serve the "
    "same repository (export with --flavour native for their onnxruntime/pytorch backends).",
    add_arguments=add_arguments,
    run=run,
)
