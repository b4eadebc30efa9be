"""PixelCNN++: the discretized logistic mixture, causality without a blind spot, and the row-strip step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.export.data import fixed_held_out, load_mnist5k
from genserve.export.models import PixelCNNPPConfig
from genserve.export.models.pixelcnn_pp import DownRightShiftedConv, DownShiftedConv, discretized_mixture_log_probs
from genserve.export.steps import eager_runner, step_program
from genserve.serving.engine import EngineConfig, SamplingEngine
from tests.conftest import make_model
from tests.rounding import assert_within_rounding, rounding_sigma


def reference_probs(params: torch.Tensor, levels: int) -> torch.Tensor:
    """P(level) = sum_m pi_m (sigmoid(a) - sigmoid(b)) over every level, straight from the definition (float64)."""
    logit_weights, means, log_scales = params.double().chunk(3, dim=1)  # (N, M)
    weights = torch.softmax(logit_weights, dim=1)
    scales = log_scales.clamp(min=-7.0).exp()
    edges = torch.linspace(-1, 1, levels, dtype=torch.float64)[:-1] + 1.0 / (levels - 1)  # (L-1,) between bins
    cdf = torch.sigmoid((edges.view(1, -1, 1) - means.unsqueeze(1)) / scales.unsqueeze(1))  # (N, L-1, M)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf, torch.ones_like(cdf[:, :1])], dim=1)  # (N, L+1, M)
    return ((cdf[:, 1:] - cdf[:, :-1]) * weights.unsqueeze(1)).sum(2)  # (N, L)


@pytest.mark.parametrize("levels", [2, 5, 256])
def test_the_mixture_gives_each_level_its_bin_mass(levels):
    # Means inside and far outside [-1, 1], log scales from the floor (-7: bins 8.6 scales wide) to
    # wide (3: bins 0.0004 scales wide, the series branch): the stable form equals the definition.
    generator = torch.Generator().manual_seed(0)
    n, m = 400, 4
    params = torch.cat([torch.randn(n, m, generator=generator) * 3,
                        torch.rand(n, m, generator=generator) * 6 - 3,
                        torch.rand(n, m, generator=generator) * 10 - 7], dim=1).double()
    log_probs = discretized_mixture_log_probs(params, torch.arange(levels).view(1, -1), levels)
    want = reference_probs(params, levels)
    # float64 throughout; the definition's differences of CDFs lose digits where P is tiny, so
    # compare probabilities absolutely at a few hundred float64 roundings.
    assert torch.allclose(log_probs.exp(), want, rtol=0, atol=1e-13)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-13)
    # Where the definition is accurate (P not tiny) the log-probabilities agree relatively too.
    fine = want > 1e-6
    assert torch.allclose(log_probs[fine], want[fine].log(), rtol=0, atol=1e-9)


def test_each_pixels_distribution_sees_no_later_pixel_and_no_blind_spot():
    # Exactness of the shifts: the Jacobian of the mixture parameters at pixel p with respect to the
    # (continuous) network input is exactly zero at p and after it, across the down- and upsampling;
    # and non-zero on the pixel to the left and on the row above from j-1 to j+2 (PixelCNN's masked
    # 3x3 stack never sees (i-1, j+2): its blind spot).
    model = make_model("pixelcnn_pp").double()
    size = model.config.image_size
    inputs = torch.randn(1, 2, size, size, dtype=torch.float64)

    def params(x):
        return model.mixture_params(*model.initial_streams(x))

    jacobian = torch.autograd.functional.jacobian(params, inputs)  # (1, 3M, H, W, 1, 2, H, W)
    sensitivity = jacobian.abs().sum(dim=(0, 1, 4, 5)).reshape(size, size, size, size)  # [pixel, input pixel]
    for i in range(size):
        for j in range(size):
            seen = sensitivity[i, j].flatten() != 0
            assert not seen[i * size + j:].any(), (i, j)
            near = [(i, j - 1)] + [(i - 1, j + d) for d in (-1, 0, 1, 2)]
            for a, b in near:
                if 0 <= a and 0 <= b < size:
                    assert sensitivity[i, j, a, b] > 0, ((i, j), (a, b))


def test_log_prob_is_the_sum_of_each_pixels_log_probability_of_its_level():
    # float64: the two paths evaluate the same formula on different shapes, so they agree to float64
    # rounding; the normalised logits are what naive sampling and the engine choose from.
    model = make_model("pixelcnn_pp").double()
    x = torch.randint(0, model.config.pixel_levels, (3, 1, 8, 8))
    logits = model.logits(x)  # (N, L, 1, H, W)
    assert torch.allclose(logits.exp().sum(1), torch.ones_like(logits[:, 0]), rtol=0, atol=1e-12)
    per_pixel = logits.gather(1, x.unsqueeze(1)).flatten(1).sum(1)
    assert torch.allclose(model.log_prob(x), per_pixel, rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("size, levels", [(4, 256), (8, 5)])
def test_the_step_program_samples_like_the_naive_loop(size, levels, temperature):
    # 4x4 at the shipped model's 256 levels; 8x8 (resolutions 8, 4, 2) for coarse rows carried through
    # three image rows. Each pixel's logits come out within float32 rounding of the naive pass's, so an
    # image could differ only if a noise value fell within ~1e-7 of a CDF edge.
    model = make_model("pixelcnn_pp", image_size=size, pixel_levels=levels)
    engine = SamplingEngine(eager_runner(model), EngineConfig(num_slots=3))
    for seed in range(3):
        assert np.array_equal(engine.generate(seed, 4, temperature), model.sample(4, seed, temperature).numpy())


def test_the_u_stream_runs_once_per_row_and_the_pixel_steps_replay_it():
    # The u stream (rows above only) is the refresh's work; a pixel step runs no u-stream convolution.
    program = step_program(make_model("pixelcnn_pp"))
    assert program.span == 1 and program.start is None
    assert [(s.name, s.shape[1]) for s in program.states] == [
        (f"{kind}{s}", 8 >> s) for kind in ("u_rows", "ul_rows", "u_values") for s in range(3)]
    calls = {"u": 0, "ul": 0}
    model = program.step.module.model
    for module in model.modules():
        kind = {DownShiftedConv: "u", DownRightShiftedConv: "ul"}.get(type(module))
        if kind:
            module.register_forward_hook(lambda *_, kind=kind: calls.__setitem__(kind, calls[kind] + 1))
    with torch.no_grad():
        program.step.module(*program.step.example_inputs(2))
        assert calls["u"] == 1 and calls["ul"] > 0  # the first layer's u convolution only (its input is pixels)
        program.refresh.module(*program.refresh.example_inputs(2))
    assert calls["u"] > 2


@pytest.mark.parametrize("overrides, message", [
    (dict(channels=3), "single-channel"),
    (dict(num_classes=10), "unconditional"),
    (dict(image_size=6, num_scales=3), "divide by 2"),
    (dict(filters=0), "bad sizes"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_rejects_what_the_model_cannot_be(overrides, message):
    with pytest.raises(ValueError, match=message):
        PixelCNNPPConfig(**overrides)


def test_the_shipped_models_step_logits_equal_its_full_network_on_a_real_digit(shipped):
    # The exactness claim on the shipped 256-level model: fed a held-out digit pixel by pixel, the
    # step program's log-probabilities of every level at every pixel are the full network's, within
    # the float32 rounding of the full network (tests/rounding.py).
    model = shipped("pixelcnn_pp_mnist").model
    digit = fixed_held_out(load_mnist5k(), 256).images[:1].long()
    size, levels = model.config.image_size, model.config.pixel_levels
    engine = SamplingEngine(eager_runner(model), EngineConfig(num_slots=1))
    recorded = []

    def forced(logits, noise, divisor, greedy):
        position = len(recorded)
        recorded.append(logits.detach().clone())
        return digit[:, :, position // size, position % size]

    engine.runner.graphs["step"].choose = forced
    job = engine.submit(0, 1)
    engine.run_until_idle()
    steps = torch.stack(recorded, -1).view(1, levels, 1, size, size)
    with torch.no_grad():
        full = model.logits(digit)
    (sigma,) = rounding_sigma(model.logits, [digit])
    assert_within_rounding(steps.numpy(), full.numpy(), sigma, "pixelcnn_pp_mnist step logits")
    assert np.array_equal(job.images, digit.numpy())
