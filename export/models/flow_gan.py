"""FlowGAN: a RealNVP trained with the hybrid adversarial + maximum-likelihood objective.

Grover, Dhar & Ermon, "Flow-GAN: Combining Maximum Likelihood and Adversarial Learning in
Generative Models", AAAI 2018. The generator is the flow of realnvp.py, so the exact
(dequantised) likelihood stays available however it was trained. Per batch:
- a discriminator D (on images in [0, 1]) learns to tell dequantised real images from flow
  samples;
- the flow minimises NLL per dimension + adversarial_weight * (non-saturating GAN loss).
The paper trains the adversarial part as a WGAN with a gradient penalty; the non-saturating
loss used here is the one the other genserve GANs use. Scores: the dequantised log-likelihood
(a bound on the discrete one, like RealNVP's) and D's logit, labelled not a likelihood.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Score
from .discriminator import PixelDiscriminator
from .realnvp import RealNVP, RealNVPConfig


@dataclass(frozen=True)
class FlowGANConfig(RealNVPConfig):
    discriminator_channels: int = 32
    adversarial_weight: float = 0.1  # against the NLL in nats per dimension

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (the discriminator), got {self.image_size}")
        if self.discriminator_channels < 1 or self.adversarial_weight < 0:
            raise ValueError(
                f"discriminator_channels must be >= 1 and adversarial_weight >= 0, got "
                f"{self.discriminator_channels}, {self.adversarial_weight}"
            )


class FlowGAN(RealNVP):
    family = "flow_gan"
    config_class = FlowGANConfig

    def __init__(self, config: FlowGANConfig) -> None:
        super().__init__(config)
        self.discriminator = PixelDiscriminator(config, config.discriminator_channels)

    def unit_interval(self, y: torch.Tensor) -> torch.Tensor:
        """Logit space → images in [0, 1] (differentiable; to_pixels without the rounding)."""
        a = self.config.alpha
        return ((torch.sigmoid(y) - a) / (1 - 2 * a)).clamp(0, 1)

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """Unvalidated pixel values (also the exported graph) → D's logit (N,) at the bin centres. Not a likelihood."""
        centres = (x.to(self.discriminator.logit.weight.dtype) + 0.5) / self.config.pixel_levels
        return self.discriminator(centres)[1]

    def scores(self, x, labels=None, seed: int = 0) -> list[Score]:
        likelihood = super().scores(x, labels, seed)
        logit = self.discriminate(self.check_pixels(x))
        return [*likelihood, Score(logit, method="discriminator", is_likelihood=False, unit="logit")]

    # ---- hybrid training ----------------------------------------------------------------
    def configure_optimizers(self, learning_rate: float) -> list[torch.optim.Optimizer]:
        flow = [p for name, p in self.named_parameters() if not name.startswith("discriminator.")]
        return [
            torch.optim.Adam(flow, lr=learning_rate),
            torch.optim.Adam(self.discriminator.parameters(), lr=learning_rate, betas=(0.5, 0.999)),
        ]

    def train_step(self, x, labels, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, float]:
        flow_opt, d_opt = optimizers
        c = self.config
        real = (x.float() + torch.rand(x.shape)) / c.pixel_levels
        fake = self.unit_interval(self.flow_inverse(torch.randn(x.shape)))
        d_opt.zero_grad(set_to_none=True)
        d_loss = (F.softplus(-self.discriminator(real)[1]).mean()
                  + F.softplus(self.discriminator(fake.detach())[1]).mean())
        d_loss.backward()
        d_opt.step()
        flow_opt.zero_grad(set_to_none=True)
        nll, figures = self.training_loss(x, labels)
        gan_loss = F.softplus(-self.discriminator(fake)[1]).mean()
        (nll / c.dims + c.adversarial_weight * gan_loss).backward()
        flow_opt.step()
        return {**figures, "d_loss": d_loss.item(), "g_loss": gan_loss.item()}


