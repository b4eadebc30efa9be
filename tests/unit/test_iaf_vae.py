"""IAF-VAE: each flow step is autoregressive, and log q(z | x) is the exact change of variables."""

from __future__ import annotations

import pytest
import torch

from genserve.export.models.vae import gaussian_log_density
from tests.conftest import make_model


@pytest.fixture
def model():
    return make_model("iaf_vae").double()


def _images(n: int, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 2, (n, 1, size, size), generator=torch.Generator().manual_seed(3))


def test_each_step_depends_only_on_earlier_dimensions(model):
    step = model.flows[0]
    d = model.config.latent_dim
    context = torch.randn(model.config.context_dim, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda z: step(z, context)[0], torch.randn(d, dtype=torch.float64))
    assert torch.equal(jacobian.triu(1), torch.zeros(d, d, dtype=torch.float64))  # exactly: masked weights
    assert (jacobian.diagonal() > 0).all()


def test_log_density_is_the_change_of_variables(model):
    x = _images(1)
    eps = torch.randn(1, model.config.latent_dim, dtype=torch.float64)
    z, log_q = model.posterior(x, eps)
    d = model.config.latent_dim
    mean, log_var, _ = model.encoder(x.double()).split([d, d, model.config.context_dim], dim=1)

    def flow(z0: torch.Tensor) -> torch.Tensor:  # z_0 → z_T, through posterior's own eps = (z_0 - mean) / std
        return model.posterior(x, ((z0 - mean) / (0.5 * log_var).exp()))[0]

    z0 = mean + (0.5 * log_var).exp() * eps
    jacobian = torch.autograd.functional.jacobian(flow, z0).reshape(d, d)
    expected = gaussian_log_density(z0, mean, log_var) - torch.linalg.slogdet(jacobian).logabsdet
    # float64 throughout: the only difference is summation order, ~1e-15 relative.
    assert log_q.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-10)
    assert not torch.allclose(z, z0)  # the flow does move the code


def test_encode_is_the_flowed_mode_with_its_density(model):
    x = _images(3)
    z, log_q = model.encode(x)
    expected_z, expected_log_q = model.posterior(x, torch.zeros(3, model.config.latent_dim, dtype=torch.float64))
    assert torch.equal(z, expected_z) and torch.equal(log_q, expected_log_q)
    assert z.shape == (3, model.config.latent_dim) and log_q.shape == (3,)


def test_iwae_is_at_least_the_elbo():
    x = _images(4)
    elbo, iwae = make_model("iaf_vae").bounds(x, num_samples=64, seed=1)
    assert (iwae.values >= elbo.values).all()  # Jensen, for the same 64 draws
    assert elbo.is_bound and iwae.method == "iwae-64"


def test_config_needs_two_latent_dimensions():
    from genserve.export.models import IAFVAEConfig

    with pytest.raises(ValueError, match="latent_dim >= 2"):
        IAFVAEConfig(latent_dim=1)
