"""Per-sample noise and the inverse-CDF pixel choice."""

from __future__ import annotations

import pytest
import torch

from genserve.serving import fused
from genserve.serving.kernels.sampling import (
    choose_pixels,
    gaussian_noise,
    noise_for,
    noise_rows,
    sample_stream_seed,
    uniform_noise,
)


def test_noise_of_a_sample_depends_only_on_seed_index_and_stream():
    both = uniform_noise(5, [0, 1], (3, 3))
    assert torch.equal(uniform_noise(5, [1], (3, 3))[0], both[1])
    assert not torch.equal(both[0], both[1])
    assert not torch.equal(uniform_noise(6, [0], (3, 3))[0], both[0])
    assert not torch.equal(uniform_noise(5, [0], (3, 3), stream=1)[0], both[0])
    assert gaussian_noise(5, [0, 1], (4,)).shape == (2, 4)


@pytest.mark.parametrize("native", [True, False])
def test_each_row_is_what_a_fresh_generator_seeded_with_its_stream_seed_draws(native):
    # native: the operator library's parallel draw (`make setup` builds it); else the Python loop.
    assert fused.load_ops(), fused.load_ops().reason
    keys = [(5, 0), (9, 3), (5, 2), (2**64 - 1, 10**6)] * 10
    seeds = [sample_stream_seed(seed, index, 1) for seed, index in keys]
    for gaussian, draw in ((False, torch.rand), (True, torch.randn)):
        noise = noise_for(keys, (2, 30), 1, gaussian) if native else noise_rows(seeds, (2, 30), gaussian)
        assert noise.shape == (len(keys), 2, 30) and noise.dtype == torch.float32
        for row, seed in enumerate(seeds):
            assert torch.equal(noise[row], draw((2, 30), generator=torch.Generator().manual_seed(seed)))
    assert noise_for([], (2, 3)).shape == noise_rows([], (2, 3)).shape == (0, 2, 3)


def test_the_native_draw_refuses_bad_seeds_naming_them():
    assert fused.load_ops(), fused.load_ops().reason
    with pytest.raises(RuntimeError, match="seeds: must be non-negative"):
        torch.ops.genserve.stream_noise(torch.tensor([3, -1]), [2], False)
    with pytest.raises(RuntimeError, match="seeds: expected a 1-dim int64 CPU tensor"):
        torch.ops.genserve.stream_noise(torch.tensor([[3]]), [2], False)


def test_stream_seeds_are_distinct_and_in_range():
    seeds = {sample_stream_seed(s, i, k) for s in range(20) for i in range(20) for k in range(3)}
    assert len(seeds) == 1200
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="non-negative"):
        sample_stream_seed(-1, 0)


def test_inverse_cdf_picks_the_interval_holding_the_noise():
    probs = torch.tensor([0.2, 0.5, 0.3])
    logits = probs.log().view(1, 3).expand(7, 3)
    noise = torch.tensor([0.0, 0.19, 0.21, 0.69, 0.71, 0.99, 0.999999])
    assert choose_pixels(logits, noise, 1.0).tolist() == [0, 0, 1, 1, 2, 2, 2]


def test_inverse_cdf_frequencies_match_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    noise = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    values = choose_pixels(probs.log().view(1, 3).expand(len(noise), 3), noise, 1.0)
    frequencies = torch.bincount(values, minlength=3).float() / len(noise)
    assert torch.allclose(frequencies, probs, atol=0.005)


def test_temperature_sharpens_and_zero_takes_the_argmax():
    logits = torch.tensor([[0.0, 1.0, 0.5]])
    assert choose_pixels(logits, torch.tensor([0.0]), 0.0).item() == 1
    # at T = 0.01 almost all mass is on the argmax: noise 0.01 falls in its interval
    assert choose_pixels(logits, torch.tensor([0.01]), 0.01).item() == 1
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        choose_pixels(logits, torch.tensor([0.5]), -0.1)


def test_per_row_temperatures_mix_greedy_and_sampled_rows():
    logits = torch.tensor([[0.0, 1.0, 0.5]]).expand(3, 3)
    noise = torch.tensor([0.01, 0.01, 0.99])
    # row 0: T = 0 → argmax (1); row 1: T = 1, noise 0.01 → value 0; row 2: T = 1, noise 0.99 → value 2
    chosen = choose_pixels(logits, noise, torch.tensor([0.0, 1.0, 1.0]))
    assert chosen.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        choose_pixels(logits, noise, torch.tensor([1.0, float("nan"), 1.0]))
