"""Checkpoints: safetensors weights + a JSON config, never a pickle.

A checkpoint is a folder:
  config.json          format tag, family, model config, training record, held-out metrics
  model.safetensors    the model's state dict
  trainer.safetensors  optimizer state, so `genserve train` can resume (absent when shipped)
Writes go to a temporary name first and are renamed into place, so an interrupted write
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .models import GenerativeModel, build_model

FORMAT = "genserve-checkpoint/1"
CONFIG_FILE, WEIGHTS_FILE, TRAINER_FILE = "config.json", "model.safetensors", "trainer.safetensors"
SHIPPED_DIR = Path(__file__).parent / "checkpoints"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode) and its records."""

    model: GenerativeModel
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.path else self.model.family


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path,
    model: GenerativeModel,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    optimizers: list[torch.optim.Optimizer] | None = None,
) -> Path:
    """Writes the checkpoint folder (and the optimizer state when given) and returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
    record: dict[str, Any] = {
        "format": FORMAT,
        "family": model.family,
        "model": model.config.to_dict(),
        "training": training or {},
        "metrics": metrics or {},
    }
    if optimizers is not None:
        tensors, groups = _flatten_optimizers(optimizers)
        _atomic_write(directory / TRAINER_FILE, lambda p: save_file(tensors, str(p)))
        record["optimizer_param_groups"] = groups
    else:  # a weights-only (finished, shipped) checkpoint: no stale optimizer state beside it
        (directory / TRAINER_FILE).unlink(missing_ok=True)
    _atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n"))
    return directory


def shipped_names() -> list[str]:
    """Names of the checkpoints shipped in export/checkpoints/."""
    return sorted(p.name for p in SHIPPED_DIR.glob("*") if (p / CONFIG_FILE).is_file())


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint folder path, or the name of a shipped checkpoint (e.g. `vae_mnist`)."""
    path = Path(name_or_path)
    if (path / CONFIG_FILE).is_file():
        return path
    shipped = SHIPPED_DIR / str(name_or_path)
    if (shipped / CONFIG_FILE).is_file():
        return shipped
    raise FileNotFoundError(
        f"no checkpoint at {str(name_or_path)!r}: expected a folder holding {CONFIG_FILE} or one of "
        f"the shipped checkpoints {shipped_names()}"
    )


def read_record(directory: str | Path) -> dict[str, Any]:
    record = json.loads((Path(directory) / CONFIG_FILE).read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a {FORMAT} checkpoint (format={record.get('format')!r})")
    return record


def load_checkpoint(name_or_path: str | Path) -> Checkpoint:
    """Loads a checkpoint folder or shipped checkpoint by name; the model is in eval mode."""
    directory = resolve_checkpoint(name_or_path)
    record = read_record(directory)
    model = build_model(record["family"], record["model"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    model.eval()
    return Checkpoint(model=model, training=record["training"], metrics=record["metrics"], path=directory)


def load_optimizer_state(directory: str | Path, optimizers: list[torch.optim.Optimizer]) -> None:
    """Restores optimizer state saved by `save_checkpoint(..., optimizers=...)`."""
    directory = Path(directory)
    groups = read_record(directory).get("optimizer_param_groups")
    if groups is None or not (directory / TRAINER_FILE).exists():
        raise ValueError(f"{directory} is a weights-only checkpoint (no optimizer state): it cannot be resumed")
    tensors = load_file(str(directory / TRAINER_FILE))
    if len(groups) != len(optimizers):
        raise ValueError(f"{directory}: saved {len(groups)} optimizers, the model has {len(optimizers)}")
    for k, (optimizer, param_groups) in enumerate(zip(optimizers, groups)):
        state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"{k}."
        for key, tensor in tensors.items():
            if key.startswith(prefix):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = tensor
        for group in param_groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _flatten_optimizers(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list]:
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for k, optimizer in enumerate(optimizers):
        state_dict = optimizer.state_dict()
        for index, param_state in state_dict["state"].items():
            for name, value in param_state.items():
                tensors[f"{k}.{index}.{name}"] = torch.as_tensor(value).detach().contiguous()
        groups.append(state_dict["param_groups"])
    return tensors, groups
