"""The resident step kernels (serving/fused/csrc/gated_resident.cuh, pixelcnn_resident.cuh) compiled by nvcc,
on a CUDA device.

The claims tests/unit/test_gated_resident.py and test_pixelcnn_resident.py make of the same sources on
CPU threads, now on the GPU, through the engine's GPU path (triton_ops, with GENSERVE_RESIDENT_STEP_SLOTS's
switch on): every call against the step graph, images against naive sampling, graph replays against
launches, bits independent of where the weights are read from. And the Gated refresh split in two
launches (GENSERVE_SPLIT_REFRESH_SLOTS), bit for bit the whole one. Skipped without a CUDA device, and
where the CUDA library was not built (`genserve build-ops` builds it where nvcc is present).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.export.fused import fused_runner
from genserve.serving import fused
from genserve.serving.engine import EngineConfig, SamplingEngine
from genserve.serving.engine.graphs import RowGraphs
from genserve.serving.fused import triton_ops
from tests.gpu.test_fused_gpu import assert_cuda_sampling_equals_naive_sampling, row_inputs
from tests.unit import test_pixelcnn_resident as pixelcnn_resident
from tests.unit.test_fused_ops import assert_call_matches_the_graph, slots_at_different_columns
from tests.unit.test_fused_triton import refresh_arguments
from tests.unit.test_gated_resident import GATED_MODELS, resident_step, step_arguments
from tests.unit.test_sampling_engine import generate, labels_for, naive, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def resident(monkeypatch):
    status = fused.load_ops()
    assert "CUDA C++ kernels (the resident Gated and PixelCNN steps)" in status.reason, status.reason
    monkeypatch.setattr(triton_ops, "RESIDENT_STEP_SLOTS", 64)
    for op in ("gated_step_resident", "pixelcnn_step_resident"):
        assert triton_ops.has_resident_step(op, torch.device("cuda"))


@pytest.mark.parametrize("name", [*GATED_MODELS, *pixelcnn_resident.PIXELCNN_MODELS])
def test_each_resident_cuda_step_call_matches_the_step_graph(resident, name):
    model, span = tiny(name), 2
    assert_call_matches_the_graph(fused_runner(model, device="cuda"), model, "step", n=37)
    assert_call_matches_the_graph(fused_runner(model, span, device="cuda"), model, "step", n=5, span=span,
                                  positions=slots_at_different_columns(model, span))


@pytest.mark.parametrize("name", ["gated_pixelcnn_mnist", "pixelcnn_mnist"])
def test_the_resident_cuda_step_handles_the_shipped_models_sizes(resident, shipped, name):
    model = shipped(name).model
    assert_call_matches_the_graph(fused_runner(model, device="cuda"), model, "step", n=3)


@pytest.mark.parametrize("name", [*GATED_MODELS, *pixelcnn_resident.PIXELCNN_MODELS])
@pytest.mark.parametrize("span", [1, None])
def test_resident_cuda_sampling_equals_naive_sampling(resident, name, span):
    assert_cuda_sampling_equals_naive_sampling(name, span, seeds=6)


@pytest.mark.parametrize("name", ["gated_conditional_3_levels", "pixelcnn_3_levels"])
def test_resident_row_calls_replayed_from_cuda_graphs_equal_launched_ones(resident, name):
    # PixelCNN's row call is one launch, the caches' roll included.
    runner = fused_runner(tiny(name), device="cuda")
    graphs = RowGraphs(runner.run_row, max_slots=4)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(4, *s.shape, generator=g).to(s.dtype.torch).cuda() for s in runner.spec.states]
    twin = [state.clone() for state in base]
    for row, n in enumerate([1, 3, 1, 4]):
        feeds = row_inputs(runner, n, row % runner.spec.sample_shape[1], g)
        pixel = graphs(feeds, [state[:n] for state in base]).clone()
        assert torch.equal(pixel, runner.run_row(feeds, [state[:n] for state in twin])), (row, n)
        for state, other in zip(base, twin):
            assert torch.equal(state, other), (row, n)
    assert not graphs.failed


def test_the_resident_cuda_step_gives_the_same_bits_wherever_its_weights_are_read_from(resident):
    model = tiny("gated_conditional_3_levels")
    arguments, weights = step_arguments(model, n=2, span=6, seed=3)
    on_cpu = resident_step(arguments, weights)
    arguments, weights = [a.cuda() for a in arguments], [w.cuda() for w in weights]
    results = [resident_step(arguments, weights, shared_bytes=budget) for budget in (-1, 8192, 4128)]
    for other in results[1:]:
        for got, want in zip(other[:3], results[0][:3]):
            assert torch.equal(got, want)
    assert torch.equal(results[0][0].cpu(), on_cpu[0])  # the pixels the same source chose on CPU threads


@pytest.mark.parametrize("name", [*GATED_MODELS, "shipped"])
def test_a_split_cuda_refresh_gives_the_bits_of_the_whole_one(monkeypatch, shipped, name):
    model = shipped("gated_pixelcnn_mnist").model if name == "shipped" else tiny(name)
    inputs, weights = refresh_arguments(model)
    arguments = [None if value is None else value.cuda() for value in (
        inputs["pixels"], inputs["positions"], inputs.get("labels"), inputs["vertical"], inputs.get("condition"))]
    weights = [w.cuda() for w in weights]
    whole = triton_ops.gated_refresh(*arguments, weights)
    monkeypatch.setattr(triton_ops, "SPLIT_REFRESH_SLOTS", 16)
    for got, want in zip(triton_ops.gated_refresh(*arguments, weights), whole):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", GATED_MODELS)
def test_cuda_sampling_on_the_resident_step_and_split_refreshes_equals_naive_sampling(resident, monkeypatch, name):
    # The batch-1 configuration check.sh's bench-resident runs, CUDA graphs included.
    monkeypatch.setattr(triton_ops, "SPLIT_REFRESH_SLOTS", 64)
    model = tiny(name)
    n = 6
    labels = labels_for(model, n)
    engine = SamplingEngine(fused_runner(model, device="cuda"), EngineConfig(num_slots=4))
    for seed in range(4):
        assert np.array_equal(generate(engine, model, seed, n, labels=labels), naive(model, n, seed, labels=labels))


@pytest.mark.parametrize("roll", [False, True])
def test_the_resident_cuda_pixelcnn_step_gives_the_same_bits_wherever_its_weights_are_read_from(resident, roll):
    model = tiny("pixelcnn_3_levels")
    arguments, weights = pixelcnn_resident.step_arguments(model, n=2, span=6, seed=3)
    arguments = (arguments[0] - arguments[0] % 6, *arguments[1:]) if roll else arguments  # a roll starts rows
    on_cpu = pixelcnn_resident.resident_step(arguments, weights, roll=roll)
    positions, noise, temperature, image_rows, block_rows = arguments
    arguments = (positions.cuda(), noise.cuda(), temperature.cuda(), image_rows.cuda(), [b.cuda() for b in block_rows])
    weights = [w.cuda() for w in weights]
    least = pixelcnn_resident.activation_bytes(arguments, weights)  # every weight read from global memory
    results = [pixelcnn_resident.resident_step(arguments, weights, roll=roll, shared_bytes=budget)
               for budget in (-1, least + 4096, least)]
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])
        assert all(torch.equal(a, b) for a, b in zip(other[2], results[0][2]))
    assert torch.equal(results[0][0].cpu(), on_cpu[0])  # the pixels the same source chose on CPU threads
