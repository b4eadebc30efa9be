"""`genserve train-classifier`: the digit classifier behind `genserve evaluate --fid`."""

from __future__ import annotations

import argparse

from genserve.clients.verbs import Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="folder to write (default: the shipped classifier's, replacing it)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from genserve.export.quality.card import classifier_card, reference_distances
    from genserve.export.quality.classifier import (
        SHIPPED_CLASSIFIER,
        ClassifierConfig,
        save_classifier,
        train_classifier,
    )

    config = ClassifierConfig(epochs=args.epochs, seed=args.seed)
    model, figures = train_classifier(config, progress=not args.no_progress)
    figures["reference_fid"] = reference_distances(model)
    out = Path(args.out) if args.out else SHIPPED_CLASSIFIER
    save_classifier(out, model, config, figures)
    (out / "MODEL_CARD.md").write_text(classifier_card(config, figures))
    print(f"held-out accuracy {figures['held_out_accuracy_8bit']:.2%} (8-bit), "
          f"{figures['held_out_accuracy_binarised']:.2%} (binarised); wrote {out}")
    return 0


VERB = Verb(
    help="train the digit classifier whose features FID compares",
    description="Train the small digit classifier on mnist5k (8-bit and binarised images), report its "
    "held-out accuracy and reference distances, and write its weights and card.",
    add_arguments=add_arguments,
    run=run,
)
