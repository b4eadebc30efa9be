"""The resident PixelCNN step kernel (serving/fused/csrc/pixelcnn_resident.cuh), run on CPU threads.

As for the resident Gated step (test_gated_resident.py): the operator library builds the kernel's very
source for the CPU (csrc/device.h), so the kernel a GPU runs is checked here, call by call against the
step graphs and the CPU operator, and images against naive sampling through the engine's own GPU path
(triton_ops), where a whole-row call is this one kernel: the caches' roll up a row included.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from genserve.export.fused import fused_runner, pixelcnn_weights
from genserve.serving import fused
from genserve.serving.engine import EngineConfig, SamplingEngine
from genserve.serving.fused import triton_ops
from tests.conftest import make_model
from tests.unit.test_fused_ops import (
    assert_call_matches_the_graph,
    assert_teacher_forced_logits_equal_the_network,
)
from tests.unit.test_gated_resident import (
    TINY_THREADS,
    activation_bytes,
    resident_calls,
    schedules_give_the_same_bits,
)
from tests.unit.test_sampling_engine import generate, mirrored, naive, tiny

PIXELCNN_MODELS = ["pixelcnn", "pixelcnn_3_levels"]


def wide():
    """A tiny PixelCNN as wide as the shipped one (32 hidden channels, 64 output channels): its matrices'
    rows are multiples of 32 floats, kept permuted in shared memory."""
    return make_model("pixelcnn", image_size=6, hidden_channels=32, num_residual_blocks=2, output_channels=64)


def model_named(name: str):
    return wide() if name == "wide" else tiny(name)


@pytest.fixture
def resident(monkeypatch):
    return resident_calls(monkeypatch, "pixelcnn_step_resident")


def step_arguments(model, n: int, span: int, seed: int = 0):
    """A step call's inputs for n slots, slot s at column s of row s (random caches), and the weights."""
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    r0, r = c.first_kernel_size // 2 + 1, c.kernel_size // 2 + 1
    width = c.image_size
    positions = torch.tensor([[s * width + min(s, width - span)] for s in range(n)])
    noise = torch.rand(n, span, 1, generator=generator)
    temperature = torch.tensor([1.0, 0.5, 0.0] * n)[:n].unsqueeze(1)
    image_rows = torch.randn(n, 1, r0, width + 2 * (r0 - 1), generator=generator)
    block_rows = [torch.randn(n, c.hidden_channels, r, width + 2 * (r - 1), generator=generator)
                  for _ in range(c.num_residual_blocks)]
    return (positions, noise, temperature, image_rows, block_rows), list(pixelcnn_weights(model).values())


def resident_step(arguments, weights, teacher=None, roll=False, threads=TINY_THREADS, shared_bytes=-1):
    """The operator on copies of the caches: (pixel, image_rows, block_rows, logits)."""
    positions, noise, temperature, image_rows, block_rows = arguments
    image_out, blocks_out = image_rows.clone(), [rows.clone() for rows in block_rows]
    pixel = torch.empty(*noise.shape, dtype=torch.long, device=noise.device)
    logits = noise.new_empty(noise.shape[0] if teacher is not None else 0, noise.shape[1], weights[10].shape[1])
    torch.ops.genserve.pixelcnn_step_resident(positions, noise, temperature, image_out, blocks_out, teacher, pixel,
                                              logits, weights, roll, threads, shared_bytes)
    return pixel, image_out, blocks_out, logits


@pytest.mark.parametrize("name, span, temperature", [
    ("pixelcnn", 1, 1.0),
    ("pixelcnn", None, 0.0),
    ("pixelcnn_3_levels", 2, 0.5),
    ("pixelcnn_3_levels", None, 1.0),
])
def test_resident_sampling_equals_naive_sampling(resident, name, span, temperature):
    # The engine's GPU path: whole-row calls (span None: the roll and the step in one launch) on controls
    # kept as tensors, images copied out as samples finish; a job of 5 samples in 3 slots, so two join as
    # others finish.
    model = tiny(name)
    n = 5
    engine = SamplingEngine(fused_runner(model, span, namespace=triton_ops), EngineConfig(num_slots=3))
    engine = mirrored(engine) if span is None else engine
    images = generate(engine, model, 6, n, temperature)
    assert np.array_equal(images, naive(model, n, 6, temperature))
    assert resident and max(resident) <= 3


