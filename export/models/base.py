"""The family-neutral interface every genserve model implements.

A model takes and returns *pixel values*: integer tensors of shape (N, C, H, W) with values in
[0, config.pixel_levels) (2 for binarised images, 256 for 8-bit); an audio model's are (N, C, T)
mu-law codes. What each family can do is
listed in `capabilities`; asking for anything else
raises `UnsupportedCapability` naming the family and what it does support.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from genserve.serving.sampling_args import check_labels, check_sampling

SAMPLE, ENCODE, DECODE, SCORE = "sample", "encode", "decode", "score"


class UnsupportedCapability(NotImplementedError):
    """A family was asked for something it cannot do (e.g. encoding with a PixelCNN)."""


@dataclass(frozen=True)
class SampleConfig:
    """What every model config shares: channels, value levels, optional classes, and a sample shape."""

    channels: int = 1
    pixel_levels: int = 2
    num_classes: int | None = None
    modality: ClassVar[str]

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        if not 2 <= self.pixel_levels <= 256:
            raise ValueError(f"pixel_levels must be in [2, 256], got {self.pixel_levels}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be None or >= 2, got {self.num_classes}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (C, H, W) for an image, (C, T) for audio."""
        raise NotImplementedError

    @property
    def dims(self) -> int:
        """Number of values in a sample (C*H*W, or C*T), the denominator of bits/dim."""
        return math.prod(self.sample_shape)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected some of {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class ImageConfig(SampleConfig):
    """The image space a model lives in: square images of `image_size` pixels a side."""

    image_size: int = 28
    modality: ClassVar[str] = "image"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 2:
            raise ValueError(f"image_size must be >= 2, got {self.image_size}")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


@dataclass(frozen=True)
class AudioConfig(SampleConfig):
    """Fixed-length waveforms of `length` samples at `sample_rate` Hz, as `pixel_levels` codes (mu-law).

    frame: samples per progress report (a streamed sample arrives frame by frame; divides `length`).
    """

    pixel_levels: int = 256
    length: int = 6400
    sample_rate: int = 8000
    frame: int = 320
    modality: ClassVar[str] = "audio"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.length < 2 or self.sample_rate < 1 or self.frame < 1 or self.length % self.frame:
            raise ValueError(
                f"need length >= 2, sample_rate >= 1 and a frame dividing the length, got length={self.length} "
                f"sample_rate={self.sample_rate} frame={self.frame}"
            )

    @property
    def sample_shape(self) -> tuple[int, int]:
        return (self.channels, self.length)


@dataclass(frozen=True)
class Score:
    """Per-image figures from `scores()`, labelled with what they are.

    values: (N,) log p(x) in nats (or a bound on it); for a discriminator, its logit; for a
        reconstruction, log p(x | code) in nats.
    method: "exact", "elbo", "iwae-K", "dequantised", "reconstruction" or "...discriminator".
    is_likelihood: False for figures that are not log-likelihoods at all.
    is_bound: True where values is a lower bound on log p(x).
    """

    values: torch.Tensor
    method: str
    is_likelihood: bool = True
    is_bound: bool = False
    unit: str = "nats"  # of values: "logit" for discriminators

    def bits_per_dim(self, dims: int) -> torch.Tensor:
        """Negative log-likelihood in bits per dimension: -log p(x) / (ln 2 * dims)."""
        if not self.is_likelihood:
            raise ValueError(f"{self.method} values are not a likelihood; bits/dim is undefined")
        return -self.values / (torch.log(torch.tensor(2.0)) * dims)


class GenerativeModel(nn.Module):
    """Base class of the model zoo: one family per subclass.

    Subclasses set `family`, `config_class` and `capabilities`, and override the methods of
    the capabilities they list plus `training_loss`.
    """

    family: ClassVar[str]
    config_class: ClassVar[type[SampleConfig]]
    capabilities: ClassVar[frozenset[str]]

    def __init__(self, config: SampleConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.family} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    # ---- capabilities -------------------------------------------------------------------
    def sample(
        self, n: int, seed: int, temperature: float = 1.0, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draws n images (N, C, H, W) int64; sample i depends only on (seed, i)."""
        raise self._unsupported(SAMPLE)

    def log_prob(self, x: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
        """log p(x) in nats per image (a bound for latent-variable models)."""
        raise self._unsupported("compute log p(x)")

    def scores(self, x: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0) -> list[Score]:
        """Every figure this family reports for x, each labelled (see `Score`)."""
        raise self._unsupported(SCORE)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise self._unsupported(ENCODE)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise self._unsupported(DECODE)

    # ---- training hooks -----------------------------------------------------------------
    def training_loss(
        self, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise on a batch of pixel values, and figures for the progress bar."""
        raise NotImplementedError

    def configure_optimizers(self, learning_rate: float) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.parameters(), lr=learning_rate)]

    def train_step(
        self, x: torch.Tensor, labels: torch.Tensor | None, optimizers: Sequence[torch.optim.Optimizer]
    ) -> dict[str, float]:
        """One optimisation step; adversarial families override this."""
        (optimizer,) = optimizers
        optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.training_loss(x, labels)
        loss.backward()
        optimizer.step()
        return metrics

    # ---- validation shared by every family ----------------------------------------------
    def check_pixels(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """Validates a batch of pixel values and returns it as int64."""
        c = self.config
        expected = c.sample_shape
        if x.dim() != 1 + len(expected) or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"{name} must hold integer pixel values, got dtype {x.dtype}")
        x = x.long()
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= c.pixel_levels):
            raise ValueError(
                f"{name} values must lie in [0, {c.pixel_levels}), got range "
                f"[{int(x.min())}, {int(x.max())}]"
            )
        return x

    def check_labels(self, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Validates class labels: required (N,) in range for conditional models, else None."""
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (n,) or labels.is_floating_point():
                raise ValueError(
                    f"labels must be an integer tensor of shape ({n},), got {labels.dtype} {tuple(labels.shape)}"
                )
        checked = check_labels(None if labels is None else labels.cpu().numpy(), n, self.config.num_classes)
        return None if checked is None else torch.from_numpy(checked).to(labels.device)

    def check_sample_args(self, n: int, seed: int, temperature: float, labels: torch.Tensor | None
                          ) -> torch.Tensor | None:
        """`sample`'s arguments, checked as every sampling path checks them; returns the labels."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        check_sampling(seed, range(n), temperature, None, None)
        return self.check_labels(labels, n)

    def _unsupported(self, what: str) -> UnsupportedCapability:
        return UnsupportedCapability(
            f"{self.family} models cannot {what}; they support: {', '.join(sorted(self.capabilities))}"
        )
