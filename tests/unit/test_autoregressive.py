"""Exactness of the autoregressive models: causal masks and normalisation."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.conftest import make_model

AR_FAMILIES = ("pixelcnn", "gated_pixelcnn", "pixelcnn_pp", "wavenet")
FOUR_VALUES = {  # the smallest sample of each family, four values: a 2x2 image or a clip of 4
    "wavenet": dict(length=4, frame=4), "pixelcnn_pp": dict(image_size=2, num_scales=2),
    "pixelcnn": dict(image_size=2), "gated_pixelcnn": dict(image_size=2),
}


def input_gradients(model, size: int, position: tuple[int, int], label: int | None = None) -> torch.Tensor:
    """sum over 16 random inputs of |d logits(position) / d x|, as an (H, W) map.

    Several inputs, because at one input a ReLU may happen to be off and hide a dependence.
    """
    torch.manual_seed(1)
    x = torch.rand(16, 1, size, size, dtype=torch.float64, requires_grad=True)
    labels = None if label is None else torch.full((16,), label)
    logits = model.double().logits(x, labels)  # (16, L, 1, H, W)
    logits[..., position[0], position[1]].sum().backward()
    return x.grad[:, 0].abs().sum(0)


@pytest.mark.parametrize(
    "family, conditional", [("pixelcnn", False), ("gated_pixelcnn", False), ("gated_pixelcnn", True)]
)
def test_output_depends_on_exactly_the_previous_pixels(family, conditional):
    overrides = {"num_classes": 3} if conditional else {}
    # A 7x7 first kernel on a 4x4 image reaches every earlier pixel in one layer for both
    # families, so "depends on all earlier pixels" is a fair demand of each.
    model = make_model(family, first_kernel_size=7, **overrides)
    size = model.config.image_size
    for i, j in itertools.product(range(size), range(size)):
        grad = input_gradients(model, size, (i, j), label=2 if conditional else None)
        flat = grad.flatten()
        p = i * size + j
        assert torch.all(flat[p:] == 0), f"pixel {(i, j)} sees itself or a later pixel: {grad}"
        assert torch.all(flat[:p] > 0), f"pixel {(i, j)} is blind to an earlier pixel: {grad}"


def test_gated_pixelcnn_has_no_blind_spot_where_pixelcnn_does():
    # With 3x3 kernels only, PixelCNN's stacked masks never see up-and-right beyond the first
    # row above (the blind spot, van den Oord et al. 2016); the gated stacks do.
    size = 6
    common = dict(image_size=size, first_kernel_size=3, kernel_size=3)
    pixelcnn = make_model("pixelcnn", num_residual_blocks=4, **common)
    gated = make_model("gated_pixelcnn", num_layers=5, **common)
    target, up_right = (4, 2), (2, 5)  # two rows up, three columns right
    assert input_gradients(pixelcnn, size, target)[up_right] == 0
    assert input_gradients(gated, size, target)[up_right] > 0


@pytest.mark.parametrize("family", AR_FAMILIES)
@pytest.mark.parametrize("levels", [2, 3, 5])
def test_probabilities_of_every_tiny_image_sum_to_one(family, levels):
    model = make_model(family, pixel_levels=levels, **FOUR_VALUES[family]).double()
    images = torch.tensor(list(itertools.product(range(levels), repeat=4))).view(-1, *model.config.sample_shape)
    assert len(images) == levels**4
    with torch.no_grad():
        total = model.log_prob(images).exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("family", ["gated_pixelcnn", "wavenet"])
def test_conditional_model_normalises_for_each_label(family):
    model = make_model(family, num_classes=4, pixel_levels=2, **FOUR_VALUES[family]).double()
    images = torch.tensor(list(itertools.product(range(2), repeat=4))).view(-1, *model.config.sample_shape)
    with torch.no_grad():
        for label in range(4):
            labels = torch.full((len(images),), label)
            assert model.log_prob(images, labels).exp().sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("family", AR_FAMILIES)
def test_sample_is_argmax_at_temperature_zero(family):
    model = make_model(family)
    x = model.sample(3, seed=5, temperature=0.0)
    # At T=0 every pixel is the argmax given the pixels before it: re-scoring the finished
    # image must pick the same value everywhere (causality makes later pixels irrelevant).
    with torch.no_grad():
        assert torch.equal(model.logits(x).argmax(dim=1), x)
    # ...and it ignores the noise: another seed gives the same image.
    assert torch.equal(model.sample(3, seed=6, temperature=0.0), x)


@pytest.mark.parametrize("family", AR_FAMILIES)
def test_sampled_pixels_follow_the_inverse_cdf_of_their_noise(family):
    from genserve.serving.kernels.sampling import uniform_noise

    model = make_model(family)
    x = model.sample(4, seed=11, temperature=1.0)
    noise = uniform_noise(11, range(4), x.shape[1:])
    with torch.no_grad():
        probs = torch.softmax(model.double().logits(x), dim=1)  # (N, L, C, H, W)
    cdf = probs.cumsum(1)
    below = cdf.gather(1, (x - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    lower = torch.where(x > 0, below, torch.zeros_like(below))
    upper = cdf.gather(1, x.unsqueeze(1)).squeeze(1)
    # The chosen value v is the one whose CDF interval [cdf[v-1], cdf[v]) holds the noise
    # (1e-6 slack: the sampler ran in float32, this check in float64).
    assert torch.all(noise >= lower - 1e-6) and torch.all(noise < upper + 1e-6)