def test_teacher_forced_resident_logits_equal_the_full_network(resident):
    model = tiny("pixelcnn_3_levels")
    assert_teacher_forced_logits_equal_the_network(model, fused_runner(model, 6, namespace=triton_ops))
    assert resident


@pytest.mark.parametrize("name", [*PIXELCNN_MODELS, "wide"])
def test_the_resident_step_chooses_the_cpu_operators_pixels(name):
    # Without the interpreter or the engine: the operator against the CPU operator on the same inputs,
    # three slots at temperatures 1, 0.5 and 0, a whole row each and two pixels each (caches and logits
    # are compared with the step graph's rounding above); with a teacher, the teacher's pixels.
    assert fused.load_ops()
    model = model_named(name)
    for span in (model.config.image_size, 2):
        arguments, weights = step_arguments(model, n=3, span=span)
        want = torch.ops.genserve.pixelcnn_step(*arguments, None, weights)
        assert torch.equal(resident_step(arguments, weights)[0], want[0])
        teacher = torch.randint(0, model.config.pixel_levels, want[0].shape)
        assert torch.equal(resident_step(arguments, weights, teacher)[0], teacher)


@pytest.mark.parametrize("name", PIXELCNN_MODELS)
def test_a_rolling_call_is_the_refresh_then_the_step(name):
    # `roll`, which makes a row call one launch: every cache moved up a row in the kernel gives the bits
    # of the CPU operator's refresh followed by the kernel without it.
    assert fused.load_ops()
    model = tiny(name)
    (positions, *rest), weights = step_arguments(model, n=3, span=model.config.image_size, seed=1)
    positions = positions - positions % model.config.image_size  # rows start
    noise, temperature, image_rows, block_rows = rest
    rolled = torch.ops.genserve.pixelcnn_refresh(image_rows, block_rows, weights)
    want = resident_step((positions, noise, temperature, rolled[0], rolled[1:]), weights)
    got = resident_step((positions, noise, temperature, image_rows, block_rows), weights, roll=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))


@pytest.mark.parametrize("name", ["pixelcnn_3_levels", "wide"])
def test_where_the_weights_are_read_from_and_the_thread_count_do_not_change_the_bits(name):
    # The budget decides only where each weight is read from: all of them in shared memory (the centre
    # taps gathered, matrices of rows of 32k floats permuted), some, or none (the centre taps then read
    # from the packed kernels through a map of their rows). The thread count decides how many outputs a
    # group takes in turn. Every output is the same lanes' parts, in the same order, added by the same
    # butterfly.
    assert fused.load_ops()
    model = model_named(name)
    arguments, weights = step_arguments(model, n=2, span=4, seed=3)
    least = activation_bytes(resident_step, arguments, weights)
    want = resident_step(arguments, weights)
    for threads in (32, 128, 256):
        for budget in (-1, least + 4 * 1024, least):
            got = resident_step(arguments, weights, threads=threads, shared_bytes=budget)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (threads, budget)
            assert all(torch.equal(a, b) for a, b in zip(got[2], want[2])), (threads, budget)


