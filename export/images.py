"""Writing sampled pixel values out as PNG grids or NPZ arrays (the client's writer, from torch tensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from genserve.clients.images import write_images


def save_samples(pixels: torch.Tensor, levels: int, path: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Writes samples as a PNG grid (.png) or as arrays `images` (uint8), `levels`, `labels` (.npz)."""
    return write_images(path, pixels.to(torch.uint8).numpy(), levels, labels=None if labels is None else labels.numpy())
