"""PixelCNN++: the discretized logistic mixture, causality without a blind spot, the row-strip step and its
fused operators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.export.data import fixed_held_out, load_mnist5k
from genserve.export.fused import fused_runner, packed_weights
from genserve.export.models import PixelCNNPPConfig
from genserve.export.models.pixelcnn_pp import DownRightShiftedConv, DownShiftedConv, discretized_mixture_log_probs
from genserve.export.steps import PixelCNNPPLayout, eager_runner, step_program
from genserve.serving import fused
from genserve.serving.artifacts import load_manifest
from genserve.serving.engine import EngineConfig, FusedStepRunner, SamplingEngine, load_step_runner
from tests.conftest import make_model
from tests.rounding import assert_within_rounding, rounding_sigma
from tests.unit.test_export import REPOSITORY
from tests.unit.test_fused_ops import (
    assert_row_call_equals_refresh_then_step,
    assert_rows_on_any_thread_count,
    assert_teacher_forced_logits_equal_the_network,
    row_call_arguments,
)


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


@pytest.fixture(scope="module")
def shipped_digit(shipped):
    """The shipped model, a held-out digit (1, 1, 28, 28), its full network's logits and their rounding σ."""
    model = shipped("pixelcnn_pp_mnist").model
    digit = fixed_held_out(load_mnist5k(), 256).images[:1].long()
    with torch.no_grad():
        full = model.logits(digit)
    (sigma,) = rounding_sigma(model.logits, [digit])
    return model, digit, full, sigma


def test_the_shipped_models_step_logits_equal_its_full_network_on_a_real_digit(shipped_digit):
    # The exactness claim on the shipped 256-level model: fed a held-out digit pixel by pixel, the
    # step program's log-probabilities of every level at every pixel are the full network's, within
    # the float32 rounding of the full network (tests/rounding.py).
    model, digit, full, sigma = shipped_digit
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
    assert_within_rounding(steps.numpy(), full.numpy(), sigma, "pixelcnn_pp_mnist step logits")
    assert np.array_equal(job.images, digit.numpy())


# ---- the fused operators (serving/fused/csrc/pixelcnn_pp.cpp) ------------------------------------------------
# Tiny networks: 8x8 (resolutions 8, 4, 2: coarse rows carried through 1 and 3 image rows); two blocks per
# resolution; one resolution; four (16x16 down to 2x2); the shipped 256 levels on 4x4.
FUSED_SIZES = {
    "three": dict(),
    "two_blocks": dict(resnets_per_scale=2, seed=1),
    "one_resolution": dict(num_scales=1),
    "four": dict(image_size=16, num_scales=4, pixel_levels=7),
    "levels_256": dict(image_size=4, pixel_levels=256),
}


def fused_model(name: str):
    return make_model("pixelcnn_pp", **FUSED_SIZES[name])


@pytest.mark.parametrize("name", sorted(FUSED_SIZES))
def test_fused_sampling_equals_naive_sampling(name):
    # A whole row per call (the runner's span is the row, not the graphs' 1 pixel). 5 samples in 3 slots:
    # the last two join as others finish, on rows where other resolutions are live than the running slots'.
    model = fused_model(name)
    runner = fused_runner(model)
    assert runner.spec.span == model.config.image_size and runner.runs_rows
    engine = SamplingEngine(runner, EngineConfig(num_slots=3))
    for seed in range(3):
        assert np.array_equal(engine.generate(seed, 5), model.sample(5, seed).numpy()), seed
    for temperature in (0.5, 0.0):
        assert np.array_equal(engine.generate(3, 5, temperature), model.sample(5, 3, temperature).numpy())


@pytest.mark.parametrize("name", ["three", "two_blocks"])
def test_teacher_forced_fused_logits_equal_the_full_network(name):
    model = fused_model(name)
    assert_teacher_forced_logits_equal_the_network(model, fused_runner(model))