def test_the_resident_operator_refuses_bad_arguments_naming_them():
    assert fused.load_ops()
    model = tiny("pixelcnn")
    arguments, weights = step_arguments(model, n=1, span=2)
    positions, noise, temperature, image_rows, block_rows = arguments
    with pytest.raises(RuntimeError, match="threads: a multiple of 32"):
        resident_step(arguments, weights, threads=48)
    with pytest.raises(RuntimeError, match=r"shared_bytes: 64 bytes do not hold a block's activations"):
        resident_step(arguments, weights, shared_bytes=64)
    with pytest.raises(RuntimeError, match="noise: expected a contiguous cpu tensor of 3 dims and type Float"):
        resident_step((positions, noise.double(), temperature, image_rows, block_rows), weights)
    with pytest.raises(RuntimeError, match="block rows: shape"):
        resident_step((positions, noise, temperature, image_rows, [block_rows[0][:, :-1], *block_rows[1:]]), weights)
    with pytest.raises(RuntimeError, match="block_rows: 1 caches for 2 blocks"):
        resident_step((positions, noise, temperature, image_rows, block_rows[:1]), weights)
    with pytest.raises(RuntimeError, match="image_rows: shape"):
        resident_step((positions, noise, temperature, image_rows[:, :, 1:], block_rows), weights)
    with pytest.raises(RuntimeError, match="noise: 7 pixels per call, a row is 6"):
        resident_step((positions, torch.rand(1, 7, 1), temperature, image_rows, block_rows), weights)
    with pytest.raises(RuntimeError, match="pixelcnn weights: expected 12 tensors"):
        resident_step(arguments, weights[:-1])


@pytest.mark.parametrize("name", ["gated", "pixelcnn"])
def test_a_model_too_large_for_a_block_steps_on_the_triton_kernel(monkeypatch, caplog, name):
    # A block too small for the model's activations (here by a budget of 64 bytes; in use, a model larger
    # than the shipped ones): the operator's plan refuses it on a call of no slots, made once per size, and
    # the steps run on the Triton kernel (two calls: each matches the step graph), with one warning.
    op = "gated_step_resident" if name == "gated" else "pixelcnn_step_resident"
    calls = resident_calls(monkeypatch, op)
    monkeypatch.setattr(triton_ops, "RESIDENT_SHARED_BYTES", 64)
    model = tiny(name)
    runner = fused_runner(model, namespace=triton_ops)
    with caplog.at_level("WARNING", logger="genserve.fused"):
        for _ in range(2):
            assert_call_matches_the_graph(runner, model, "step", n=2)
    assert calls == []  # none with slots reached the kernel
    warnings = [r.message for r in caplog.records if "does not fit the resident step kernel" in r.message]
    assert len(warnings) == 1 and re.fullmatch(
        f"{op}: this model does not fit the resident step kernel, its steps run on the Triton kernel "
        r"\(shared_bytes: 64 bytes do not hold a block's activations \(\d+ bytes\)\)", warnings[0]), warnings


@pytest.mark.parametrize("name, threads", [("pixelcnn_3_levels", TINY_THREADS), ("wide", 256)])
def test_threads_run_one_at_a_time_in_random_orders_give_the_same_bits(monkeypatch, name, threads):
    # With the roll: its in-place moves are each thread's own columns, read by others after a barrier.
    assert fused.load_ops()
    model = model_named(name)
    (positions, *rest), weights = step_arguments(model, n=2, span=4, seed=5)
    arguments = (positions - positions % model.config.image_size, *rest)
    teacher = torch.randint(0, model.config.pixel_levels, (2, 4, 1), generator=torch.Generator().manual_seed(5))

    def run():  # sampled, and teacher-forced for every pixel's logits
        pixel, image_rows, block_rows, _ = resident_step(arguments, weights, roll=True, threads=threads)
        *_, logits = resident_step(arguments, weights, teacher, roll=True, threads=threads)
        return pixel, image_rows, *block_rows, logits

    schedules_give_the_same_bits(monkeypatch, run)


def test_a_pixelcnn_of_more_blocks_than_a_block_holds_steps_on_the_triton_kernel(monkeypatch, caplog):
    # The kernel takes the blocks' caches as an array of 32 pointers: a 33-block network falls back too.
    calls = resident_calls(monkeypatch, "pixelcnn_step_resident")
    model = make_model("pixelcnn", image_size=3, hidden_channels=2, num_residual_blocks=33, output_channels=4,
                       first_kernel_size=3, kernel_size=3)
    with caplog.at_level("WARNING", logger="genserve.fused"):
        assert_call_matches_the_graph(fused_runner(model, 1, namespace=triton_ops), model, "step", n=1, span=1)
    assert calls == []
    assert any("pixelcnn weights: 33 residual blocks, more than a block holds (32)" in r.message
               for r in caplog.records)
