"""What both resident step kernels (serving/fused/csrc/*_resident.cuh), run on CPU threads, must do alike:
each step call through the engine's GPU path (triton_ops) matches the step graph it replaces, on slots at
one column or at several, at tiny sizes, a model as wide as the shipped one, and the shipped model's."""

from __future__ import annotations

import pytest

from genserve.export.fused import fused_runner
from genserve.serving.fused import triton_ops
from tests.unit import test_gated_resident as gated
from tests.unit import test_pixelcnn_resident as pixelcnn
from tests.unit.test_fused_ops import assert_call_matches_the_graph, slots_at_different_columns
from tests.unit.test_gated_resident import resident_calls
from tests.unit.test_sampling_engine import tiny

# By kernel: its family's tiny models, its models by name ("wide": as wide as the shipped one), the shipped model.
KERNELS = {
    "gated_step_resident": (gated.GATED_MODELS, gated.model_named, "gated_pixelcnn_mnist"),
    "pixelcnn_step_resident": (pixelcnn.PIXELCNN_MODELS, pixelcnn.model_named, "pixelcnn_mnist"),
}
TINY = [(op, name) for op, (names, _, _) in KERNELS.items() for name in names]


@pytest.mark.parametrize("op, name", [*TINY, *((op, "wide") for op in KERNELS)])
def test_a_resident_step_call_matches_the_step_graph(monkeypatch, op, name):
    calls = resident_calls(monkeypatch, op)
    model = KERNELS[op][1](name)
    assert_call_matches_the_graph(fused_runner(model, namespace=triton_ops), model, "step", n=5)
    assert calls == [5]


@pytest.mark.parametrize("op, name", TINY)
def test_a_resident_step_on_slots_at_different_columns_matches_the_step_graph(monkeypatch, op, name):
    calls = resident_calls(monkeypatch, op)
    model, span = tiny(name), 2
    assert_call_matches_the_graph(fused_runner(model, span, namespace=triton_ops), model, "step", n=5, span=span,
                                  positions=slots_at_different_columns(model, span))
    assert calls == [5]


@pytest.mark.parametrize("op", KERNELS)
def test_the_resident_step_handles_the_shipped_models_sizes(monkeypatch, shipped, op):
    # 32 channels and 64 output channels on the engine's 256 threads (32 groups of 8 lanes: one round per
    # 32-output layer, two per 64-output one); the Gated model's skip weights do not fit beside the rest in
    # shared memory and are read from global memory.
    calls = resident_calls(monkeypatch, op)
    monkeypatch.setattr(triton_ops, "RESIDENT_THREADS", 256)
    model = shipped(KERNELS[op][2]).model
    assert_call_matches_the_graph(fused_runner(model, 7, namespace=triton_ops), model, "step", n=2, span=7)
    assert calls == [2]
