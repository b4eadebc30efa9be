"""AAE: its scores are what they say, labelled not a likelihood, and its phases train what they should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genserve.export.models import UnsupportedCapability
from tests.conftest import make_model


def _images(n: int = 5) -> torch.Tensor:
    return torch.randint(0, 2, (n, 1, 8, 8), generator=torch.Generator().manual_seed(2))


def test_reconstruction_is_the_bernoulli_log_likelihood_of_the_decoded_code():
    model = make_model("aae").double()
    x = _images()
    reconstruction, logit = model.scores(x)
    z = model.encode(x)
    logits = model.decoder_logits(z)
    # PyTorch's own BCE, an independent formula; float64 leaves only summation-order error.
    expected = -F.binary_cross_entropy_with_logits(logits, x.double(), reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(reconstruction.values, expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(logit.values, model.latent_discriminator(z).squeeze(1))
    assert (reconstruction.method, logit.method) == ("reconstruction", "latent_discriminator")
    assert not reconstruction.is_likelihood and not logit.is_likelihood and logit.unit == "logit"
    with pytest.raises(ValueError, match="not a likelihood"):
        reconstruction.bits_per_dim(64)


def test_there_is_no_log_prob():
    with pytest.raises(UnsupportedCapability, match="aae models cannot compute log p"):
        make_model("aae").log_prob(_images())


def test_a_train_step_moves_encoder_decoder_and_latent_discriminator():
    model = make_model("aae").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train_step(_images(16), None, model.configure_optimizers(1e-2))
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"encoder", "decoder_dense", "decoder_conv", "latent_discriminator"}
