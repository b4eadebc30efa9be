"""The resident Gated step kernel (serving/fused/csrc/gated_resident.cuh), run on CPU threads.

The operator library builds the kernel's very source for the CPU (csrc/device.h: a block's threads
are real threads meeting at real barriers, its warp shuffles exchanges through memory), so the
kernel a GPU runs is checked here: call by call against the step graphs and the CPU operator,
images against naive sampling through the engine's own GPU path (triton_ops, the refresh in
Triton's interpreter), and its CUDA build compiled by nvcc for an H100 without running it.
The emulation takes ~0.1 s per pixel at 256 threads, so the models are the tiny ones, with 64.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from genserve.export.fused import fused_runner
from genserve.serving import fused
from genserve.serving.engine import EngineConfig, SamplingEngine
from genserve.serving.fused import triton_ops
from tests.conftest import make_model
from tests.unit.test_fused_ops import (
    assert_teacher_forced_logits_equal_the_network,
    gated_step_arguments,
)
from tests.unit.test_sampling_engine import generate, labels_for, mirrored, naive, tiny

GATED_MODELS = ["gated", "gated_conditional_3_levels", "pixel_vae"]
TINY_THREADS = 64  # 8 groups of 8 lanes: fewer groups than the tiny models' outputs, so groups take several


def wide():
    """A tiny Gated PixelCNN as wide as the shipped one (32 channels, 64 output channels): its matrices'
    rows are multiples of 32 floats, kept permuted in shared memory, and at 256 threads (32 groups) its
    skip weights are held in registers."""
    return make_model("gated_pixelcnn", image_size=6, hidden_channels=32, num_layers=3, kernel_size=3,
                      first_kernel_size=5, output_channels=64)


def model_named(name: str):
    return wide() if name == "wide" else tiny(name)


def resident_calls(monkeypatch, op_name: str) -> list[int]:
    """The engine's GPU path (triton_ops) with its steps on the resident kernels, as
    GENSERVE_RESIDENT_STEP_SLOTS sets it, on CPU threads: every step call of up to 16 slots. Returns the
    slot counts of the calls that reach `op_name` with slots (not triton_ops' probes of whether a model
    fits, on none), to know the tests test it."""
    assert fused.load_ops()
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the GPU path's other kernels run in Triton's interpreter here; tests/gpu runs them compiled")
    monkeypatch.setattr(triton_ops, "RESIDENT_STEP_SLOTS", 16)
    monkeypatch.setattr(triton_ops, "RESIDENT_THREADS", TINY_THREADS)
    monkeypatch.setattr(triton_ops, "_resident_fits", {})
    calls = []
    op = getattr(torch.ops.genserve, op_name)

    def counted(*args):
        if args[0].shape[0]:
            calls.append(args[0].shape[0])
        return op(*args)

    monkeypatch.setattr(torch.ops.genserve, op_name, counted)
    return calls


@pytest.fixture
def resident(monkeypatch):
    return resident_calls(monkeypatch, "gated_step_resident")


def step_arguments(model, n: int, span: int, seed: int = 0):
    """A step call's inputs for n slots at rows 0, 1, 2, ... (random links and contexts) and the weights."""
    c = model.config
    good, weights = gated_step_arguments(model)
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(n).unsqueeze(1) * c.image_size
    noise = torch.rand(n, span, 1, generator=generator)
    temperature = torch.tensor([1.0, 0.5, 0.0] * n)[:n].unsqueeze(1)
    links = torch.randn(n, *good[3].shape[1:], generator=generator)
    image_context = torch.randn(n, good[4].shape[1], generator=generator)
    hidden_context = torch.randn(n, *good[5].shape[1:], generator=generator)
    return (positions, noise, temperature, links, image_context, hidden_context), weights


def resident_step(arguments, weights, teacher=None, threads=TINY_THREADS, shared_bytes=-1):
    """The operator on copies of the contexts: (pixel, image_context, hidden_context, logits)."""
    positions, noise, temperature, links, image_context, hidden_context = arguments
    image_out, hidden_out = image_context.clone(), hidden_context.clone()
    pixel = torch.empty(*noise.shape, dtype=torch.long, device=noise.device)
    logits = noise.new_empty(noise.shape[0] if teacher is not None else 0, noise.shape[1], weights[16].shape[1])
    torch.ops.genserve.gated_step_resident(positions, noise, temperature, links, image_out, hidden_out, teacher,
                                           pixel, logits, weights, threads, shared_bytes)
    return pixel, image_out, hidden_out, logits


