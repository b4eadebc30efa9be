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
from genserve.serving.engine.program import fused_unavailable
from tests.unit.test_export import REPOSITORY
from tests.unit.test_fused_ops import FUSED_MODELS, assert_call_matches_the_graph
from tests.unit.test_sampling_engine import labels_for, naive, tiny

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
@pytest.mark.parametrize("span", [1, 2, 6])
def test_cuda_sampling_equals_naive_sampling_on_many_seeds(name, span):
    model = tiny(name)
    n = 6
    labels = labels_for(model, n)
    engine = SamplingEngine(fused_runner(model, span, device="cuda"), EngineConfig(num_slots=4))
    for seed in range(10):
        assert np.array_equal(engine.generate(seed, n, labels=labels), naive(model, n, seed, labels=labels)), seed
    for temperature in (0.0, 0.5):
        assert np.array_equal(engine.generate(3, n, temperature, labels), naive(model, n, 3, temperature, labels))


@pytest.mark.parametrize("name", ["gated_pixelcnn_mnist", "pixelcnn_mnist"])
def test_the_shipped_samplers_run_on_the_gpu_kernels_and_reproduce_naive_sampling(shipped, name):
    runner = load_step_runner(load_manifest(REPOSITORY / f"{name}_sample"), "torchscript", "cuda")
    assert isinstance(runner, FusedStepRunner) and runner.device.type == "cuda"
    engine = SamplingEngine(runner, EngineConfig(num_slots=3))
    model = shipped(name).model
    for temperature in (1.0, 0.5, 0.0):
        assert np.array_equal(engine.generate(21, 3, temperature), naive(model, 3, 21, temperature)), temperature


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
