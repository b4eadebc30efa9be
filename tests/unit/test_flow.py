"""RealNVP: the change of variables is exact and the flow inverts."""

from __future__ import annotations

import pytest
import torch

from genserve.export.models.realnvp import squeeze, unsqueeze
from tests.conftest import make_model


def test_log_det_equals_the_numerical_jacobian():
    model = make_model("realnvp").double()
    torch.manual_seed(3)
    y = torch.randn(1, 1, 4, 4, dtype=torch.float64)

    def flat_flow(flat: torch.Tensor) -> torch.Tensor:
        return model.flow_forward(flat.view(1, 1, 4, 4))[0].flatten()

    jacobian = torch.autograd.functional.jacobian(flat_flow, y.flatten())  # (16, 16)
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert sign != 0
    assert model.flow_forward(y)[1].item() == pytest.approx(log_abs_det.item(), abs=1e-9)


def test_dequantisation_log_det_equals_its_numerical_jacobian():
    model = make_model("realnvp").double()
    pixels = torch.randint(0, 256, (1, 1, 4, 4))
    noise = torch.rand(1, 1, 4, 4, dtype=torch.float64)

    def to_logit_space(u: torch.Tensor) -> torch.Tensor:  # a function of the continuous value pixel + u
        return model.dequantise(pixels, u.view(1, 1, 4, 4))[0].flatten()

    jacobian = torch.autograd.functional.jacobian(to_logit_space, noise.flatten())
    expected = torch.linalg.slogdet(jacobian)[1].item()
    assert model.dequantise(pixels, noise)[1].item() == pytest.approx(expected, abs=1e-9)


def test_flow_inverse_undoes_forward():
    model = make_model("realnvp").double()
    y = torch.randn(5, 1, 4, 4, dtype=torch.float64) * 3
    z, _ = model.flow_forward(y)
    assert torch.allclose(model.flow_inverse(z), y, atol=1e-10)


def test_squeeze_round_trips_and_groups_2x2_blocks():
    x = torch.arange(2 * 3 * 4 * 4).view(2, 3, 4, 4)
    s = squeeze(x)
    assert s.shape == (2, 12, 2, 2)
    assert torch.equal(unsqueeze(s), x)
    # the four entries of the top-left 2x2 block of channel 0 land in channels 0..3 at (0, 0)
    assert sorted(s[0, :4, 0, 0].tolist()) == sorted(x[0, 0, :2, :2].flatten().tolist())


def test_encode_then_decode_returns_the_pixels(shipped):
    model = shipped("realnvp_mnist").model
    from genserve.export.data import load_mnist5k

    pixels = load_mnist5k().held_out.images[:16].long()
    z, log_det = model.encode(pixels)
    assert torch.isfinite(log_det).all()
    assert torch.equal(model.decode(z), pixels)
