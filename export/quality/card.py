"""The digit classifier's card: its accuracy and the distances that give FID a scale."""

from __future__ import annotations

import json
from dataclasses import asdict

import torch

from ..data import EVAL_BINARISATION_SEED, load_dataset, quantise
from .classifier import ClassifierConfig, DigitClassifier
from .fid import features_of, frechet_distance

REFERENCE_SEED = 7


def reference_distances(classifier: DigitClassifier) -> dict[str, float]:
    """FID of held-out images against real training images (the floor) and against noise (a ceiling).

    Each set has as many images as the held-out split, so the floor includes the same
    finite-sample bias a model's FID against those images has.
    """
    dataset = load_dataset("mnist5k")
    held_out = dataset.held_out.images
    train = dataset.train.images[: len(held_out)]
    generator = torch.Generator().manual_seed(REFERENCE_SEED)
    distances = {}
    for levels in (256, 2):
        binarise = torch.Generator().manual_seed(EVAL_BINARISATION_SEED)
        reference = features_of(classifier, quantise(held_out, levels, binarise), levels)
        real = features_of(classifier, quantise(train, levels, binarise), levels)
        noise = features_of(classifier, torch.randint(0, levels, held_out.shape, generator=generator), levels)
        name = "8bit" if levels == 256 else "binarised"
        distances[f"train_vs_held_out_{name}"] = round(frechet_distance(real, reference), 3)
        distances[f"uniform_noise_vs_held_out_{name}"] = round(frechet_distance(noise, reference), 3)
    return distances


def classifier_card(config: ClassifierConfig, figures: dict) -> str:
    reference = figures["reference_fid"]
    return "\n".join([
        "# digit_classifier",
        "",
        "The small convolutional digit classifier whose 64 penultimate features `genserve evaluate --fid`",
        "compares (Fréchet distance, Heusel et al. 2017, with this network in place of Inception).",
        "",
        "## Training",
        f"- command: `genserve train-classifier --epochs {config.epochs} --seed {config.seed}`",
        f"- config: `{json.dumps(asdict(config))}`",
        f"- data: {figures['dataset']}; every batch is 8-bit or, with probability 1/2, dynamically binarised",
        "",
        "## Held-out accuracy",
        f"- 8-bit images: {figures['held_out_accuracy_8bit']:.2%}",
        f"- binarised images (seed {EVAL_BINARISATION_SEED}): {figures['held_out_accuracy_binarised']:.2%}",
        "",
        "## Reference distances (500 images each, against the 500 held-out images)",
        "| pixels | real training images (floor) | uniform noise |",
        "|---|---|---|",
        f"| 8-bit | {reference['train_vs_held_out_8bit']} | {reference['uniform_noise_vs_held_out_8bit']} |",
        f"| binarised | {reference['train_vs_held_out_binarised']} | "
        f"{reference['uniform_noise_vs_held_out_binarised']} |",
        "",
    ])
