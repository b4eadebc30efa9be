"""MAF: triangular layers, the exact change of variables, a float64 inverse, its cached engine program and
the fused operator that runs it (serving/fused/csrc/maf.cpp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genserve.export.fused import fused_runner, packed_weights
from genserve.export.models import MAFConfig
from genserve.export.steps import eager_runner, step_program
from genserve.serving import fused
from genserve.serving.artifacts import load_manifest
from genserve.serving.engine import EngineConfig, FusedStepRunner, SamplingEngine, load_step_runner
from tests.conftest import make_model
from tests.unit.test_export import REPOSITORY
from tests.unit.test_fused_ops import assert_rows_on_any_thread_count

RUNNERS = {"graphs": eager_runner, "fused": fused_runner}  # the step graph's module, or the fused operator


def test_every_layer_is_triangular_in_raster_order_so_the_stack_is():
    # Exactness of the masks: d(output i)/d(input j) is zero for j > i and 1 * exp(-s_i) on the diagonal,
    # for each layer and for the whole stack (which is what lets the engine invert pixel by pixel).
    model = make_model("maf").double()
    y = torch.randn(1, model.config.dims, dtype=torch.float64)
    functions = [lambda a: model.flow_forward(a.view(1, 1, 4, 4))[0].flatten(1)]
    functions += [lambda a, layer=layer: layer(a)[0] for layer in model.layers]
    for function in functions:  # the whole stack, then each layer
        jacobian = torch.autograd.functional.jacobian(function, y)[0, :, 0]
        assert torch.equal(torch.triu(jacobian, diagonal=1), torch.zeros_like(jacobian))


def test_log_det_is_the_log_determinant_of_the_jacobian():
    model = make_model("maf").double()
    y = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    _, log_det = model.flow_forward(y)
    jacobian = torch.autograd.functional.jacobian(lambda a: model.flow_forward(a)[0], y).reshape(16, 16)
    assert math.isclose(log_det.item(), torch.linalg.slogdet(jacobian)[1].item(), rel_tol=1e-10)


def test_the_inverse_undoes_the_flow_and_decode_recovers_the_pixels():
    model = make_model("maf")
    x = torch.randint(0, 256, (5, 1, 4, 4))
    y, _ = model.double().dequantise(x, torch.full(x.shape, 0.5, dtype=torch.float64))
    z, _ = model.flow_forward(y)
    back = model.flow_inverse(z)
    assert back.dtype == torch.float64 and torch.allclose(back, y, atol=1e-10)
    assert torch.equal(model.decode(z), x)  # bin centres stay inside their bins


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.0])
def test_cached_engine_inversion_equals_the_naive_one_exactly(runner, temperature):
    # Both paths compute in float64, so no pixel sits within rounding of a bin edge in practice:
    # the images are equal, for samples split across fewer slots than requested.
    model = make_model("maf", image_size=6, hidden_units=12)
    engine = SamplingEngine(RUNNERS[runner](model), EngineConfig(num_slots=4))
    for seed in range(8):
        latents = model.prior_latents(seed, range(6), temperature).numpy()
        cached = engine.generate(seed, 6, temperature, latents=latents)
        assert np.array_equal(cached, model.sample(6, seed, temperature).numpy()), seed


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_decoding_joins_a_running_batch_and_gives_each_latents_own_image(runner):
    model = make_model("maf", image_size=6, hidden_units=12)
    engine = SamplingEngine(RUNNERS[runner](model), EngineConfig(num_slots=5))
    z = torch.randn(3, 1, 6, 6)
    decoded = engine.submit(0, 3, latents=z.numpy())
    engine.step()
    sampled = engine.submit(7, 2, latents=model.prior_latents(7, range(2)).numpy())
    engine.run_until_idle()
    assert np.array_equal(decoded.images, model.decode(z).numpy())
    assert np.array_equal(sampled.images, model.sample(2, 7).numpy())


def test_the_program_has_no_per_row_work_and_refuses_other_spans():
    model = make_model("maf")
    program = step_program(model)
    assert program.refresh is None and [g.name for g in program.graphs] == ["start", "step"]
    assert program.section().graphs["step"].inputs == ("positions", "u", "hidden")
    with pytest.raises(ValueError, match="advances a whole row"):
        step_program(model, span=2)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        MAFConfig(hidden_units=0)


def test_the_fused_step_matches_the_step_graph_it_replaces():
    # On the exporter's example inputs (slots at different rows, random hidden states): the pixels exactly,
    # the hidden states within float64 rounding: each is a sum of 3 * 12 products here, summed in another
    # order (relative error ~1e-15), where the tolerance allows 1e-12 of the largest value.
    model = make_model("maf", image_size=6, hidden_units=12)
    entry = step_program(model).step
    inputs = entry.example(5)
    want_pixel, want_hidden = entry.module(*inputs)
    got = fused_runner(model).run("step", dict(zip(("positions", "u", "hidden"), inputs)))
    assert torch.equal(got["pixel"], want_pixel)
    scale = want_hidden.abs().max().item()
    assert torch.allclose(got["next_hidden"], want_hidden, rtol=0, atol=1e-12 * scale)


def row_arguments(model, n: int):
    """The engine's controls and states for `n` slots at rows 0, 1 and 3 (then again), states drawn at random."""
    program, width = step_program(model), model.config.image_size
    generator = torch.Generator().manual_seed(3)
    controls = {
        "pixels": torch.zeros(n, 1, width, width, dtype=torch.uint8),
        "positions": torch.tensor([[(0, 1, 3)[k % 3] * width] for k in range(n)]),
        "labels": None,
        "noise": torch.rand(n, width * width, 1, generator=generator),
        "temperature": torch.ones(n, 1),
    }
    states = [torch.randn(n, *s.shape, generator=generator, dtype=torch.float64) for s in program.states]
    return controls, states


