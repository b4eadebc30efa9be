"""The family-neutral interface: determinism, capabilities, validation, config round trips."""

from __future__ import annotations

import json

import pytest
import torch

from genserve.export.models import FAMILIES, UnsupportedCapability, build_model, model_class
from tests.conftest import TINY, make_model

CONDITIONAL = {"gated_pixelcnn", "dcgan", "wavenet"}


def labels_for(family, n):
    return torch.arange(n) % 3 if family in CONDITIONAL else None


def conditional_overrides(family):
    return {"num_classes": 3} if family in CONDITIONAL else {}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_seed_same_samples_and_each_sample_independent_of_batch(family):
    model = make_model(family, **conditional_overrides(family))
    four = model.sample(4, seed=7, labels=labels_for(family, 4))
    assert torch.equal(model.sample(4, seed=7, labels=labels_for(family, 4)), four)
    assert torch.equal(model.sample(2, seed=7, labels=labels_for(family, 2)), four[:2])
    assert not torch.equal(model.sample(4, seed=8, labels=labels_for(family, 4)), four)
    c = model.config
    assert four.shape == (4, *c.sample_shape) and four.dtype == torch.long
    assert 0 <= four.min() and four.max() < c.pixel_levels


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_round_trips_through_json(family):
    cls = model_class(family)
    config = cls.config_class(**TINY[family])
    assert cls.config_class.from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_rejects_unknown_fields_and_bad_values(family):
    cls = model_class(family).config_class
    with pytest.raises(ValueError, match="unknown .* fields \\['hiden'\\]"):
        cls.from_dict({"hiden": 3})
    with pytest.raises(ValueError, match="pixel_levels must be"):
        cls(pixel_levels=1)


@pytest.mark.parametrize(
    "family, missing",
    [("pixelcnn", "encode"), ("gated_pixelcnn", "decode"), ("dcgan", "encode"), ("pixelcnn", "decode")],
)
def test_missing_capabilities_raise_a_clear_error(family, missing):
    model = make_model(family)
    assert missing not in model.capabilities
    with pytest.raises(UnsupportedCapability, match=f"{family} models cannot {missing}; they support: "):
        getattr(model, missing)(torch.zeros(1, 1, 4, 4))


def test_capabilities_follow_the_design_table():
    assert {f: sorted(c.capabilities) for f, c in FAMILIES.items()} == {
        "pixelcnn": ["sample", "score"],
        "gated_pixelcnn": ["sample", "score"],
        "pixelcnn_pp": ["sample", "score"],
        "wavenet": ["sample", "score"],
        "vae": ["decode", "encode", "sample", "score"],
        "iaf_vae": ["decode", "encode", "sample", "score"],
        "aae": ["decode", "encode", "sample", "score"],
        "vae_gan": ["decode", "encode", "sample", "score"],
        "pixel_vae": ["decode", "encode", "sample", "score"],
        "flow_gan": ["decode", "encode", "sample", "score"],
        "dcgan": ["decode", "sample", "score"],
        "realnvp": ["decode", "encode", "sample", "score"],
        "maf": ["decode", "encode", "sample", "score"],
    }


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.zeros(2, 1, 5, 4, dtype=torch.long), "x must have shape \\(N, 1, 4, 4\\), got \\(2, 1, 5, 4\\)"),
        (torch.zeros(2, 1, 4, 4), "x must hold integer pixel values, got dtype torch.float32"),
        (torch.full((2, 1, 4, 4), 2), "x values must lie in \\[0, 2\\), got range \\[2, 2\\]"),
        (torch.full((2, 1, 4, 4), -1), "x values must lie in \\[0, 2\\)"),
    ],
)
def test_bad_pixels_are_rejected_with_the_reason(x, message):
    with pytest.raises(ValueError, match=message):
        make_model("gated_pixelcnn").log_prob(x)


def test_labels_are_validated():
    conditional = make_model("gated_pixelcnn", num_classes=3)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="conditional on 3 classes; labels are required"):
        conditional.log_prob(x)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 3\\), got \\[3\\]"):
        conditional.log_prob(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        conditional.log_prob(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="unconditional; labels must be omitted"):
        make_model("gated_pixelcnn").log_prob(x, torch.tensor([0, 1]))


def test_sample_count_and_temperature_are_validated():
    model = make_model("pixelcnn")
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        model.sample(0, seed=1)
    with pytest.raises(ValueError, match="temperature: must be finite and >= 0, got -1.0"):
        model.sample(1, seed=1, temperature=-1.0)
    with pytest.raises(ValueError, match="seed: must be >= 0, got -2"):
        model.sample(1, seed=-2)


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown model family 'sketch_rnn'"):
        build_model("sketch_rnn")
