"""`genserve serve --repository model_repository --port 50051`: the gRPC server."""

from __future__ import annotations

import argparse

from genserve.clients.verbs import CommandError, Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default="model_repository", help="the model repository to serve")
    parser.add_argument("--address", default="127.0.0.1", help="interface to bind (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, default=9095, help="Prometheus /metrics port; -1 disables it")
    parser.add_argument("--runtime", choices=("embedded", "triton"), default="embedded",
                        help="embedded: run models in this process; triton: forward to --triton-url")
    parser.add_argument("--triton-url", help="HOST:PORT of a Triton server's gRPC endpoint serving this repository")
    parser.add_argument("--backend", choices=("onnx", "torchscript"), default="onnx",
                        help="embedded runtime: which exported artifact runs")
    parser.add_argument("--device", default="cpu", help="embedded TorchScript and sampling steps: cpu or cuda")
    parser.add_argument("--no-fused", dest="fused", action="store_false",
                        help="embedded sampling: run the exported step graphs even where the fused operators are built")
    parser.add_argument("--call-budget-ms", type=float, default=4.0,
                        help="embedded fused CPU sampling: run as many rows per call as fit in about this many ms "
                        "(a sample arriving mid-call waits at most about this long to join); 0: one row per call")
    parser.add_argument("--max-batch-size", type=int, help="dynamic batcher: rows per batch (default: each manifest's)")
    parser.add_argument("--max-queue-delay-us", type=int,
                        help="dynamic batcher: longest wait for a batch to fill (default: each manifest's)")
    parser.add_argument("--no-batching", action="store_true", help="run every request alone (the baseline)")
    parser.add_argument("--max-samples-per-request", type=int, default=1024,
                        help="larger requests are refused RESOURCE_EXHAUSTED")
    parser.add_argument("--max-importance-work", type=int, default=65536,
                        help="a VAE Score's images x importance samples; more is refused RESOURCE_EXHAUSTED")
    parser.add_argument("--max-message-mb", type=int, default=64, help="largest gRPC message, either way")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get at shutdown")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--auth-token-file", help="a file holding a token that Generative calls must send as "
                        "'authorization: Bearer TOKEN' (health and reflection stay open)")


def config_from(args: argparse.Namespace):
    from pathlib import Path

    from genserve.serving.config import BatcherConfig, RuntimeConfig, ServerConfig

    return ServerConfig(
        repository=Path(args.repository), address=args.address, port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        max_samples_per_request=args.max_samples_per_request, max_importance_work=args.max_importance_work,
        grace_seconds=args.grace,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None, tls_key=Path(args.tls_key) if args.tls_key else None,
        auth_token=Path(args.auth_token_file).read_text().strip() if args.auth_token_file else None,
        runtime=RuntimeConfig(kind=args.runtime, backend=args.backend, device=args.device, fused=args.fused,
                              triton_url=args.triton_url, call_budget_ms=args.call_budget_ms),
        batcher=BatcherConfig(enabled=not args.no_batching, max_batch_size=args.max_batch_size,
                              max_queue_delay_us=args.max_queue_delay_us),
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from genserve.serving.errors import RequestError
    from genserve.serving.server import GenserveServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from(args)

    async def serve() -> None:
        server = GenserveServer(config)
        try:
            await server.start()
        except (OSError, RequestError) as error:  # a busy port, an unreachable Triton: one line, not a traceback
            await server.stop(0)
            raise CommandError(f"cannot start: {error}") from None
        metrics = f", metrics http://{config.address}:{server.metrics_port}/metrics" if server.metrics_port else ""
        print(f"genserve serving {len(server.registry.models)} models ({', '.join(server.registry.models)}) "
              f"on {server.address} with the {config.runtime.kind} runtime{metrics}; Ctrl-C stops it", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print(f"genserve: stopping; in-flight requests get {config.grace_seconds:g} s", flush=True)
        await server.stop()

    asyncio.run(serve())
    return 0


VERB = Verb(
    help="serve a model repository over gRPC (genserve.v1.Generative)",
    description="Serve every model in --repository: Sample, SampleStream, Encode, Decode, Score, ListModels and "
    "GetModel, plus gRPC health (one status per model) and reflection, and Prometheus metrics on "
    "--metrics-port. The embedded runtime runs ONNX Runtime / TorchScript and the sampling engine in this "
    "process; --runtime triton forwards to a Triton server (genserve triton) serving the same repository. "
    "SIGINT/SIGTERM stop it gracefully.",
    add_arguments=add_arguments,
    run=run,
)
