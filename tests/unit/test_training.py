"""Training: smoke runs of every family, resume that reproduces an uninterrupted run, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genserve.export.checkpoint import load_checkpoint, save_checkpoint
from genserve.export.data import fixed_held_out, load_dataset, load_mnist5k
from genserve.export.models import build_model
from genserve.export.training import TrainConfig, train
from tests.conftest import TINY, make_model


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """100 real MNIST digits downsampled to 8x8, as a user-provided NPZ file."""
    images = load_mnist5k().train.images[:100].float()
    small = torch.nn.functional.avg_pool2d(images[:, :, 2:26, 2:26], 3).round().to(torch.uint8)  # (100, 1, 8, 8)
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, images=small.numpy(), labels=load_mnist5k().train.labels[:100].numpy())
    return str(path)


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory):
    """80 spoken digits of the committed corpus, 240 samples (30 ms) each from the middle of the word."""
    from genserve.export.speech import load_corpus

    corpus = load_corpus()
    path = tmp_path_factory.mktemp("speech") / "speech.npz"
    np.savez(path, audio=corpus["audio"][::6, :, 1200:1440], labels=corpus["labels"][::6])
    return str(path)


def tiny_config(family, out, data, **kw):
    model = {k: v for k, v in TINY[family].items() if k not in ("image_size", "length")}
    if family in ("gated_pixelcnn", "dcgan", "wavenet"):
        model["num_classes"] = "dataset"
    return TrainConfig(family=family, out=str(out), data=data, batch_size=32, model=model, **kw)


@pytest.mark.parametrize("family", ["pixelcnn", "gated_pixelcnn", "pixelcnn_pp", "vae", "iaf_vae", "vae_gan", "aae",
                                    "pixel_vae", "dcgan", "realnvp", "flow_gan", "maf"])
def test_every_family_trains_and_its_loss_falls(family, small_digits, tmp_path):
    config = tiny_config(family, tmp_path / family, small_digits, epochs=3, learning_rate=3e-3)
    model = train(config, progress=False)
    record = json.loads((tmp_path / family / "config.json").read_text())
    assert record["training"]["epochs_done"] == 3
    figures = record["training"]["last_epoch_metrics"]
    assert all(np.isfinite(v) for v in figures.values())
    assert model.config.image_size == 8
    if family == "aae":  # no likelihood: its reconstruction of held-out digits must improve instead
        torch.manual_seed(config.seed)  # the weights training started from
        untrained = build_model(family, {**TINY[family], "image_size": 8}).eval()
        held = fixed_held_out(load_dataset(small_digits), 2).images.long()
        with torch.no_grad():
            assert model.scores(held)[0].values.mean() > untrained.scores(held)[0].values.mean()
    elif family != "dcgan":  # adversarial losses need not fall; likelihood losses must
        untrained = make_model(family, image_size=8, num_classes=model.config.num_classes)
        # trained on digits, the model must find held-out digits more likely than an untrained one does
        held = fixed_held_out(load_dataset(small_digits), model.config.pixel_levels)
        x, labels = held.images.long(), (held.labels if model.config.num_classes else None)
        with torch.no_grad():
            assert model.log_prob(x, labels).mean() > untrained.log_prob(x, labels).mean()


def test_wavenet_trains_on_audio_and_finds_held_out_speech_more_likely(short_speech, tmp_path):
    config = tiny_config("wavenet", tmp_path, short_speech, epochs=3, learning_rate=3e-3)
    model = train(config, progress=False)
    assert model.config.sample_shape == (1, 240) and model.config.num_classes == 10
    assert json.loads((tmp_path / "config.json").read_text())["training"]["epochs_done"] == 3
    held = fixed_held_out(load_dataset(short_speech), model.config.pixel_levels)  # the tiny model's 5 levels
    untrained = make_model("wavenet", length=240, num_classes=10)
    with torch.no_grad():
        assert model.log_prob(held.images.long(), held.labels).mean() > untrained.log_prob(
            held.images.long(), held.labels).mean()


@pytest.mark.parametrize("family", ["gated_pixelcnn", "aae", "flow_gan"])  # one, three and two optimizers
def test_resume_reproduces_an_uninterrupted_run(small_digits, tmp_path, family):
    straight = train(tiny_config(family, tmp_path / "a", small_digits, epochs=2, lr_decay=0.5), False)
    train(tiny_config(family, tmp_path / "b", small_digits, epochs=1, lr_decay=0.5), False)
    resumed = train(tiny_config(family, tmp_path / "b", small_digits, epochs=2, lr_decay=0.5), False)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_refuses_another_family(small_digits, tmp_path):
    train(tiny_config("vae", tmp_path, small_digits, epochs=1), False)
    with pytest.raises(ValueError, match="holds a vae checkpoint, not realnvp"):
        train(tiny_config("realnvp", tmp_path, small_digits, epochs=1), False)


@pytest.mark.parametrize("family", ["gated_pixelcnn", "dcgan", "realnvp", "iaf_vae", "vae_gan", "aae", "flow_gan",
                                    "pixel_vae", "maf", "pixelcnn_pp", "wavenet"])
def test_checkpoint_round_trips_exactly(family, tmp_path):
    model = make_model(family)
    save_checkpoint(tmp_path, model, training={"seed": 3}, metrics={"m": 1})
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in tmp_path.iterdir())
    loaded = load_checkpoint(tmp_path)
    assert loaded.model.config == model.config and loaded.training == {"seed": 3}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.model.sample(2, seed=1), model.sample(2, seed=1))


def test_a_weights_only_checkpoint_cannot_be_resumed(small_digits, tmp_path):
    save_checkpoint(tmp_path, make_model("vae"))
    with pytest.raises(ValueError, match="weights-only checkpoint"):
        train(tiny_config("vae", tmp_path, small_digits, epochs=2), False)


def test_unknown_checkpoint_lists_the_shipped_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped checkpoints \\[.*'vae_mnist'"):
        load_checkpoint(tmp_path / "nothing")


def test_train_config_validates():
    with pytest.raises(ValueError, match="epochs and batch_size must be >= 1, got epochs=0"):
        TrainConfig(family="vae", out="x", epochs=0)
