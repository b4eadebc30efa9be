"""The fused operators' compiled GPU kernels (serving/fused/triton_*.py) on a CUDA device.

The same claims as the CPU operators' tests (tests/unit/test_fused_ops.py) and the interpreted
kernels' (tests/unit/test_fused_triton.py), now through torch.ops.genserve on CUDA tensors:
exact images against naive sampling, every call against the step graph it replaces. Skipped
where there is no CUDA device (CI); run `python -m pytest tests/gpu` on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.export.fused import fused_runner, gated_weights
from genserve.serving import fused
from genserve.serving.artifacts import load_manifest
from genserve.serving.engine import EngineConfig, FusedStepRunner, SamplingEngine, load_step_runner
from genserve.serving.engine.graphs import RowGraphs
from genserve.serving.engine.program import GRAPH_SLOTS, fused_unavailable
from tests.unit.test_export import REPOSITORY
from tests.unit.test_fused_ops import FUSED_MODELS, assert_call_matches_the_graph, slots_at_different_columns
from tests.unit.test_sampling_engine import generate, labels_for, latents_for, naive, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SAMPLER = REPOSITORY / "gated_pixelcnn_mnist_sample"


def test_the_gpu_kernels_are_installed_for_cuda():
    status = fused.load_ops()
    assert status and "GPU kernels (Triton)" in status.reason, status.reason
    assert fused_unavailable(load_manifest(SAMPLER), "cuda") is None


@pytest.mark.parametrize("name", FUSED_MODELS)
@pytest.mark.parametrize("graph", ["refresh", "step"])
def test_each_cuda_call_matches_the_step_graph(name, graph):
    model = tiny(name)
    assert_call_matches_the_graph(fused_runner(model, device="cuda"), model, graph, n=37)  # 3 slot blocks


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_a_cuda_step_on_slots_at_different_columns_matches_the_step_graph(name):
    model, span = tiny(name), 2
    assert_call_matches_the_graph(fused_runner(model, span, device="cuda"), model, "step", n=5, span=span,
                                  positions=slots_at_different_columns(model, span))


@pytest.mark.parametrize("name", FUSED_MODELS)
@pytest.mark.parametrize("span", [1, 2, None])  # None: a whole row
def test_cuda_sampling_equals_naive_sampling_on_many_seeds(name, span):
    assert_cuda_sampling_equals_naive_sampling(name, span, seeds=10)


def assert_cuda_sampling_equals_naive_sampling(name: str, span: int | None, seeds: int) -> None:
    """6 samples in 4 slots on CUDA, at `seeds` seeds and temperature 1, then at 0 and 0.5: naive's images."""
    model = tiny(name)
    n = 6
    labels = labels_for(model, n)
    engine = SamplingEngine(fused_runner(model, span, device="cuda"), EngineConfig(num_slots=4))
    for seed in range(seeds):
        assert np.array_equal(generate(engine, model, seed, n, labels=labels), naive(model, n, seed, labels=labels))
    for temperature in (0.0, 0.5):
        want = naive(model, n, 3, temperature, labels)
        assert np.array_equal(generate(engine, model, 3, n, temperature, labels), want)


@pytest.mark.parametrize("name", ["gated_pixelcnn_mnist", "pixelcnn_mnist", "pixel_vae_mnist"])
def test_the_shipped_samplers_run_on_the_gpu_kernels_and_reproduce_naive_sampling(shipped, name):
    runner = load_step_runner(load_manifest(REPOSITORY / f"{name}_sample"), "torchscript", "cuda")
    assert isinstance(runner, FusedStepRunner) and runner.device.type == "cuda"
    engine = SamplingEngine(runner, EngineConfig(num_slots=3))
    model = shipped(name).model
    for temperature in (1.0, 0.5, 0.0):
        want = naive(model, 3, 21, temperature)
        assert np.array_equal(generate(engine, model, 21, 3, temperature), want), temperature


@pytest.mark.parametrize("name, op", [("maf_mnist", "maf_step"), ("pixelcnn_pp_mnist", "pixelcnn_pp_step")])
def test_a_sampler_without_gpu_kernels_samples_on_the_gpu_through_its_graphs(name, op):
    manifest = load_manifest(REPOSITORY / f"{name}_sample")
    assert f"genserve::{op} has no CUDA implementation" in fused_unavailable(manifest, "cuda")
    assert not isinstance(load_step_runner(manifest, "torchscript", "cuda"), FusedStepRunner)


