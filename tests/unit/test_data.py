"""Datasets: the fixed split, the fixed evaluation binarisation, and user-provided files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from genserve.export.data import fixed_held_out, load_dataset, load_digits8, load_mnist5k, quantise


def test_mnist5k_split_is_4500_500_disjoint_and_deterministic():
    first, second = load_mnist5k(), load_mnist5k()
    assert (len(first.train), len(first.held_out)) == (4500, 500)
    assert torch.equal(first.held_out.images, second.held_out.images)
    train_rows = {bytes(img.numpy()) for img in first.train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in first.held_out.images)
    assert first.num_classes == 10 and first.shape_config == {"image_size": 28}
    # every digit class appears in both splits (the raw file is sorted by label: shuffled first)
    assert set(first.held_out.labels.tolist()) == set(range(10))


def test_fixed_binarisation_is_fixed_and_follows_pixel_intensity():
    dataset = load_mnist5k()
    a, b = fixed_held_out(dataset, 2), fixed_held_out(dataset, 2)
    assert torch.equal(a.images, b.images) and set(a.images.unique().tolist()) == {0, 1}
    raw = dataset.held_out.images
    assert torch.all(a.images[raw == 0] == 0) and torch.all(a.images[raw == 255] == 1)
    # Stochastic binarisation: mid-grey pixels are on about as often as their intensity says.
    mid = (raw > 100) & (raw < 155)
    assert abs(a.images[mid].float().mean().item() - raw[mid].float().mean().item() / 255) < 0.03


def test_dynamic_binarisation_differs_between_draws():
    images = load_mnist5k().train.images[:100]
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(quantise(images, 2, g), quantise(images, 2, g))
    assert torch.equal(quantise(images, 256), images.long())
    assert quantise(torch.tensor([0, 127, 128, 255], dtype=torch.uint8), 4).tolist() == [0, 1, 2, 3]


def test_digits8_is_8x8_in_0_255():
    digits = load_digits8()
    assert digits.shape_config == {"image_size": 8} and len(digits.train) + len(digits.held_out) == 1797
    assert digits.train.images.max() == 255


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_loads_mnist_idx_files_from_a_folder(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    dataset = load_dataset(str(tmp_path))
    assert (len(dataset.train), len(dataset.held_out)) == (27, 3)
    loaded = torch.cat([dataset.train.images, dataset.held_out.images])[:, 0].numpy()
    assert sorted(map(bytes, loaded)) == sorted(map(bytes, images))


def test_loads_an_npz_file_and_rejects_bad_ones(tmp_path):
    np.savez(tmp_path / "mine.npz", images=np.zeros((20, 8, 8), np.uint8), labels=np.ones(20))
    assert load_dataset(str(tmp_path / "mine.npz")).shape_config == {"image_size": 8}
    np.savez(tmp_path / "floats.npz", images=np.zeros((20, 8, 8), np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        load_dataset(str(tmp_path / "floats.npz"))
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_dataset(str(tmp_path))


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
