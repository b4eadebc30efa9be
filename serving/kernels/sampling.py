"""Per-sample deterministic noise and the choice of a pixel value from logits.

DESIGN.md, "The sampling engine": a request's seed gives each sample its own noise tensor,
generated independently of batch composition, so the same (model, seed, sample index) yields
the same image alone or batched, naive or cached, in every runtime. Randomness is drawn here,
outside any exported graph, and passed in as a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1


def sample_stream_seed(seed: int, index: int, stream: int = 0) -> int:
    """Mixes a request seed, a sample index and a stream tag into a 63-bit generator seed.

    SplitMix64 finalisation: neighbouring inputs give unrelated streams, so sample 3 of
    seed 7 never shares noise with sample 4 of seed 7 or sample 3 of seed 8, and a model
    that needs two kinds of noise (a latent and pixel noise) takes them from two streams.

    Args:
        seed: the request's seed (any non-negative integer below 2**64).
        index: the sample's index within its request (0-based).
        stream: which of a sample's independent noise streams (0-based).
    """
    if seed < 0 or index < 0 or stream < 0:
        raise ValueError(f"seed, index and stream must be non-negative, got {seed}, {index}, {stream}")
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9 + stream * 0xD6E8FEB86659FD93) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z >> 1


def _per_sample(seed: int, indices: Sequence[int], stream: int, draw) -> torch.Tensor:
    samples = []
    for index in indices:
        generator = torch.Generator().manual_seed(sample_stream_seed(seed, index, stream))
        samples.append(draw(generator))
    return torch.stack(samples)


def uniform_noise(seed: int, indices: Sequence[int], shape: Sequence[int], stream: int = 0) -> torch.Tensor:
    """Uniform [0, 1) noise, one independent tensor per sample index.

    Returns:
        float32 tensor of shape (len(indices), *shape).
    """
    return _per_sample(seed, indices, stream, lambda g: torch.rand(tuple(shape), generator=g))


def gaussian_noise(seed: int, indices: Sequence[int], shape: Sequence[int], stream: int = 0) -> torch.Tensor:
    """Standard normal noise, one independent tensor per sample index (latents, eps).

    Returns:
        float32 tensor of shape (len(indices), *shape).
    """
    return _per_sample(seed, indices, stream, lambda g: torch.randn(tuple(shape), generator=g))


def choose_pixels(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """Picks a category per position by inverse CDF of softmax(logits / temperature).

    The choice is a pure function of (logits, noise): the value is the number of CDF entries
    strictly below the noise. Temperature 0 takes the argmax (ties to the lowest value).

    Args:
        logits: (N, L, ...) unnormalised log-probabilities over L values.
        noise: (N, ...) uniform [0, 1) noise, one number per position.
        temperature: >= 0.

    Returns:
        int64 tensor of shape (N, ...) with values in [0, L).
    """
    if temperature < 0 or temperature != temperature:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=1)
    probs = torch.softmax(logits.float() / temperature, dim=1)
    cdf = probs.cumsum(dim=1)  # (N, L, ...)
    below = (cdf < noise.unsqueeze(1)).sum(dim=1)
    # float rounding can leave cdf[-1] a hair under 1; noise above it still means "last value".
    return below.clamp_(max=logits.shape[1] - 1)
