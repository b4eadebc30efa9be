"""Writing pixel values out as PNG grids or NPZ arrays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(pixels: torch.Tensor, levels: int) -> np.ndarray:
    """Pixel values (N, C, H, W) in [0, levels) → uint8 in [0, 255] for display."""
    scaled = pixels.long().clamp(0, levels - 1) * 255 // (levels - 1)
    return scaled.to(torch.uint8).numpy()


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2, scale: int = 2) -> Image.Image:
    """uint8 images (N, C, H, W) with C in {1, 3} → one PIL image, `columns` per row."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"can only grid 1- or 3-channel images, got {c} channels")
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 128, np.uint8)
    for k in range(n):
        top, left = padding + (k // columns) * (h + padding), padding + (k % columns) * (w + padding)
        canvas[top : top + h, left : left + w] = images[k].transpose(1, 2, 0)
    grid = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def save_samples(pixels: torch.Tensor, levels: int, path: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Writes samples as a PNG grid (.png) or as arrays `images` (uint8) and `labels` (.npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        image_grid(to_uint8(pixels, levels)).save(path)
    elif path.suffix == ".npz":
        arrays = {"images": pixels.to(torch.uint8).numpy(), "levels": np.array(levels)}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        np.savez_compressed(path, **arrays)
    else:
        raise ValueError(f"output must end in .png or .npz, got {path.name!r}")
    return path