@pytest.mark.parametrize("name, span, temperature", [
    ("gated", 1, 1.0),
    ("gated", None, 0.0),
    ("gated_conditional_3_levels", 2, 0.5),
    ("gated_conditional_3_levels", None, 1.0),
    ("pixel_vae", None, 1.0),
])
def test_resident_sampling_equals_naive_sampling(resident, name, span, temperature):
    # The engine's GPU path: whole-row calls (span None) on controls kept as tensors, images copied out
    # as samples finish; a job of 5 samples in 3 slots, so two join as others finish.
    model = tiny(name)
    n = 5
    labels = labels_for(model, n)
    engine = SamplingEngine(fused_runner(model, span, namespace=triton_ops), EngineConfig(num_slots=3))
    engine = mirrored(engine) if span is None else engine
    images = generate(engine, model, 6, n, temperature, labels)
    assert np.array_equal(images, naive(model, n, 6, temperature, labels))
    assert resident and max(resident) <= 3


def test_teacher_forced_resident_logits_equal_the_full_network(resident):
    model = tiny("gated_conditional_3_levels")
    assert_teacher_forced_logits_equal_the_network(model, fused_runner(model, 6, namespace=triton_ops))
    assert resident


@pytest.mark.parametrize("name", ["gated", "gated_conditional_3_levels", "wide"])
def test_the_resident_step_chooses_the_cpu_operators_pixels(name):
    # Without the interpreter or the engine: the operator against the CPU operator on the same inputs,
    # three slots at temperatures 1, 0.5 and 0, a whole row each (contexts and logits are compared with
    # the step graph's rounding above); with a teacher, the teacher's pixels.
    assert fused.load_ops()
    model = model_named(name)
    arguments, weights = step_arguments(model, n=3, span=model.config.image_size)
    want = torch.ops.genserve.gated_step(*arguments, None, weights)
    assert torch.equal(resident_step(arguments, weights)[0], want[0])
    teacher = torch.randint(0, model.config.pixel_levels, want[0].shape)
    assert torch.equal(resident_step(arguments, weights, teacher)[0], teacher)


def activation_bytes(step, arguments, weights) -> int:
    """The shared memory a block of a resident kernel needs for its activations alone, as the operator's
    refusal of less says; `step` runs the operator (a test file's `resident_step`)."""
    with pytest.raises(RuntimeError, match="do not hold a block's activations") as refusal:
        step(arguments, weights, shared_bytes=64)
    return int(re.search(r"\((\d+) bytes\)", str(refusal.value)).group(1))


@pytest.mark.parametrize("name", ["gated_conditional_3_levels", "wide"])
def test_where_the_weights_are_read_from_and_the_thread_count_do_not_change_the_bits(name):
    # The budget decides only where each weight is read from (shared memory, permuted where its rows are
    # multiples of 32 floats, or global memory): all of them, some, or none of them in shared memory.
    # The thread count decides how many outputs a group takes in turn, and at 256 threads whether the
    # wide model's skip weights are held in registers. Every output is the same lanes' parts, in the same
    # order, added by the same butterfly.
    assert fused.load_ops()
    model = model_named(name)
    arguments, weights = step_arguments(model, n=2, span=6, seed=3)
    least = activation_bytes(resident_step, arguments, weights)
    want = resident_step(arguments, weights)
    for threads in (32, 128, 256):
        for budget in (-1, least + 4 * 1024, least):
            got = resident_step(arguments, weights, threads=threads, shared_bytes=budget)
            for value, expected in zip(got[:3], want[:3]):
                assert torch.equal(value, expected), (threads, budget)


