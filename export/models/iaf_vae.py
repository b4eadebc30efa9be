"""VAE whose posterior is a Gaussian followed by inverse autoregressive flow (IAF) steps.

Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, "Improved Variational Inference with
Inverse Autoregressive Flow", NeurIPS 2016. The encoder gives a Gaussian (mean, log-variance)
and a context vector h; z_0 = mean + std * eps, then each step t applies
  (m, s) = MADE_t(z_{t-1}, h),  sigma = sigmoid(s),  z_t = sigma * z_{t-1} + (1 - sigma) * m,
whose Jacobian is triangular (output i depends on inputs < i only), so
  log q(z_T | x) = log N(z_0; mean, var) - sum_t sum_i log sigma_t,i.
The latent order is reversed between steps, so every dimension conditions on every other.
Prior, decoder and the ELBO / IWAE-K bounds are the plain VAE's (vae.py), with this q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .vae import VAE, VAEConfig, gaussian_log_density

# Added to s before the sigmoid: steps start close to the identity (sigma ~ 0.88), as the paper advises.
FORGET_BIAS = 2.0


@dataclass(frozen=True)
class IAFVAEConfig(VAEConfig):
    flow_steps: int = 2
    flow_hidden: int = 64  # MADE hidden units per step
    context_dim: int = 16  # h, the encoder's extra output every step conditions on

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_dim < 2:
            raise ValueError(f"an autoregressive flow needs latent_dim >= 2, got {self.latent_dim}")
        if min(self.flow_steps, self.flow_hidden, self.context_dim) < 1:
            raise ValueError(
                f"flow sizes must be >= 1: flow_steps={self.flow_steps} flow_hidden={self.flow_hidden} "
                f"context_dim={self.context_dim}"
            )


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 connectivity mask."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """One IAF step: a MADE (Germain et al. 2015) over z, conditioned on the context h."""

    def __init__(self, dim: int, hidden: int, context_dim: int) -> None:
        super().__init__()
        inputs = torch.arange(1, dim + 1)  # degree of input i is i + 1
        hidden_degrees = torch.arange(hidden) % (dim - 1) + 1  # in [1, dim - 1]
        self.hidden = MaskedLinear(dim, hidden, hidden_degrees[:, None] >= inputs[None, :])
        self.context = nn.Linear(context_dim, hidden)
        # Output i may see hidden units of degree < i + 1: so it depends on z_<i only.
        out_mask = inputs[:, None] > hidden_degrees[None, :]
        self.shift = MaskedLinear(hidden, dim, out_mask)
        self.gate = MaskedLinear(hidden, dim, out_mask)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., D), context (..., C) → z' (..., D) and log|det dz'/dz| (...)."""
        h = F.elu(self.hidden(z) + self.context(context))
        gate = self.gate(h) + FORGET_BIAS
        sigma = torch.sigmoid(gate)
        return sigma * z + (1 - sigma) * self.shift(h), F.logsigmoid(gate).sum(-1)


class IAFVAE(VAE):
    family = "iaf_vae"
    config_class = IAFVAEConfig

    def __init__(self, config: IAFVAEConfig) -> None:
        super().__init__(config, encoder_outputs=2 * config.latent_dim + config.context_dim)
        self.flows = nn.ModuleList(
            IAFStep(config.latent_dim, config.flow_hidden, config.context_dim) for _ in range(config.flow_steps)
        )

    def posterior(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel values (N, C, H, W), eps (..., N, D) → z_T (..., N, D) and log q(z_T | x) (...)."""
        d = self.config.latent_dim
        mean, log_var, context = self.encoder_outputs(x).split([d, d, self.config.context_dim], dim=1)
        z = mean + (0.5 * log_var).exp() * eps
        log_q = gaussian_log_density(z, mean, log_var)
        context = context.expand(*z.shape[:-1], -1)
        for t, step in enumerate(self.flows):
            if t:
                z = z.flip(-1)
            z, log_det = step(z, context)
            log_q = log_q - log_det
        return z, log_q

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel values → the flowed posterior mode's code z_T (eps = 0), (N, D), and log q(z_T | x), (N,)."""
        return self.posterior(self.check_pixels(x), torch.zeros(()))

    def training_loss(self, x, labels):
        # Single-sample ELBO; the KL has no closed form under a flowed posterior.
        x = self.check_pixels(x)
        log_w = self.importance_log_weights(x, torch.randn(1, x.shape[0], self.config.latent_dim))
        loss = -log_w.mean()
        return loss, {"neg_elbo": loss.item()}
