"""The float32 rounding model behind every parity tolerance: it admits rounding and catches bugs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.rounding import assert_within_rounding, rounding_sigma


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 8, 3, padding=1), nn.Sigmoid(), nn.Flatten(),
        nn.Linear(8 * 12 * 12, 10),
    ).eval()


def test_exact_arithmetic_is_within_the_float32_tolerance():
    # float64 is float32 with (almost) no rounding: the float32 result must be within rounding of it.
    net, x = network(), torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    (sigma,) = rounding_sigma(net, [x])
    with torch.no_grad():
        got, exact = net(x).numpy(), net.double()(x.double()).numpy()
    assert_within_rounding(got, exact, sigma, "float32 vs float64")
    assert (sigma > 0).all() and (sigma < 1e-5).all()  # rounding-sized: float32 ~1e-7 grown by depth and width


def test_a_changed_weight_is_caught():
    net, x = network(), torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    (sigma,) = rounding_sigma(net, [x])
    with torch.no_grad():
        want = net(x).numpy()
        net[0].weight[3, 0, 1, 1] += 1e-3  # one weight of 4,000-odd moved by a thousandth
        got = net(x).numpy()
    with pytest.raises(AssertionError, match="over the float32 rounding tolerance"):
        assert_within_rounding(got, want, sigma, "bug")


def test_in_place_and_float64_operations():
    # In-place results are perturbed where they live; float64 work is not float32 rounding.
    def fn(x):
        y = x * 3.0
        y.add_(1.0)
        return y, x.double().sum(1)

    x = torch.rand(5, 7, generator=torch.Generator().manual_seed(2))
    sigma_y, sigma_sum = rounding_sigma(fn, [x])
    assert (sigma_y > 0).all()
    assert np.array_equal(sigma_sum, np.zeros(5))
