"""`genserve bench-sampler`: naive vs step graphs vs fused operators, continuous vs static batching, side by side.

See genserve.serving.engine.bench for what is measured and how. Prints a table; `--json
PATH` also writes the figures as JSON (`-` for stdout instead of the table).
"""

from __future__ import annotations

import argparse

from genserve.clients.verbs import CommandError, Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="gated_pixelcnn_mnist", help="checkpoint name in the repository")
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--runtime", choices=("onnx", "torchscript"), default="onnx")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda needs --runtime torchscript)")
    parser.add_argument("--batch", type=int, action="append",
                        help="batch sizes, ascending (default: 1, 16, 64; on a GPU also 256, 1024, 4096 and 16384, "
                             "up to the first that runs out of memory)")
    parser.add_argument("--naive-steps", type=int, default=28, help="naive pixels timed per batch, then scaled")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="each engine timing repeats whole batches for at least this long and takes the "
                             "median (a batch-1 image takes milliseconds on a CPU); 0: one batch")
    parser.add_argument("--slots", type=int, default=16, help="engine slots in the batching comparison")
    parser.add_argument("--requests", type=int, default=40, help="Poisson-arriving requests per batching mode")
    parser.add_argument("--max-request-size", type=int, default=4, help="requests ask for 1..this many samples")
    parser.add_argument("--load", type=float, default=0.5, help="arrival rate / static-batch capacity, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fused", dest="fused", action="store_false",
                        help="leave the fused operators out (timing and batching on the step graphs)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-': stdout only)")


# A GPU's figures grow with the batch well past a CPU's: the table goes on up to the largest batch that
# fits (an H200 held 16384 with room to spare; naive passes at that size are a few GB of activations).
GPU_BATCHES = (1, 16, 64, 256, 1024, 4096, 16384)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    import torch

    from genserve.serving.engine.bench import BenchConfig, format_report, run_benchmark

    if args.device != "cpu":
        if args.runtime != "torchscript":
            raise CommandError(f"--device {args.device} needs --runtime torchscript (the ONNX runner is CPU here)")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA device is visible to torch on this machine")
    config = BenchConfig(
        model=args.model, repository=args.repository, runtime=args.runtime, device=args.device,
        batches=tuple(args.batch or (GPU_BATCHES if args.device.startswith("cuda") else (1, 16, 64))),
        naive_steps=args.naive_steps, min_seconds=args.min_seconds, slots=args.slots,
        requests=args.requests, max_request_size=args.max_request_size, load=args.load, seed=args.seed,
        fused=args.fused,
    )
    to_stdout = args.json == "-"
    report = run_benchmark(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    if to_stdout:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


VERB = Verb(
    help="benchmark the sampling engine: naive vs step graphs vs fused operators, continuous vs static batching",
    add_arguments=add_arguments,
    run=run,
    description=__doc__,
)
