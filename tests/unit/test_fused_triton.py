"""The fused operators' GPU kernels (serving/fused/triton_*.py), run on the CPU.

On a machine without a GPU, tests/conftest.py switches Triton's interpreter on, so these are the
very launches a GPU runs (same kernels, same launch code), executed by Triton on CPU tensors:
exact against naive sampling and the step graphs, by the CPU operators' own checks
(test_fused_ops). The interpreter is slow, so the models are the tiny ones, a seed each; the
shipped models' sizes are checked call by call.
On a GPU machine tests/gpu runs the compiled kernels instead, and these are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from genserve.export.fused import fused_runner, gated_weights, packed_weights, pixelcnn_weights
from genserve.export.steps import step_program
from genserve.serving.engine import EngineConfig, SamplingEngine
from genserve.serving.fused import triton_gated, triton_ops
from tests.unit.test_fused_ops import (
    FUSED_MODELS,
    assert_a_map_is_taken_exactly_where_the_network_has_one,
    assert_call_matches_the_graph,
    assert_row_call_equals_refresh_then_step,
    assert_teacher_forced_logits_equal_the_network,
    gated_step_arguments,
    slots_at_different_columns,
)
from tests.unit.test_sampling_engine import generate, labels_for, mirrored, naive, tiny

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="compiled GPU kernels are tested in tests/gpu")


def engine_for(model, span: int, num_slots: int = 4) -> SamplingEngine:
    return SamplingEngine(fused_runner(model, span, namespace=triton_ops), EngineConfig(num_slots=num_slots))


@pytest.mark.parametrize("name", FUSED_MODELS)
@pytest.mark.parametrize("graph", ["refresh", "step"])
def test_each_kernel_call_matches_the_step_graph(name, graph):
    model = tiny(name)
    assert_call_matches_the_graph(fused_runner(model, namespace=triton_ops), model, graph, n=5)


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_a_kernel_step_on_slots_at_different_columns_matches_the_step_graph(name):
    model, span = tiny(name), 2
    assert_call_matches_the_graph(fused_runner(model, span, namespace=triton_ops), model, "step", n=5, span=span,
                                  positions=slots_at_different_columns(model, span))


@pytest.mark.parametrize("name, graph", [
    ("gated_pixelcnn_mnist", "refresh"), ("gated_pixelcnn_mnist", "step"), ("pixelcnn_mnist", "step"),
])
def test_the_kernels_handle_the_shipped_models_sizes(shipped, name, graph):
    # Gated: 32 channels, a 7-wide first kernel and 5x5 ones (two cached rows and columns), 64 output
    # channels, 2 levels; PixelCNN: 5 residual blocks of 32 (a 192-tap masked window): tiles padded
    # differently from the tiny models'.
    model = shipped(name).model
    assert_call_matches_the_graph(fused_runner(model, namespace=triton_ops), model, graph, n=2)


@pytest.mark.parametrize("name, span, temperature", [
    ("gated", 1, 1.0),
    ("gated", 6, 0.0),
    ("gated_conditional_3_levels", 6, 1.0),
    ("gated_conditional_3_levels", 2, 0.5),
    ("pixelcnn", 1, 1.0),
    ("pixelcnn_3_levels", 6, 0.5),
    ("pixel_vae", 8, 1.0),  # z per sample, m(z) made at admission by the start graph
])
def test_kernel_sampling_equals_naive_sampling(name, span, temperature):
    # Exact images: the kernels' rounding differs from the network's only in the last bits, which
    # moves a pixel only when its noise falls within that distance of a CDF boundary.
    model = tiny(name)
    n = 4  # one per slot: each engine call is seconds here (the joining test covers admission)
    labels = labels_for(model, n)
    images = generate(engine_for(model, span), model, 5, n, temperature, labels)
    assert np.array_equal(images, naive(model, n, 5, temperature, labels))


def test_a_job_joining_midway_samples_what_it_samples_alone():
    model = tiny("gated_conditional_3_levels")
    engine = engine_for(model, span=1, num_slots=5)
    first = engine.submit(7, 3, labels=[0, 1, 2])
    for _ in range(8):  # 8 pixels in: the next job's slots start at row 0 while these are mid-row
        engine.step()
    second = engine.submit(8, indices=[5, 2], labels=[2, 1])
    engine.run_until_idle()
    assert first.error is None and second.error is None
    assert np.array_equal(first.images, naive(model, 3, 7, labels=[0, 1, 2]))
    want = naive(model, 6, 8, labels=[0, 0, 1, 0, 0, 2])  # sample k is index k of its seed
    assert np.array_equal(second.images, want[[5, 2]])


@pytest.mark.parametrize("name", ["gated_conditional_3_levels", "pixelcnn_3_levels"])
def test_row_kernels_on_slots_mirrored_as_on_a_gpu_sample_exactly(name):
    # A GPU engine's own path: whole-row calls of the kernels on controls kept as device tensors
    # (here CPU tensors), a job joining mid-image, images copied out only as samples finish.
    model = tiny(name)
    engine = mirrored(engine_for(model, span=None, num_slots=3))
    first = engine.submit(7, 2, labels=labels_for(model, 2))
    for _ in range(3):
        engine.step()
    second = engine.submit(8, 2, labels=labels_for(model, 2))  # one sample joins now, one when a slot frees
    engine.run_until_idle()
    assert np.array_equal(first.images, naive(model, 2, 7, labels=labels_for(model, 2)))
    assert np.array_equal(second.images, naive(model, 2, 8, labels=labels_for(model, 2)))


@pytest.mark.parametrize("name", ["gated_conditional_3_levels", "pixelcnn_3_levels"])
def test_teacher_forced_kernel_logits_equal_the_full_network(name):
    model = tiny(name)
    assert_teacher_forced_logits_equal_the_network(model, fused_runner(model, 6, namespace=triton_ops))


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_the_in_place_row_call_equals_refresh_then_step(name):
    model = tiny(name)
    assert_row_call_equals_refresh_then_step(fused_runner(model, namespace=triton_ops), model)


def test_the_kernels_refuse_mismatched_tensors_naming_them():
    good, weights = gated_step_arguments(tiny("gated"))
    links = good[3]
    with pytest.raises(RuntimeError, match="links: shape"):
        triton_ops.gated_step(*good[:3], links[:, :-1], *good[4:], None, weights)
    with pytest.raises(RuntimeError, match="noise: expected a contiguous cpu tensor of 3 dims and type torch.float32"):
        triton_ops.gated_step(good[0], good[1].double(), *good[2:], None, weights)
    with pytest.raises(RuntimeError, match="temperature: expected a contiguous cpu tensor .* on meta"):
        triton_ops.gated_step(*good[:2], good[2].to("meta"), *good[3:], None, weights)
    with pytest.raises(RuntimeError, match="gated weights: expected 18 tensors"):
        triton_ops.gated_step(*good, None, weights[:-1])
    pixelcnn = tiny("pixelcnn")
    caches = [torch.zeros(1, *s.shape) for s in step_program(pixelcnn).states]
    with pytest.raises(RuntimeError, match="block_rows: 1 caches for 2 blocks"):
        triton_ops.pixelcnn_step(*good[:3], caches[0], caches[1:2], None, list(pixelcnn_weights(pixelcnn).values()))
    with pytest.raises(RuntimeError, match="labels: a conditional model needs labels"):
        model = tiny("gated_conditional_3_levels")
        vertical = torch.zeros(1, *step_program(model).states[0].shape)
        pixels = torch.zeros(1, 1, model.config.image_size, model.config.image_size, dtype=torch.uint8)
        triton_ops.gated_refresh(pixels, good[0], None, vertical, None, list(gated_weights(model).values()))


def test_the_kernels_take_a_conditioning_map_exactly_where_the_network_has_one():
    assert_a_map_is_taken_exactly_where_the_network_has_one(triton_ops)


def test_registered_kernels_run_through_the_dispatcher():
    # What load_ops does on a GPU machine (register for "CUDA"), done for "CPU" in a throwaway process
    # so the operator schemas' argument passing (optional labels, the mutable state lists) is exercised.
    code = """
