"""The fused sampling operators (serving/fused): exact against the network, naive sampling and the graphs.

`make setup` builds the operator library, so these tests run it for real; the fallback tests
take the library away from one process to check what a machine without a build does.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from genserve.export.fused import fused_runner, gated_weights
from genserve.export.steps import step_program
from genserve.serving import fused
from genserve.serving.artifacts import load_manifest
from genserve.serving.engine import (
    EngineConfig,
    FusedStepRunner,
    OnnxStepRunner,
    SamplingEngine,
    TorchStepRunner,
    load_step_runner,
)
from genserve.serving.engine import program as engine_program
from genserve.serving.engine.program import fused_unavailable
from tests.rounding import assert_within_rounding, rounding_sigma
from tests.unit.test_export import REPOSITORY
from tests.unit.test_sampling_engine import labels_for, naive, tiny

GATED = ("gated", "gated_conditional_3_levels")
SAMPLER = REPOSITORY / "gated_pixelcnn_mnist_sample"


def test_the_operator_library_is_built_and_loads():
    status = fused.load_ops()
    assert status, status.reason  # `make setup` builds it; a failure here means setup did not
    assert hasattr(torch.ops.genserve, "gated_step") and hasattr(torch.ops.genserve, "gated_refresh")


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("span", [1, 6])
def test_teacher_forced_fused_logits_equal_the_full_network(name, span):
    # The exactness claim: fed a given image, the fused step's logits at every pixel equal the
    # full network's there, within the float32 rounding of the network (tests/rounding.py).
    model = tiny(name)
    n = 3
    labels = labels_for(model, n)
    label_tensor = None if labels is None else torch.tensor(labels)
    image = torch.from_numpy(naive(model, n, seed=4, labels=labels))  # (n, C, H, W)
    full = model.logits(image, label_tensor).detach()  # (n, L, C, H, W)
    runner = fused_runner(model, span)
    run, recorded = runner.run, []

    def teacher_forced(graph, feeds):
        if graph == "step":  # one job of n samples in n slots: slot k holds sample k
            taken = feeds["positions"] + torch.arange(span)  # (n, span)
            feeds = dict(feeds, teacher=image.flatten(1).gather(1, taken).unsqueeze(2))
        outputs = run(graph, feeds)
        if graph == "step":
            recorded.append(outputs["logits"])  # (n, span, L)
        return outputs

    runner.run = teacher_forced
    engine = SamplingEngine(runner, EngineConfig(num_slots=n))
    job = engine.submit(0, n, labels=labels)
    engine.run_until_idle()
    steps = torch.cat(recorded, 1).permute(0, 2, 1).reshape(full.shape)
    (sigma,) = rounding_sigma(model.logits, [image, label_tensor])
    assert_within_rounding(steps.numpy(), full.numpy(), sigma, f"{name} fused logits")
    assert np.array_equal(job.images, image.numpy())


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("span", [1, 2, 6])
def test_fused_sampling_equals_naive_sampling_on_many_seeds(name, span):
    # Exact equality of images, for the reason test_sampling_engine gives for the step graphs.
    model = tiny(name)
    n = 6
    labels = labels_for(model, n)
    engine = SamplingEngine(fused_runner(model, span), EngineConfig(num_slots=4))
    for seed in range(10):
        assert np.array_equal(engine.generate(seed, n, labels=labels), naive(model, n, seed, labels=labels)), seed
    assert np.array_equal(engine.generate(3, n, 0.0, labels), naive(model, n, 3, 0.0, labels))  # argmax image
    assert np.array_equal(engine.generate(3, n, 0.5, labels), naive(model, n, 3, 0.5, labels))


def test_each_fused_call_matches_the_step_graph_it_replaces():
    # Call by call on the same states (slots at different rows, random caches): what the engine
    # may swap between. Tolerance: the rounding of the eager graph module itself.
    model = tiny("gated_conditional_3_levels")
    c, n = model.config, 5
    program = step_program(model)
    weights = list(gated_weights(model).values())
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, c.pixel_levels, (n, 1, c.image_size, c.image_size), dtype=torch.uint8,
                           generator=generator)
    positions = torch.tensor([[0], [6], [12], [30], [18]])
    labels = torch.tensor([[0], [1], [2], [3], [1]])
    vertical = torch.randn(n, *program.states[0].shape, generator=generator)
    refresh_inputs = (pixels, positions, labels, vertical)
    want = program.refresh.module(*refresh_inputs)
    got = torch.ops.genserve.gated_refresh(*refresh_inputs, weights)
    sigmas = rounding_sigma(program.refresh.module, refresh_inputs)
    for name, g, w, s in zip(("vertical", "links", "image_context", "hidden_context"), got, want, sigmas):
        assert_within_rounding(g.numpy(), w.detach().numpy(), s, f"refresh {name}")
    noise = torch.rand(n, c.image_size, 1, generator=generator)
    temperature = torch.tensor([[1.0], [0.5], [0.0], [2.0], [1.0]])
    step_inputs = (positions, noise, temperature, want[1].detach(), torch.randn(n, *program.states[2].shape),
                   torch.randn(n, *program.states[3].shape))
    want_step = program.step.module(*step_inputs)
    got_step = torch.ops.genserve.gated_step(*step_inputs, None, weights)
    assert torch.equal(got_step[0], want_step[0])  # the chosen pixels (exact, as for the images)
    sigmas = rounding_sigma(program.step.module, step_inputs)
    for name, g, w, s in zip(("image_context", "hidden_context"), got_step[1:3], want_step[1:], sigmas[1:]):
        assert_within_rounding(g.numpy(), w.detach().numpy(), s, f"step {name}")


def test_the_shipped_sampler_runs_fused_and_reproduces_naive_sampling(shipped):
    runner = load_step_runner(load_manifest(SAMPLER))
    assert isinstance(runner, FusedStepRunner)
    engine = SamplingEngine(runner, EngineConfig(num_slots=2))
    assert np.array_equal(engine.generate(21, 2), naive(shipped("gated_pixelcnn_mnist").model, 2, 21))


def test_without_the_operators_the_graphs_run_and_one_line_says_why(monkeypatch, caplog):
    manifest = load_manifest(SAMPLER)
    monkeypatch.setattr(engine_program, "load_ops", lambda: fused.OpsStatus(False, "no operator library at /x"))
    with caplog.at_level(logging.INFO, logger="genserve.engine"):
        runner = load_step_runner(manifest, "torchscript")
    assert isinstance(runner, TorchStepRunner)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "exported torchscript step graphs: no operator library at /x" in line


def test_fused_can_be_declined_and_has_no_cuda_kernel_yet():
    manifest = load_manifest(SAMPLER)
    assert isinstance(load_step_runner(manifest, "onnx", fused=False), OnnxStepRunner)
    assert fused_unavailable(manifest, "cuda") == "genserve::gated_step has no CUDA implementation in this build"
    pixelcnn = load_manifest(REPOSITORY / "pixelcnn_mnist_sample")
    assert pixelcnn.step.kind == "graphs" and isinstance(load_step_runner(pixelcnn), OnnxStepRunner)


@pytest.mark.parametrize("state, reason", [
    ("missing", "no operator library at"),
    ("stale", "was built from other sources"),
])
def test_a_missing_or_stale_build_is_not_loaded(tmp_path, state, reason):
    # In a fresh process (a loaded library cannot be unloaded): point the package at another build folder.
    build = tmp_path / "_build"
    build.mkdir()
    if state == "stale":
        (build / fused.library_path().name).write_bytes(fused.library_path().read_bytes())
        (build / f"{fused.LIBRARY_NAME}.sha256").write_text("0" * 64 + "\n")
    code = ("from pathlib import Path; from genserve.serving import fused; "
            f"fused.BUILD_DIR = Path({str(build)!r}); s = fused.load_ops(); print(s.loaded, s.reason)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("False") and reason in result.stdout


def test_the_operators_refuse_mismatched_tensors_naming_them():
    model = tiny("gated")
    weights = list(gated_weights(model).values())
    c = model.config
    links = torch.zeros(1, c.num_layers, 2 * c.hidden_channels, c.image_size)
    image_context = torch.zeros(1, c.first_kernel_size // 2 + 1)
    hidden_context = torch.zeros(1, c.num_layers - 1, (c.kernel_size // 2) * c.hidden_channels)
    good = (torch.zeros(1, 1, dtype=torch.long), torch.rand(1, 2, 1), torch.ones(1, 1), links, image_context,
            hidden_context)
    with pytest.raises(RuntimeError, match="links: shape"):
        torch.ops.genserve.gated_step(*good[:3], links[:, :-1], *good[4:], None, weights)
    with pytest.raises(RuntimeError, match="noise: expected a contiguous CPU tensor"):
        torch.ops.genserve.gated_step(good[0], good[1].double(), *good[2:], None, weights)
    with pytest.raises(RuntimeError, match="gated weights: expected 18 tensors"):
        torch.ops.genserve.gated_step(*good, None, weights[:-1])


def test_build_ops_check_reports_the_loaded_library():
    result = subprocess.run([sys.executable, "-m", "genserve.clients.cli", "build-ops", "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("loaded "), result.stdout + result.stderr
