"""`genserve export CHECKPOINT --repository DIR [--version N]`: a Triton model repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genserve.clients.verbs import Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="checkpoint folders or shipped names; 'shipped' exports every shipped checkpoint")
    parser.add_argument("--repository", default="model_repository", help="the Triton model repository to write into")
    parser.add_argument("--version", type=int, default=1, help="version folder to write (older ones are kept)")
    parser.add_argument(
        "--flavour", choices=("python", "native"), default="python",
        help="python: Python-backend models running ONNX Runtime (loads in the pip-installable Triton); "
        "native: backend onnxruntime/pytorch, for NVIDIA's GPU containers",
    )
    parser.add_argument("--native-backend", choices=("onnxruntime", "pytorch"), default="onnxruntime")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="Triton dynamic batching delay")
    parser.add_argument("--instances", type=int, default=1, help="model instances per Triton model")
    parser.add_argument("--instance-kind", choices=("KIND_CPU", "KIND_GPU", "KIND_AUTO"), default="KIND_CPU",
                        help="where Triton runs the entry points (KIND_GPU in NVIDIA's GPU containers); the "
                        "samplers' engine always runs on the CPU")
    sums = parser.add_mutually_exclusive_group()
    sums.add_argument("--check-sums", type=Path, metavar="FILE",
                      help="after exporting, compare every file of the repository with FILE (sha256sum format); "
                      "exit 1 naming each difference")
    sums.add_argument("--write-sums", type=Path, metavar="FILE",
                      help="after exporting, record every file's sha256 in FILE (after retraining a shipped model)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from genserve.export.checkpoint import load_checkpoint, shipped_names
    from genserve.export.repository import ExportOptions, check_sums, export_checkpoint, write_sums

    options = ExportOptions(
        version=args.version, flavour=args.flavour, native_backend=args.native_backend,
        max_batch_size=args.max_batch_size, max_queue_delay_microseconds=args.max_queue_delay_us,
        instance_count=args.instances, instance_kind=args.instance_kind,
    )
    names = [n for c in args.checkpoints for n in (shipped_names() if c == "shipped" else [c])]
    for name in tqdm(names, desc="export", unit="checkpoint"):
        for folder in export_checkpoint(load_checkpoint(name), args.repository, options):
            tqdm.write(f"  {folder}")
    repository = Path(args.repository)
    if args.write_sums:
        print(f"{args.write_sums}: {write_sums(repository, args.write_sums)} files")
    if args.check_sums:
        problems = check_sums(repository, args.check_sums)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        if problems:
            print(f"{repository} differs from {args.check_sums} in {len(problems)} files: the export is not the "
                  "shipped one (different checkpoints, genserve or torch?)", file=sys.stderr)
            return 1
        print(f"{repository} matches {args.check_sums}")
    return 0


VERB = Verb(
    help="export checkpoints to ONNX + TorchScript in a Triton model repository",
    description="Write one Triton model per entry point (config.pbtxt, genserve.json manifest with "
    "sha256 of every artifact, version folder with model.onnx, model.pt and, for the python flavour, "
    "model.py), plus an in-server sampling model per autoregressive checkpoint. `make setup` runs "
    "`genserve export shipped --check-sums model_repository/SHA256SUMS`.",
    add_arguments=add_arguments,
    run=run,
)