def test_the_cuda_operators_refuse_tensors_on_another_device():
    model = tiny("gated")
    weights = [w.cuda() for w in gated_weights(model).values()]
    c = model.config
    links = torch.zeros(1, c.num_layers, 2 * c.hidden_channels, c.image_size, device="cuda")
    image_context = torch.zeros(1, c.first_kernel_size // 2 + 1, device="cuda")
    hidden_context = torch.zeros(1, c.num_layers - 1, (c.kernel_size // 2) * c.hidden_channels, device="cuda")
    with pytest.raises(RuntimeError, match="positions: expected a contiguous cuda:0 tensor"):
        torch.ops.genserve.gated_step(torch.zeros(1, 1, dtype=torch.long), torch.rand(1, 2, 1, device="cuda"),
                                      torch.ones(1, 1, device="cuda"), links, image_context, hidden_context, None,
                                      weights)


def row_inputs(runner, n: int, row: int, generator: torch.Generator):
    """Random controls for `n` slots starting image row `row`."""
    spec = runner.spec
    feeds = {
        "pixels": torch.randint(0, spec.levels, (n, *spec.sample_shape), generator=generator, dtype=torch.uint8),
        "positions": torch.full((n, 1), row * spec.sample_shape[-1], dtype=torch.int64),
        "labels": torch.randint(0, spec.num_classes, (n, 1), generator=generator) if spec.num_classes else None,
        "noise": torch.rand(n, spec.span, spec.sample_shape[0], generator=generator),
        "temperature": torch.rand(n, 1, generator=generator),
    }
    return {name: None if tensor is None else tensor.cuda() for name, tensor in feeds.items()}


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_row_calls_replayed_from_cuda_graphs_equal_launched_ones(name):
    model = tiny(name)
    runner = fused_runner(model, device="cuda")
    assert runner.row_graph_slots == GRAPH_SLOTS
    graphs = RowGraphs(runner.run_row, max_slots=4)
    g = torch.Generator().manual_seed(0)
    # Slot counts as the engine's occupancy moves: each count's graph replays on new controls and states;
    # 5 slots are over the graphs' limit, so those calls are launched.
    base = [torch.randn(5, *s.shape, generator=g).to(s.dtype.torch).cuda() for s in runner.spec.states]
    twin = [state.clone() for state in base]
    for row, n in enumerate([1, 3, 5, 3, 1, 5, 4]):
        feeds = row_inputs(runner, n, row % runner.spec.sample_shape[1], g)
        pixel = graphs(feeds, [state[:n] for state in base]).clone()
        assert torch.equal(pixel, runner.run_row(feeds, [state[:n] for state in twin])), (row, n)
        for state, other in zip(base, twin):
            assert torch.equal(state, other), (row, n)
    assert not graphs.failed and sorted(key[0] for key in graphs.captured) == [1, 3, 4]


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_cuda_graph_sampling_with_samples_joining_midway_equals_naive_sampling(name):
    model = tiny(name)
    engine = SamplingEngine(fused_runner(model, device="cuda"), EngineConfig(num_slots=5))
    graphs = engine.slots.row_graphs
    assert sorted(key[0] for key in graphs.captured) == [1, 2, 3, 4, 5]  # every slot count, before any sample
    first = engine.submit(7, 4, labels=labels_for(model, 4), latents=latents_for(model, 7, 4))
    engine.step()  # one row in, the second job joins: occupancy 4, then 5, then the rest
    late, late_labels = [5, 2, 9], labels_for(model, 3)
    latents = latents_for(model, 8, 10)
    second = engine.submit(8, indices=late, labels=late_labels, latents=None if latents is None else latents[late])
    engine.run_until_idle()
    assert first.error is None and second.error is None
    assert np.array_equal(first.images, naive(model, 4, 7, labels=labels_for(model, 4)))
    labels = None  # samples 0..9 of seed 8, those of `late` with their labels
    if late_labels is not None:
        labels = [0] * 10
        for index, label in zip(late, late_labels):
            labels[index] = label
    assert np.array_equal(second.images, naive(model, 10, 8, labels=labels)[late])
    assert len(graphs.captured) == 5 and not graphs.failed