def test_the_resident_operator_refuses_bad_arguments_naming_them():
    assert fused.load_ops()
    model = tiny("gated")
    arguments, weights = step_arguments(model, n=1, span=2)
    with pytest.raises(RuntimeError, match="threads: a multiple of 32"):
        resident_step(arguments, weights, threads=48)
    with pytest.raises(RuntimeError, match=r"shared_bytes: 64 bytes do not hold a block's activations"):
        resident_step(arguments, weights, shared_bytes=64)
    positions, noise, *rest = arguments
    with pytest.raises(RuntimeError, match="noise: expected a contiguous cpu tensor of 3 dims and type Float"):
        resident_step((positions, noise.double(), *rest), weights)
    with pytest.raises(RuntimeError, match="links: shape"):
        resident_step((positions, noise, rest[0], rest[1][:, :-1], *rest[2:]), weights)
    with pytest.raises(RuntimeError, match="gated weights: expected 18 tensors"):
        resident_step(arguments, weights[:-1])


NVCC = shutil.which("nvcc")
TORCH_INCLUDE = Path(torch.__file__).parent / "include"


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
def test_the_cuda_build_compiles_for_an_h100_without_spills(tmp_path):
    # What `genserve build-ops` compiles on a GPU machine, compiled here: the kernels' launches by nvcc for
    # sm_90a (ptxas reports each kernel's registers and spills), the operators around them by the host
    # compiler against this torch's headers (the CPU wheel lacks one generated header of its CUDA build: a
    # one-line stand-in).
    registration, launch = (fused.SOURCE_DIR / name for name in fused.CUDA_SOURCES)  # the .cpp, then the .cu
    result = subprocess.run([NVCC, "-c", str(launch), "-o", str(tmp_path / "launch.o"), "-arch=sm_90a",
                             *fused.CUDA_CFLAGS, "-Xptxas", "-v", "-I", str(fused.SOURCE_DIR)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for kernel in ("gated_step_resident_kernel", "pixelcnn_step_resident_kernel"):
        usage = re.search(rf"Function properties for \S*{kernel}\S*\s+(\d+) bytes stack frame, (\d+) bytes spill "
                          rf"stores, (\d+) bytes spill loads\s+ptxas info\s+: Used (\d+) registers", result.stderr)
        assert usage, (kernel, result.stderr[-3000:])
        stack, stores, loads, registers = map(int, usage.groups())
        assert stores == loads == 0, kernel
        assert registers * triton_ops.RESIDENT_THREADS <= 65536, kernel  # the block fits one SM's register file

    stand_in = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    # Where this nvcc finds cuda_runtime.h: the CUDA runtime's headers, which the operator includes.
    preprocessed = subprocess.run([NVCC, "-E", "-x", "cu", "-"], input="#include <cuda_runtime.h>\n",
                                  capture_output=True, text=True, timeout=120).stdout
    cuda_include = Path(re.search(r'# \d+ "([^"]*)/cuda_runtime\.h"', preprocessed).group(1))
    result = subprocess.run(
        ["g++", "-fsyntax-only", *fused.CUDA_CFLAGS, str(registration), "-I", str(tmp_path),
         "-I", str(TORCH_INCLUDE), "-I", str(TORCH_INCLUDE / "torch" / "csrc" / "api" / "include"),
         "-I", str(cuda_include), "-I", str(fused.SOURCE_DIR)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def schedules_give_the_same_bits(monkeypatch, run) -> None:
    """`run()`'s tensors with the block's threads free-running, then run one at a time in two seeded
    orders (GENSERVE_EMULATION_SEED: csrc/device.h's Scheduler, shared memory starting as NaNs): equal
    bit for bit, or a read races another thread's write, or reads what no thread wrote."""
    want = run()
    for seed in ("1", "2"):
        monkeypatch.setenv("GENSERVE_EMULATION_SEED", seed)
        for got, expected in zip(run(), want):
            assert torch.equal(got, expected), seed


@pytest.mark.parametrize("name, threads", [("gated_conditional_3_levels", TINY_THREADS), ("wide", 256)])
def test_threads_run_one_at_a_time_in_random_orders_give_the_same_bits(monkeypatch, name, threads):
    # Sampled, and teacher-forced for every pixel's logits (a sampled pixel of 2 levels may come out the
    # same from wrong logits).
    assert fused.load_ops()
    model = model_named(name)
    arguments, weights = step_arguments(model, n=2, span=4, seed=5)
    teacher = torch.randint(0, model.config.pixel_levels, (2, 4, 1), generator=torch.Generator().manual_seed(5))
    schedules_give_the_same_bits(monkeypatch, lambda: (*resident_step(arguments, weights, threads=threads)[:3],
                                                       *resident_step(arguments, weights, teacher, threads=threads)))