import torch
from genserve.serving import fused
from genserve.serving.fused import triton_ops
from genserve.export.fused import packed_weights
from genserve.export.steps import step_program
from tests.unit.test_sampling_engine import tiny
assert fused.load_ops()
for name, controls in (
    ("gated", (torch.zeros(2, 1, 6, 6, dtype=torch.uint8), torch.tensor([[0], [6]]), None)),
    ("pixelcnn", (torch.tensor([[0], [6]]),)),
):
    model = tiny(name)
    family, weights = packed_weights(model)
    weights = list(weights.values())
    states = [torch.randn(2, *s.shape) for s in step_program(model).states]
    controls = (*controls, torch.rand(2, 6, 1), torch.ones(2, 1))
    row = f"{family.removesuffix('_pixelcnn')}_row"
    want = getattr(triton_ops, row)(*controls, [s.clone() for s in states], weights)
    triton_ops.register("CPU")
    print(name, torch.equal(getattr(torch.ops.genserve, row)(*controls, states, weights), want))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["gated", "True", "pixelcnn", "True"], result.stdout


def test_every_kernel_compiles_for_an_h100_with_tritons_own_compiler(tmp_path):
    # The interpreter accepts code the compiler rejects: tests/triton_compile.py compiles each kernel
    # as the launchers would launch it (tiny and shipped sizes) to an sm_90 cubin, without a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.getcwd(), TRITON_CACHE_DIR=str(tmp_path))  # an empty cache: compiled here
    result = subprocess.run([sys.executable, "-m", "tests.triton_compile", "90"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = [line.split(" compiled for ")[0] for line in result.stdout.splitlines()]
    gated = ["gated_refresh_kernel", "gated_step_kernel", "gated_prepare_kernel", "gated_refresh_kernel"]
    assert compiled == [
        *(f"tiny gated_conditional_3_levels: {kernel}" for kernel in gated),
        "tiny pixelcnn_3_levels: pixelcnn_step_kernel",
        *(f"tiny pixel_vae: {kernel}" for kernel in gated),
        *(f"gated_pixelcnn_mnist: {kernel}" for kernel in gated),
        "pixelcnn_mnist: pixelcnn_step_kernel",
        *(f"pixel_vae_mnist: {kernel}" for kernel in gated),
    ], result.stdout
    assert all(line.endswith("bytes shared)") and "sm_90" in line for line in result.stdout.splitlines())


@pytest.mark.parametrize("name", ["gated_conditional_3_levels", "pixelcnn_3_levels"])
def test_step_programs_of_one_slot_sample_exactly(monkeypatch, name):
    # The batch-1 launch variants deploy/gpu/check.sh profiles: every tile one slot row, tl.dot on (1, K).
    monkeypatch.setattr(triton_ops, "SLOTS_PER_PROGRAM", 1)
    model = tiny(name)
    assert_call_matches_the_graph(fused_runner(model, namespace=triton_ops), model, "step", n=3)
    engine = mirrored(engine_for(model, span=None, num_slots=3))
    images = engine.generate(4, 3, 1.0, labels_for(model, 3))
    assert np.array_equal(images, naive(model, 3, 4, labels=labels_for(model, 3)))


GATED_FUSED_MODELS = [name for name in FUSED_MODELS if not name.startswith("pixelcnn")]


def refresh_arguments(model, n: int = 3):
    """A refresh call's inputs for n slots at rows 0, 1, 3, ... of random images and caches, and the weights."""
    program, c = step_program(model), model.config
    generator = torch.Generator().manual_seed(2)
    inputs = dict(zip((s.name for s in program.refresh.inputs), program.refresh.example(n)))
    inputs["vertical"] = torch.randn(inputs["vertical"].shape, generator=generator)
    inputs["positions"] = torch.tensor([[0], [1], [3]])[:n] * c.image_size
    return inputs, list(packed_weights(model)[1].values())


@pytest.mark.parametrize("name", [*GATED_FUSED_MODELS, "shipped"])
def test_a_split_refresh_gives_the_bits_of_the_whole_one(monkeypatch, shipped, name):
    # The cache's part in programs of its own (gated_prepare_kernel), the rest after: the same sums in
    # the same order, so the same links, caches and pixels, bit for bit, with or without the split.
    model = shipped("gated_pixelcnn_mnist").model if name == "shipped" else tiny(name)
    inputs, weights = refresh_arguments(model)
    arguments = (inputs["pixels"], inputs["positions"], inputs.get("labels"), inputs["vertical"],
                 inputs.get("condition"), weights)
    whole = triton_ops.gated_refresh(*arguments)
    monkeypatch.setattr(triton_ops, "SPLIT_REFRESH_SLOTS", 16)
    launched = []
    prepare = triton_gated.gated_prepare_kernel
    monkeypatch.setattr(triton_gated, "gated_prepare_kernel", _Recorded(prepare, launched))
    split = triton_ops.gated_refresh(*arguments)
    layers = weights[4].shape[0]  # link_w: (L, 2C, 2C)
    assert launched == [(3, layers - 1)]  # a program per (slot, later layer)
    for got, want in zip(split, whole):
        assert torch.equal(got, want)


class _Recorded:
    """A kernel whose launches' grids are recorded."""

    def __init__(self, kernel, grids: list) -> None:
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_sampling_with_split_refreshes_equals_naive_sampling(monkeypatch):
    monkeypatch.setattr(triton_ops, "SPLIT_REFRESH_SLOTS", 16)
    model = tiny("gated_conditional_3_levels")
    n = 4
    labels = labels_for(model, n)
    engine = mirrored(engine_for(model, span=None, num_slots=3))
    images = engine.generate(5, n, 1.0, labels)
    assert np.array_equal(images, naive(model, n, 5, labels=labels))
