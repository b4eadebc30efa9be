"""The GPU kernels of the fused Gated PixelCNN operators (serving/fused/triton_*.py), run on the CPU.

On a machine without a GPU, tests/conftest.py switches Triton's interpreter on, so these are the
very launches a GPU runs (same kernels, same launch code), executed by Triton on CPU tensors:
exact against naive sampling and the step graphs. The interpreter is slow, so the models are the
tiny ones, a seed or two each; the shipped model's sizes are checked call by call.
On a GPU machine tests/gpu runs the compiled kernels instead, and these are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from genserve.export.fused import fused_runner, gated_weights
from genserve.export.steps import step_program
from genserve.serving.engine import EngineConfig, SamplingEngine
from genserve.serving.fused import triton_ops
from tests.rounding import assert_within_rounding, rounding_sigma
from tests.unit.test_sampling_engine import labels_for, naive, tiny

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="compiled GPU kernels are tested in tests/gpu")

GATED = ["gated", "gated_conditional_3_levels"]


def engine_for(model, span: int, num_slots: int = 4) -> SamplingEngine:
    return SamplingEngine(fused_runner(model, span, namespace=triton_ops), EngineConfig(num_slots=num_slots))


def assert_call_matches_the_graph(runner, model, graph: str, n: int) -> None:
    # The exporter's example inputs (slots at different rows, random caches), through the runner's
    # kernel and through the eager graph it replaces; tolerance: the eager graph's own float32 rounding.
    entry = getattr(step_program(model), graph)
    inputs = entry.example(n)
    want = entry.module(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    feeds = {s.name: value.to(runner.device) for s, value in zip(entry.inputs, inputs)}
    got = {name: value.cpu() for name, value in runner.run(graph, feeds).items()}
    for spec, value, sigma in zip(entry.outputs, want, rounding_sigma(entry.module, inputs)):
        if spec.name == "pixel":  # chosen pixels: exact
            assert torch.equal(got["pixel"], value)
        else:
            assert_within_rounding(got[spec.name].numpy(), value.detach().numpy(), sigma, spec.name)


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("graph", ["refresh", "step"])
def test_each_kernel_call_matches_the_step_graph(name, graph):
    model = tiny(name)
    assert_call_matches_the_graph(fused_runner(model, namespace=triton_ops), model, graph, n=5)


@pytest.mark.parametrize("graph", ["refresh", "step"])
def test_the_kernels_handle_the_shipped_models_sizes(shipped, graph):
    # 32 channels, a 7-wide first kernel and 5x5 ones (two cached rows and columns), 64 output
    # channels, 2 levels: tiles padded differently from the tiny models'.
    model = shipped("gated_pixelcnn_mnist").model
    assert_call_matches_the_graph(fused_runner(model, namespace=triton_ops), model, graph, n=2)


@pytest.mark.parametrize("name, span, temperature", [
    ("gated", 1, 1.0),
    ("gated", 6, 0.0),
    ("gated_conditional_3_levels", 6, 1.0),
    ("gated_conditional_3_levels", 2, 0.5),
])
def test_kernel_sampling_equals_naive_sampling(name, span, temperature):
    # Exact images: the kernels' rounding differs from the network's only in the last bits, which
    # moves a pixel only when its noise falls within that distance of a CDF boundary.
    model = tiny(name)
    n = 6  # more samples than slots: the last two wait for free slots
    labels = labels_for(model, n)
    images = engine_for(model, span).generate(5, n, temperature, labels)
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


def test_teacher_forced_kernel_logits_equal_the_full_network():
    model = tiny("gated_conditional_3_levels")
    n, span = 2, 6
    labels = labels_for(model, n)
    label_tensor = torch.tensor(labels)
    image = torch.from_numpy(naive(model, n, seed=4, labels=labels))
    full = model.logits(image, label_tensor).detach()
    runner = fused_runner(model, span, namespace=triton_ops)
    run, recorded = runner.run, []

    def teacher_forced(graph, feeds):
        if graph == "step":
            taken = feeds["positions"] + torch.arange(span)
            feeds = dict(feeds, teacher=image.flatten(1).gather(1, taken).unsqueeze(2))
        outputs = run(graph, feeds)
        if graph == "step":
            recorded.append(outputs["logits"])
        return outputs

    runner.run, runner.row_inputs = teacher_forced, ()
    engine = SamplingEngine(runner, EngineConfig(num_slots=n))
    engine.submit(0, n, labels=labels)
    engine.run_until_idle()
    steps = torch.cat(recorded, 1).permute(0, 2, 1).reshape(full.shape)
    (sigma,) = rounding_sigma(model.logits, [image, label_tensor])
    assert_within_rounding(steps.numpy(), full.numpy(), sigma, "kernel logits")


def test_the_in_place_row_call_equals_refresh_then_step():
    model = tiny("gated_conditional_3_levels")
    program, c = step_program(model), model.config
    weights = list(gated_weights(model).values())
    generator = torch.Generator().manual_seed(2)
    states = [torch.randn(3, *s.shape, generator=generator) for s in program.states]
    pixels = torch.randint(0, c.pixel_levels, (3, 1, c.image_size, c.image_size), dtype=torch.uint8,
                           generator=generator)
    positions, labels = torch.tensor([[0], [6], [30]]), torch.tensor([[2], [0], [1]])
    noise, temperature = torch.rand(3, c.image_size, 1, generator=generator), torch.tensor([[1.0], [0.0], [0.5]])
    vertical, links, image_context, hidden_context = triton_ops.gated_refresh(pixels, positions, labels, states[0],
                                                                              weights)
    pixel, image_context, hidden_context, _ = triton_ops.gated_step(positions, noise, temperature, links,
                                                                    image_context, hidden_context, None, weights)
    in_place = [s.clone() for s in states]
    assert torch.equal(triton_ops.gated_row(pixels, positions, labels, noise, temperature, in_place, weights), pixel)
    for got, want in zip(in_place, (vertical, links, image_context, hidden_context)):
        assert torch.equal(got, want)


def test_the_kernels_refuse_mismatched_tensors_naming_them():
    model = tiny("gated")
    weights = list(gated_weights(model).values())
    c = model.config
    links = torch.zeros(1, c.num_layers, 2 * c.hidden_channels, c.image_size)
    image_context = torch.zeros(1, c.first_kernel_size // 2 + 1)
    hidden_context = torch.zeros(1, c.num_layers - 1, (c.kernel_size // 2) * c.hidden_channels)
    good = (torch.zeros(1, 1, dtype=torch.long), torch.rand(1, 2, 1), torch.ones(1, 1), links, image_context,
            hidden_context)
    with pytest.raises(RuntimeError, match="links: shape"):
        triton_ops.gated_step(*good[:3], links[:, :-1], *good[4:], None, weights)
    with pytest.raises(RuntimeError, match="noise: expected a contiguous cpu tensor of 3 dims and type torch.float32"):
        triton_ops.gated_step(good[0], good[1].double(), *good[2:], None, weights)
    with pytest.raises(RuntimeError, match="temperature: expected a contiguous cpu tensor .* on meta"):
        triton_ops.gated_step(*good[:2], good[2].to("meta"), *good[3:], None, weights)
    with pytest.raises(RuntimeError, match="gated weights: expected 18 tensors"):
        triton_ops.gated_step(*good, None, weights[:-1])
    with pytest.raises(RuntimeError, match="labels: a conditional model needs labels"):
        model = tiny("gated_conditional_3_levels")
        vertical = torch.zeros(1, *step_program(model).states[0].shape)
        pixels = torch.zeros(1, 1, model.config.image_size, model.config.image_size, dtype=torch.uint8)
        triton_ops.gated_refresh(pixels, good[0], None, vertical, list(gated_weights(model).values()))


def test_registered_kernels_run_through_the_dispatcher():
    # What load_ops does on a GPU machine (register for "CUDA"), done for "CPU" in a throwaway process
    # so the operator schemas' argument passing (optional labels, the mutable state list) is exercised.
    code = """
import torch
from genserve.serving import fused
from genserve.serving.fused import triton_ops
from genserve.export.fused import gated_weights
from genserve.export.steps import step_program
from tests.unit.test_sampling_engine import tiny
assert fused.load_ops()
model = tiny("gated")
weights = list(gated_weights(model).values())
program = step_program(model)
states = [torch.randn(2, *s.shape) for s in program.states]
controls = (torch.zeros(2, 1, 6, 6, dtype=torch.uint8), torch.tensor([[0], [6]]), None, torch.rand(2, 6, 1),
            torch.ones(2, 1))
want = triton_ops.gated_row(*controls, [s.clone() for s in states], weights)
triton_ops.register("CPU")
print(torch.equal(torch.ops.genserve.gated_row(*controls, states, weights), want))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("True"), result.stdout
