"""`genserve bench-serve`: batching on vs off, gRPC overhead, embedded vs genserve→Triton vs Triton."""

from __future__ import annotations

import argparse

from genserve.clients.verbs import Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--model", default="vae_mnist", help="a model with a decode entry point")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton rows (no tritonserver needed)")
    parser.add_argument("--json", help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from genserve.serving.serve_bench import ServeBenchConfig, format_serve_report, run_serve_bench

    config = ServeBenchConfig(Path(args.repository), args.model, args.concurrency, args.duration, args.warmup,
                              with_triton=not args.no_triton)
    report = run_serve_bench(config)
    print(format_serve_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


VERB = Verb(
    help="measure the server: dynamic batching on/off, gRPC overhead, embedded vs Triton (one run, side by side)",
    description="Starts genserve servers (batching on, batching off, and one forwarding to a Triton server over "
    "the model's entry points) as child processes and drives batch-1 Decode requests at --concurrency, closed "
    "loop. Prints throughput and p50/p99 per configuration and the ratios between them.",
    add_arguments=add_arguments,
    run=run,
)
