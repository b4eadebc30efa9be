"""Per-sample deterministic noise and the choice of a pixel value from logits.

Determinism: a request's seed gives each sample its own noise tensor,
generated independently of batch composition, so the same (model, seed, sample index) yields
the same image alone or batched, naive or cached, in every runtime. Randomness is drawn here,
outside any exported graph, and passed in as a tensor.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from ..fused import load_ops

_MASK64 = (1 << 64) - 1
# The stream of z for a model whose pixels are drawn by the engine (which takes stream 0): a PixelVAE.
LATENT_STREAM = 1


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


def noise_for(
    keys: Sequence[tuple[int, int]], shape: Sequence[int], stream: int = 0, gaussian: bool = False
) -> torch.Tensor:
    """Noise for arbitrary (seed, index) pairs, one row each: rows of different requests can share a batch.

    Row k is what a fresh torch.Generator seeded with `sample_stream_seed(*keys[k], stream)` draws.
    The engine draws the rows of every sample it admits, thousands at once at large batch sizes:
    the fused operator library's `stream_noise` draws them on all cores, and without the library
    a Python loop draws the same numbers.

    Returns:
        float32 tensor of shape (len(keys), *shape), uniform [0, 1) or standard normal.
    """
    seeds = [sample_stream_seed(seed, index, stream) for seed, index in keys]
    if seeds and load_ops():
        return torch.ops.genserve.stream_noise(torch.tensor(seeds), list(shape), gaussian)
    return noise_rows(seeds, shape, gaussian)


def noise_rows(seeds: Sequence[int], shape: Sequence[int], gaussian: bool = False) -> torch.Tensor:
    """`noise_for` of given stream seeds, drawn in Python: (len(seeds), *shape) float32."""
    draw = torch.randn if gaussian else torch.rand
    # One generator reseeded per row draws what a fresh one per row would, at about half the cost.
    generator = torch.Generator()
    noise = torch.empty((len(seeds), *shape))
    for row, seed in enumerate(seeds):
        draw(tuple(shape), generator=generator.manual_seed(seed), out=noise[row])
    return noise


def uniform_noise(seed: int, indices: Sequence[int], shape: Sequence[int], stream: int = 0) -> torch.Tensor:
    """Uniform [0, 1) noise, one independent tensor per sample index of one seed.

    Returns:
        float32 tensor of shape (len(indices), *shape).
    """
    return noise_for([(seed, i) for i in indices], shape, stream)


def gaussian_noise(seed: int, indices: Sequence[int], shape: Sequence[int], stream: int = 0) -> torch.Tensor:
    """Standard normal noise, one independent tensor per sample index (latents, eps).

    Returns:
        float32 tensor of shape (len(indices), *shape).
    """
    return noise_for([(seed, i) for i in indices], shape, stream, gaussian=True)


def choose_pixels(logits: torch.Tensor, noise: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Picks a category per position by inverse CDF of softmax(logits / temperature).

    The choice is a pure function of (logits, noise, temperature): the value is the number of
    CDF entries strictly below the noise. Temperature 0 takes the argmax (ties to the lowest).

    Args:
        logits: (N, L, ...) unnormalised log-probabilities over L values.
        noise: (N, ...) uniform [0, 1) noise, one number per position.
        temperature: >= 0; a float for the whole batch or a (N,) tensor, one per row.

    Returns:
        int64 tensor of shape (N, ...) with values in [0, L).
    """
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    if not torch.all(t >= 0):  # also catches NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if t.dim() == 0:
        if t.item() == 0:
            return logits.argmax(dim=1)
        t = t.expand(logits.shape[0])
    return inverse_cdf_choice(logits, noise, t)


def inverse_cdf_choice(logits: torch.Tensor, noise: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """`choose_pixels` without validation or Python branches: the form exported step graphs trace.

    Args:
        logits: (N, L, ...); noise: (N, ...); temperature: (N,) or (N, 1), >= 0.
    """
    return choose_at_temperature(logits, noise, *temperature_rows(temperature, logits.dim()))


def temperature_rows(temperature: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row temperatures shaped for (N, L, ...) logits of `dims` axes.

    Returns:
        divisor (N, 1, ...) of `dims` axes, 1 where T = 0 (those rows take the argmax), and
        greedy (N, 1, ...) of `dims - 1` axes, True where T = 0. A step graph computes these
        once per call, not once per pixel.
    """
    t = temperature.reshape(-1)
    divisor = torch.where(t > 0, t, torch.ones_like(t)).reshape(-1, *([1] * (dims - 1)))
    return divisor, (t == 0).reshape(-1, *([1] * (dims - 2)))


def choose_at_temperature(
    logits: torch.Tensor, noise: torch.Tensor, divisor: torch.Tensor, greedy: torch.Tensor
) -> torch.Tensor:
    """The choice itself, from `temperature_rows`'s divisor and greedy mask."""
    probs = torch.softmax(logits.float() / divisor, dim=1)
    cdf = probs.cumsum(dim=1)  # (N, L, ...), non-decreasing
    # The value is the count of CDF entries below the noise. The last entry is left out: float
    # rounding can leave it a hair under 1, and noise above it still means "last value".
    chosen = (cdf[:, :-1] < noise.unsqueeze(1)).sum(dim=1)
    return torch.where(greedy, logits.argmax(dim=1), chosen)


def naive_sample(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    temperature: float | torch.Tensor,
    levels: int,
) -> torch.Tensor:
    """Sequential sampling by full recomputation: one logits pass per pixel (the slow reference).

    Args:
        logits_fn: pixel values (N, C, *S) int64 → logits (N, L, C, *S), causally masked; S is
            (H, W) for images, (T,) for audio, and positions go in raster order.
        noise: (N, C, *S) uniform noise, one number per pixel (from `noise_for`).
        temperature: a float or (N,) per-row temperatures.
        levels: L, the number of pixel values.

    Returns:
        (N, C, *S) int64 pixel values. The cached engine must reproduce these exactly.
    """
    x = torch.zeros(noise.shape, dtype=torch.long)
    for position in itertools.product(*map(range, noise.shape[2:])):
        at = (slice(None), slice(None), *position)
        logits = logits_fn(x)[(Ellipsis, *position)]  # (N, L, C)
        x[at] = choose_pixels(logits, noise[at], temperature)
    return x
