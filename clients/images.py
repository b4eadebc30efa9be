"""Reading images for Score/Encode and writing samples, on the client side (PNG and NPZ)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def display_uint8(images: np.ndarray, levels: int) -> np.ndarray:
    """Pixel values (N, C, H, W) in [0, levels) → uint8 in [0, 255] for viewing."""
    return (images.astype(np.int64).clip(0, levels - 1) * 255 // max(levels - 1, 1)).astype(np.uint8)


def grid(images: np.ndarray, padding: int = 2, scale: int = 2) -> Image.Image:
    """uint8 (N, C, H, W) images, C in {1, 3}, tiled in a near-square grid on a grey background."""
    n, c, h, w = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 128, np.uint8)
    for k in range(n):
        top, left = padding + (k // columns) * (h + padding), padding + (k % columns) * (w + padding)
        canvas[top : top + h, left : left + w] = images[k].transpose(1, 2, 0)
    picture = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def write_images(path: str | Path, images: np.ndarray, pixel_levels: int, **arrays: np.ndarray | None) -> Path:
    """A PNG grid (.png) or the raw arrays (.npz: `images`, `levels`, and any of `arrays` given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        grid(display_uint8(images, pixel_levels)).save(path)
    elif path.suffix == ".npz":
        extra = {k: v for k, v in arrays.items() if v is not None}
        np.savez_compressed(path, images=images, levels=np.array(pixel_levels), **extra)
    else:
        raise ValueError(f"output must end in .png or .npz, got {path.name!r}")
    return path


def read_images(paths: list[str], levels: int) -> np.ndarray:
    """uint8 (N, C, H, W) pixel values from PNG files (8-bit, quantised to `levels`) and/or NPZ files.

    An NPZ's `images` (N, H, W) or (N, C, H, W) are pixel values already (what `genserve sample`
    writes); a PNG's 0-255 values v become v * levels // 256, one image per file.
    """
    batches = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")
        if path.suffix == ".npz":
            with np.load(path) as data:
                if "images" not in data:
                    raise ValueError(f"{path} has no 'images' array (it has {', '.join(data.files)})")
                images = data["images"]
            batches.append(images[:, None] if images.ndim == 3 else images)
        else:
            with Image.open(path) as picture:
                pixels = np.asarray(picture.convert("L" if picture.mode in ("L", "1", "P", "LA") else "RGB"))
            pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            batches.append((pixels.astype(np.int64) * levels // 256)[None])
    shapes = {b.shape[1:] for b in batches}
    if len(shapes) > 1:
        raise ValueError(f"the images differ in shape: {sorted(shapes)}")
    return np.concatenate(batches).astype(np.uint8)