def test_a_multi_row_call_equals_step_calls_with_the_engines_bookkeeping_on_any_thread_count():
    # run_rows(2) must do what two step calls do with the engine's Python around them (pixels written into
    # the images, positions advanced), bit for bit; slots split among 3 threads must not change a bit either.
    model = make_model("maf", image_size=6, hidden_units=12)
    runner, width, n = fused_runner(model), model.config.image_size, 11
    assert runner.runs_rows
    controls, states = row_arguments(model, n)
    want_pixels, want_positions = controls["pixels"].clone(), controls["positions"].clone()
    want_states = [state.clone() for state in states]
    slots = torch.arange(n)[:, None]
    for _ in range(2):
        out = runner.run("step", {"positions": want_positions, "u": want_states[0], "hidden": want_states[1]})
        want_states[1] = out["next_hidden"]
        taken = want_positions + torch.arange(width)
        want_pixels.view(n, -1)[slots, taken] = out["pixel"][..., 0].to(torch.uint8)
        want_positions += width
    assert_rows_on_any_thread_count(runner, controls, states, 2, want_pixels, want_positions, want_states)


def test_the_fused_operator_refuses_what_it_cannot_run_naming_it():
    assert fused.load_ops()
    model = make_model("maf", image_size=6, hidden_units=12)
    weights = list(packed_weights(model)[1].values())
    positions, u, hidden = step_program(model).step.example(2)
    step = torch.ops.genserve.maf_step
    with pytest.raises(RuntimeError, match="positions: slot 1 at 8 does not start a row"):
        step(positions + torch.tensor([[0], [2]]), u, hidden, weights)
    with pytest.raises(RuntimeError, match="hidden: expected a contiguous CPU tensor of 3 dims and type Double"):
        step(positions, u, hidden.float(), weights)
    with pytest.raises(RuntimeError, match="maf weights must be contiguous float64 CPU tensors"):
        step(positions, u, hidden, [w.float() for w in weights])
    controls, states = row_arguments(model, 2)
    with pytest.raises(RuntimeError, match="labels: MAF is unconditional"):
        fused_runner(model).run_rows({**controls, "labels": torch.zeros(2, 1, dtype=torch.long)}, states, 1)


def test_the_shipped_sampler_runs_fused_and_reproduces_naive_sampling(shipped):
    runner = load_step_runner(load_manifest(REPOSITORY / "maf_mnist_sample"))
    assert isinstance(runner, FusedStepRunner)
    model = shipped("maf_mnist").model
    engine = SamplingEngine(runner, EngineConfig(num_slots=2))
    images = engine.generate(21, 3, 0.8, latents=model.prior_latents(21, range(3), 0.8).numpy())
    assert np.array_equal(images, model.sample(3, 21, 0.8).numpy())
