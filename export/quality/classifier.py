"""The digit classifier whose features the Fréchet distance compares.

A small convolutional network trained on mnist5k's training split. It sees images as floats in
[0, 1] (pixel value / (levels - 1)), and is trained on both the 8-bit images and dynamic
binarisations of them, so its features mean the same thing for binary and 8-bit samples.
Its 64 penultimate activations are the features: few enough that 500 held-out images estimate
their covariance.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..data import load_dataset, quantise

SHIPPED_CLASSIFIER = Path(__file__).parent / "digit_classifier"
IMAGE_SIZE = 28
WEIGHTS_FILE, RECORD_FILE = "model.safetensors", "config.json"


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0
    feature_dim: int = 64

    def __post_init__(self) -> None:
        if min(self.epochs, self.batch_size, self.feature_dim) < 1 or not self.learning_rate > 0:
            raise ValueError(f"epochs, batch_size, feature_dim and learning_rate must be positive: {self}")


class DigitClassifier(nn.Module):
    def __init__(self, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
            nn.Linear(128, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, pixels: torch.Tensor, levels: int) -> torch.Tensor:
        """Pixel values (N, 1, 28, 28) in [0, levels) → features (N, feature_dim)."""
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"the digit classifier takes (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) images, got {tuple(pixels.shape)}"
            )
        return self.body(pixels.float() / (levels - 1))

    def forward(self, pixels: torch.Tensor, levels: int) -> torch.Tensor:
        return self.head(self.features(pixels, levels))


def _binarise_half(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Every other batch is binarised: the classifier must read both kinds of sample."""
    if torch.rand((), generator=generator) < 0.5:
        return quantise(images, 2, generator), 2
    return images.long(), 256


@torch.inference_mode()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, levels: int) -> float:
    return float((model(images, levels).argmax(1) == labels).float().mean())


def train_classifier(config: ClassifierConfig, progress: bool = True) -> tuple[DigitClassifier, dict]:
    """Trains on mnist5k's training split; returns the model and its held-out accuracies."""
    dataset = load_dataset("mnist5k")
    torch.manual_seed(config.seed)
    model = DigitClassifier(config.feature_dim, dataset.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels = dataset.train.images, dataset.train.labels
    batches = math.ceil(len(images) / config.batch_size)
    bar = tqdm(total=config.epochs * batches, desc="digit classifier", unit="batch", disable=not progress)
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for b in range(batches):
            index = order[b * config.batch_size : (b + 1) * config.batch_size]
            x, levels = _binarise_half(images[index], generator)
            loss = F.cross_entropy(model(x, levels), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    bar.close()
    model.eval()
    held_out = dataset.held_out
    binarised = quantise(held_out.images, 2, torch.Generator().manual_seed(1234))
    figures = {
        "held_out_accuracy_8bit": round(accuracy(model, held_out.images.long(), held_out.labels, 256), 4),
        "held_out_accuracy_binarised": round(accuracy(model, binarised, held_out.labels, 2), 4),
        "dataset": dataset.describe(),
    }
    return model, figures


def save_classifier(directory: Path, model: DigitClassifier, config: ClassifierConfig, figures: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))
    record = {"config": asdict(config), "figures": figures}
    (directory / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def load_classifier(directory: Path = SHIPPED_CLASSIFIER) -> DigitClassifier:
    record = json.loads((directory / RECORD_FILE).read_text())
    model = DigitClassifier(record["config"]["feature_dim"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval()
