"""`genserve bench MODEL --method decode --concurrency 1,2,4,...`: latency against genserve or Triton."""

from __future__ import annotations

import argparse

from genserve.clients.verbs import CommandError, Verb

from .connection import add_server_arguments, client_options, reports_server_errors


def numbers(kind):
    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(",") if v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model served by genserve (or exported into the Triton repository)")
    parser.add_argument("--method", choices=("sample", "decode", "encode", "score"), default="decode")
    parser.add_argument("--batch", type=int, default=1, help="images or latents per request")
    parser.add_argument("--concurrency", type=numbers(int), default=(1, 2, 4, 8, 16, 32, 64),
                        help="closed-loop levels to sweep, e.g. 1,2,4,8")
    parser.add_argument("--request-rate", type=numbers(float), default=(),
                        help="open-loop Poisson arrival rates (requests/s) instead, e.g. 50,100,200")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each level's windows")
    parser.add_argument("--window", type=float, default=2.0, help="seconds per measurement window")
    parser.add_argument("--stability", type=float, default=0.1,
                        help="the last 3 windows must agree within this fraction (throughput and p50)")
    parser.add_argument("--max-windows", type=int, default=10)
    parser.add_argument("--triton", metavar="URL", help="benchmark a Triton server (KServe v2 gRPC) instead")
    parser.add_argument("--csv", help="write perf_analyzer-style CSV here")
    parser.add_argument("--json", help="write the figures as JSON here")
    parser.add_argument("--plot", help="write a PNG of latency against throughput here")
    add_server_arguments(parser)


@reports_server_errors
def run(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from genserve.clients.bench import (
        BenchConfig,
        GenserveTarget,
        TritonTarget,
        format_table,
        run_bench,
        write_csv,
        write_json,
        write_plot,
    )

    config = BenchConfig(args.model, args.method, args.batch, args.concurrency, args.request_rate, args.warmup,
                         args.window, args.stability, args.max_windows)
    target_name = f"triton {args.triton}" if args.triton else f"genserve {args.server}"

    async def main():
        target = TritonTarget(args.triton) if args.triton else GenserveTarget(args.server, **client_options(args))
        return await run_bench(config, target)

    try:
        results = asyncio.run(main())
    except ImportError as error:
        raise CommandError(f"--triton needs tritonclient[grpc]: {error}") from None
    print(format_table(config, results))
    for path, write in ((args.csv, write_csv), (args.json, write_json), (args.plot, write_plot)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if write is write_csv:
                write(Path(path), config, results)
            else:
                write(Path(path), config, results, target_name)
    return 0


VERB = Verb(
    help="latency and throughput against a genserve or Triton server: concurrency sweep or Poisson rates",
    description="For each load level: a warm-up, then measurement windows until the last three agree within "
    "--stability (perf_analyzer's rule). Prints p50/p90/p95/p99 latency, throughput and errors per level; "
    "--csv, --json and --plot write them. --triton URL measures the same model's entry point on Triton.",
    add_arguments=add_arguments,
    run=run,
)