def test_the_fused_refresh_matches_the_refresh_graph():
    # The exporter's example: 5 slots on rows 0..4 (1, 3, 1, 2 and 1 resolutions live), random states.
    # The u stream's rows, where each resolution is live and kept where not, and its values where live;
    # a resolution's values on a row where it is not live are not read, and the operator leaves zeros.
    model = fused_model("three")
    entry, layout = step_program(model).refresh, PixelCNNPPLayout.of(model)
    inputs = entry.example(5)
    want = entry.module(*inputs)
    got = fused_runner(model).run("refresh", {s.name: value for s, value in zip(entry.inputs, inputs)})
    rows = inputs[1][:, 0] // model.config.image_size
    for spec, value, sigma in zip(entry.outputs, want, rounding_sigma(entry.module, inputs)):
        resolution = int(spec.name[-1])
        live = rows % (model.config.image_size // layout.widths[resolution]) == 0
        if spec.name.startswith("next_u_values"):
            assert torch.equal(got[spec.name][~live], torch.zeros_like(got[spec.name][~live]))
            got_value, value, sigma = got[spec.name][live], value[live], sigma[live]
        else:
            got_value = got[spec.name]
        assert_within_rounding(got_value.numpy(), value.detach().numpy(), sigma, spec.name)


def test_a_fused_row_matches_the_step_graph_pixel_by_pixel():
    # One fused call samples the row that the step graph samples in W calls (each re-reading the row so far
    # from the pixels): the same pixels, and the ul stream's rows for the row below within the rounding of
    # the graph's last call (which recomputes the whole row strip).
    model = fused_model("three")
    program, width = step_program(model), model.config.image_size
    positions, pixels, noise, temperature, *states = program.step.example(5)
    positions = (torch.arange(5).view(5, 1) % width) * width  # row starts: rows 0..4
    noise = torch.rand(5, width, 1, generator=torch.Generator().manual_seed(3))
    scales = model.config.num_scales
    got = fused_runner(model).run("step", {"positions": positions, "pixels": pixels, "noise": noise,
                                           "temperature": temperature,
                                           **{s.name: v for s, v in zip(program.step.inputs[4:], states)}})
    pixels, ul_rows = pixels.clone(), states[:scales]
    for t in range(width):
        inputs = (positions + t, pixels, noise[:, t:t + 1], temperature, *ul_rows, *states[scales:])
        pixel, *ul_rows = program.step.module(*inputs)
        pixels.view(5, -1).scatter_(1, positions + t, pixel[:, :, 0].to(torch.uint8))
        assert torch.equal(got["pixel"][:, t], pixel[:, 0]), t
    sigmas = rounding_sigma(program.step.module, inputs)[1:]
    for s, (value, sigma) in enumerate(zip(ul_rows, sigmas)):
        assert_within_rounding(got[f"next_ul_rows{s}"].numpy(), value.detach().numpy(), sigma, f"ul_rows{s}")


def test_the_in_place_row_call_equals_refresh_then_step():
    model = fused_model("three")
    assert_row_call_equals_refresh_then_step(fused_runner(model), model)


def test_a_multi_row_call_equals_row_calls_on_any_thread_count():
    # run_rows(k) does what k row calls do with the engine's Python around them, bit for bit, on 1 thread or
    # 3. 11 slots on rows 0, 1 and 3: blocks by the resolutions live, one of them split in two.
    model = fused_model("three")
    runner, width, rows, n = fused_runner(model), model.config.image_size, 3, 11
    controls, states = row_call_arguments(model, n)
    want_controls = {k: None if v is None else v.clone() for k, v in controls.items()}
    want_states = [state.clone() for state in states]
    slots = torch.arange(n)[:, None]
    for _ in range(rows):
        taken = want_controls["positions"] + torch.arange(width)
        pixel = runner.run_row({**want_controls, "noise": want_controls["noise"][slots, taken]}, want_states)
        want_controls["pixels"].view(n, -1)[slots, taken] = pixel[..., 0].to(torch.uint8)
        want_controls["positions"] += width
    assert_rows_on_any_thread_count(runner, controls, states, rows, want_controls["pixels"],
                                    want_controls["positions"], want_states)


def test_the_fused_operators_refuse_what_they_cannot_run_naming_it():
    assert fused.load_ops()
    model = fused_model("three")
    weights = list(packed_weights(model)[1].values())
    controls, states = row_call_arguments(model, n=2)
    pixels, positions, noise, temperature = (controls[k] for k in ("pixels", "positions", "noise", "temperature"))
    row, width = torch.ops.genserve.pixelcnn_pp_row, model.config.image_size
    row_noise = noise[:, :width].contiguous()
    with pytest.raises(RuntimeError, match="positions: slot 1 at 9 is not a row start"):
        row(pixels, positions + torch.tensor([[0], [1]]), row_noise, temperature, states, weights)
    with pytest.raises(RuntimeError, match=r"noise: a call samples whole rows, expected \(2, 8, 1\)"):
        row(pixels, positions, noise[:, :2].contiguous(), temperature, states, weights)
    with pytest.raises(RuntimeError, match="states: expected u_rows, ul_rows and u_values for 3 resolutions"):
        row(pixels, positions, row_noise, temperature, states[:-1], weights)
    with pytest.raises(RuntimeError, match=r"ul_rows1: expected \(2, 56, 4\)"):
        row(pixels, positions, row_noise, temperature, [*states[:4], states[4][:, 1:].contiguous(), *states[5:]],
            weights)
    with pytest.raises(RuntimeError, match="pixelcnn_pp weights must be contiguous float32"):
        row(pixels, positions, row_noise, temperature, states, [w.double() for w in weights])
    with pytest.raises(RuntimeError, match="pixelcnn_pp weights: expected 31 tensors"):
        row(pixels, positions, row_noise, temperature, states, weights[:-1])
    with pytest.raises(RuntimeError, match=r"pixelcnn_pp weights: out_w has shape \[4, 8\], expected \[4, 9\]"):
        row(pixels, positions, row_noise, temperature, states, [*weights[:28], weights[28][:, 1:].contiguous(),
                                                                *weights[29:]])
    with pytest.raises(RuntimeError, match="labels: this PixelCNN\\+\\+ is unconditional"):
        torch.ops.genserve.pixelcnn_pp_rows(pixels, positions, torch.zeros(2, 1, dtype=torch.long), noise,
                                            temperature, states, weights, 1)
    step = torch.ops.genserve.pixelcnn_pp_step
    scales = model.config.num_scales
    with pytest.raises(RuntimeError, match=r"teacher: level 5 outside \[0, 5\)"):
        step(positions, pixels, row_noise, temperature, states[scales:2 * scales], states[2 * scales:],
             torch.full((2, width, 1), 5), weights)


def test_the_shipped_sampler_runs_fused_a_row_per_call_and_its_logits_are_the_networks(shipped_digit):
    # The shipped 256-level model's fused logits, fed a held-out digit row by row, are its full network's
    # within float32 rounding. Whole images are not compared with another implementation: where the noise
    # falls within rounding of a CDF edge two implementations part (2 of 16 images between this operator and
    # the ONNX graphs; near a CDF of 1 the last levels' edges lie ~1e-6 apart), and the image follows.
    runner = load_step_runner(load_manifest(REPOSITORY / "pixelcnn_pp_mnist_sample"))
    assert isinstance(runner, FusedStepRunner) and runner.spec.span == 28 and runner.runs_rows
    model, digit, full, sigma = shipped_digit
    size, levels = model.config.image_size, model.config.pixel_levels
    run, recorded = runner.run, []

    def teacher_forced(graph, feeds):
        if graph == "step":
            feeds = dict(feeds, teacher=digit.flatten(1)[:, feeds["positions"][0, 0] + torch.arange(size)][..., None])
        outputs = run(graph, feeds)
        if graph == "step":
            recorded.append(outputs["logits"])  # (1, W, L)
        return outputs

    runner.run = teacher_forced
    runner.row_inputs, runner.runs_rows = (), False  # every call through `run`, where the teacher is fed
    engine = SamplingEngine(runner, EngineConfig(num_slots=1))
    job = engine.submit(0, 1)
    engine.run_until_idle()
    steps = torch.cat(recorded, 1).permute(0, 2, 1).reshape(1, levels, 1, size, size)
    assert_within_rounding(steps.numpy(), full.numpy(), sigma, "fused pixelcnn_pp_mnist logits")
    assert np.array_equal(job.images, digit.numpy())
