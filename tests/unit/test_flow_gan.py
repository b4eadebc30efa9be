"""FlowGAN: RealNVP's exact likelihood, its discriminator labelled, both parts trained."""

from __future__ import annotations

import torch

from genserve.export.models.realnvp import RealNVP
from tests.conftest import make_model


def _images(n: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 4, 4), generator=torch.Generator().manual_seed(6))


def test_scores_are_realnvps_likelihood_then_the_discriminator():
    model = make_model("flow_gan")
    x = _images()
    likelihood, logit = model.scores(x, seed=3)
    (expected,) = RealNVP.scores(model, x, seed=3)  # the same flow, the same dequantisation noise
    assert torch.equal(likelihood.values, expected.values) and likelihood.method == "dequantised"
    centres = (x.float() + 0.5) / 256
    assert torch.equal(logit.values, model.discriminator(centres)[1])
    assert (logit.method, logit.is_likelihood, logit.unit) == ("discriminator", False, "logit")


def test_a_train_step_moves_the_flow_and_the_discriminator():
    model = make_model("flow_gan").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figures = model.train_step(_images(16), None, model.configure_optimizers(1e-2))
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"before_squeeze", "squeezed", "discriminator"}
    assert set(figures) == {"nll", "bpd", "d_loss", "g_loss"}
