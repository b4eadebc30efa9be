"""`genserve train FAMILY --data mnist5k --epochs N --out DIR`."""

from __future__ import annotations

import argparse
import json

from genserve.clients.verbs import CommandError, Verb

FAMILY_NAMES = (
    "pixelcnn", "gated_pixelcnn", "pixelcnn_pp", "vae", "iaf_vae", "vae_gan", "aae", "pixel_vae", "dcgan", "realnvp",
    "flow_gan", "maf", "wavenet",
)


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs → a dict; values are JSON (numbers, null, strings without quotes)."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", choices=FAMILY_NAMES, help="model family to train")
    parser.add_argument("--out", required=True, help="checkpoint folder (resumes if it already holds one)")
    parser.add_argument(
        "--data", default="mnist5k", help="mnist5k, digits8, spoken_digits (audio), or a folder/.npz of your images"
    )
    parser.add_argument("--epochs", type=int, default=10, help="total epochs (a resumed run continues up to this)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--lr-decay", type=float, default=1.0, help="learning-rate multiplier per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a model config field, e.g. --set hidden_channels=64 --set num_classes=dataset",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from genserve.export.training import TrainConfig, train

    config = TrainConfig(
        family=args.family, out=args.out, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, lr_decay=args.lr_decay, seed=args.seed, model=parse_overrides(args.set),
    )
    train(config, progress=not args.no_progress)
    print(f"checkpoint: {args.out}")
    return 0


VERB = Verb(
    help="train a model family on a dataset, with resume",
    description="Train a model and write a safetensors checkpoint after every epoch. Re-running "
    "with the same --out resumes from the last completed epoch.",
    add_arguments=add_arguments,
    run=run,
)
