"""Training: deterministic epochs, a progress bar, checkpoints after every epoch, resume.

Determinism: every epoch reseeds from (seed, epoch) — the shuffle, the dynamic binarisation
and the model's own noise (VAE eps, GAN z, flow dequantisation) — so training N epochs in
one go and training k epochs, stopping, and resuming for N - k give identical weights.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from genserve.serving.kernels.sampling import sample_stream_seed

from .checkpoint import CONFIG_FILE, load_checkpoint, load_optimizer_state, read_record, save_checkpoint
from .data import load_dataset, quantise
from .models import GenerativeModel, build_model


@dataclass(frozen=True)
class TrainConfig:
    family: str
    out: str
    data: str = "mnist5k"
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_decay: float = 1.0  # learning rate multiplier per epoch
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the family's config defaults

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be >= 1, got epochs={self.epochs} batch_size={self.batch_size}"
            )
        if not self.learning_rate > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(
                f"learning_rate must be > 0 and lr_decay in (0, 1], got {self.learning_rate}, {self.lr_decay}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def _fresh_or_resumed(config: TrainConfig, num_classes: int, shape_config: dict[str, int]):
    """Returns (model, optimizers, first epoch), resuming if `out` already holds a checkpoint."""
    out = Path(config.out)
    if (out / CONFIG_FILE).exists():
        record = read_record(out)
        if record["family"] != config.family:
            raise ValueError(f"{out} holds a {record['family']} checkpoint, not {config.family}; choose another --out")
        model = load_checkpoint(out).model
        optimizers = model.configure_optimizers(config.learning_rate)
        load_optimizer_state(out, optimizers)
        return model, optimizers, int(record["training"]["epochs_done"])
    overrides = {**shape_config, **config.model}
    if overrides.get("num_classes") == "dataset":  # conditional on the dataset's own labels
        overrides["num_classes"] = num_classes
    torch.manual_seed(config.seed)  # initial weights
    model = build_model(config.family, overrides)
    return model, model.configure_optimizers(config.learning_rate), 0


def train(config: TrainConfig, progress: bool = True) -> GenerativeModel:
    """Trains `config.family` on `config.data` up to `config.epochs`, checkpointing each epoch.

    Returns the trained model (eval mode). The checkpoint in `config.out` records the
    command line, the config and the epochs done.
    """
    dataset = load_dataset(config.data)
    model, optimizers, first_epoch = _fresh_or_resumed(config, dataset.num_classes, dataset.shape_config)
    if first_epoch >= config.epochs:
        print(f"{config.out} already holds {first_epoch} epochs (asked for {config.epochs}); nothing to do")
        return model.eval()
    images, labels = dataset.train.images, dataset.train.labels
    batches = math.ceil(len(images) / config.batch_size)
    bar = tqdm(
        total=(config.epochs - first_epoch) * batches, disable=not progress, unit="batch", dynamic_ncols=True
    )
    record = {
        **asdict(config),
        "command": shlex.join(["genserve", *sys.argv[1:]]) if sys.argv[0].endswith("genserve") else None,
        "dataset": dataset.describe(),
    }
    for epoch in range(first_epoch, config.epochs):
        model.train()
        epoch_seed = sample_stream_seed(config.seed, epoch)
        generator = torch.Generator().manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * config.lr_decay**epoch
        order = torch.randperm(len(images), generator=generator)
        bar.set_description(f"{config.family} epoch {epoch + 1}/{config.epochs}")
        totals: dict[str, float] = {}
        for b in range(batches):
            index = order[b * config.batch_size : (b + 1) * config.batch_size]
            x = quantise(images[index], model.config.pixel_levels, generator)
            y = labels[index] if model.config.num_classes else None
            metrics = model.train_step(x, y, optimizers)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
            bar.set_postfix({k: f"{v / (b + 1):.3f}" for k, v in totals.items()}, refresh=False)
            bar.update()
        record["epochs_done"] = epoch + 1
        record["last_epoch_metrics"] = {k: v / batches for k, v in totals.items()}
        save_checkpoint(config.out, model, training=record, optimizers=optimizers)
    bar.close()
    return model.eval()
