"""The Fréchet distance between the digit classifier's features on two sets of images.

Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017 (FID), with the shipped digit classifier in place of Inception:
each set's features are summarised by a Gaussian (mean, covariance) and
  d² = |mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a^½ S_b S_a^½)^½).
The last trace is computed from the eigenvalues of the symmetric S_a^½ S_b S_a^½ (equal to those
of S_a S_b), in float64, so no complex square roots appear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from genserve.serving.kernels.sampling import sample_stream_seed

from ..checkpoint import Checkpoint
from ..data import fixed_held_out, load_dataset
from ..steps import sample_images
from .classifier import DigitClassifier, load_classifier

FEATURE_BATCH = 250


@dataclass(frozen=True)
class FIDConfig:
    samples: int = 1000
    seed: int = 0
    batch_size: int = 100  # samples drawn per call of the model's sampler

    def __post_init__(self) -> None:
        if self.samples < 2 or self.batch_size < 1 or self.seed < 0:
            raise ValueError(f"samples must be >= 2, batch_size >= 1 and seed >= 0: {self}")


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features → mean (D,) and unbiased covariance (D, D), float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got {tuple(features.shape)}")
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The squared Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    mean_a, cov_a = gaussian_statistics(features_a)
    mean_b, cov_b = gaussian_statistics(features_b)
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.inference_mode()
def features_of(classifier: DigitClassifier, pixels: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.cat([
        classifier.features(pixels[start : start + FEATURE_BATCH], levels)
        for start in range(0, len(pixels), FEATURE_BATCH)
    ])


def draw_samples(checkpoint: Checkpoint, config: FIDConfig, progress: bool = True) -> torch.Tensor:
    """config.samples samples from the model; batch b uses seed sample_stream_seed(seed, b).

    Conditional models get labels cycling through the classes, so every class is represented.
    """
    model = checkpoint.model
    classes = model.config.num_classes
    batches = []
    starts = range(0, config.samples, config.batch_size)
    for b, start in enumerate(tqdm(starts, desc=f"sampling {checkpoint.name}", unit="batch", disable=not progress)):
        count = min(config.batch_size, config.samples - start)
        labels = (torch.arange(start, start + count) % classes) if classes else None
        batches.append(sample_images(model, count, sample_stream_seed(config.seed, b), labels=labels))
    return torch.cat(batches)


def sample_fid(checkpoint: Checkpoint, config: FIDConfig = FIDConfig(), data: str | None = None,
               classifier: DigitClassifier | None = None, progress: bool = True) -> dict:
    """FID between the held-out images (in the model's pixel levels) and the model's samples."""
    model = checkpoint.model
    c = model.config
    if c.sample_shape != (1, 28, 28):
        raise ValueError(
            f"FID uses a 28x28 digit classifier; {checkpoint.name} makes samples of shape {c.sample_shape}"
        )
    classifier = classifier or load_classifier()
    dataset = load_dataset(data or checkpoint.training.get("data", "mnist5k"))
    reference = fixed_held_out(dataset, c.pixel_levels).images
    samples = draw_samples(checkpoint, config, progress)
    distance = frechet_distance(
        features_of(classifier, reference, c.pixel_levels), features_of(classifier, samples, c.pixel_levels)
    )
    return {"fid": round(distance, 3), "samples": config.samples, "seed": config.seed,
            "reference": f"{len(reference)} held-out images"}
