"""What PixelCNN-style models share: exact log-likelihood and naive sequential sampling.

A subclass only defines `logits(x, labels)`: a causally masked network whose output at pixel
(i, j) depends on pixels before it in raster order. Everything else follows from the chain
rule log p(x) = sum_i log p(x_i | x_<i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genserve.serving.kernels.sampling import naive_sample, uniform_noise

from .base import SAMPLE, SCORE, GenerativeModel, Score


class AutoregressiveModel(GenerativeModel):
    capabilities = frozenset({SAMPLE, SCORE})

    def logits(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, *S) pixel values → (N, L, C, *S) logits over the L pixel levels (S: (H, W) or (T,))."""
        raise NotImplementedError

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values → floats in [-1, 1] of the weights' dtype, the network's input."""
        return x.to(next(self.parameters()).dtype) * (2.0 / (self.config.pixel_levels - 1)) - 1.0

    def log_prob(self, x: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
        x = self.check_pixels(x)
        labels = self.check_labels(labels, x.shape[0])
        logits = self.logits(x, labels)  # (N, L, C, H, W)
        nll = F.cross_entropy(logits, x, reduction="none")  # (N, C, H, W)
        return -nll.flatten(1).sum(1)

    def scores(self, x: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0) -> list[Score]:
        return [Score(self.log_prob(x, labels), method="exact")]

    def training_loss(self, x, labels):
        nll = -self.log_prob(x, labels).mean()
        return nll, {"nll": nll.item(), "bpd": nll.item() / (self.config.dims * 0.6931471805599453)}

    @torch.inference_mode()
    def sample(self, n: int, seed: int, temperature: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Naive sequential sampling: one full forward pass per pixel (the slow reference).

        The serving engine's cached sampler must reproduce these images exactly from the same
        noise; this loop is the ground truth it is tested against.
        """
        labels = self.check_sample_args(n, seed, temperature, labels)
        c = self.config
        noise = uniform_noise(seed, range(n), c.sample_shape)  # (N, C, H, W) or (N, C, T)
        return naive_sample(lambda x: self.logits(x, labels), noise, temperature, c.pixel_levels)
