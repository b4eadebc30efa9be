"""MAF: triangular layers, the exact change of variables, a float64 inverse, and its cached engine program."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genserve.export.models import MAFConfig
from genserve.export.steps import eager_runner, step_program
from genserve.serving.engine import EngineConfig, SamplingEngine
from tests.conftest import make_model


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


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.0])
def test_cached_engine_inversion_equals_the_naive_one_exactly(temperature):
    # Both paths compute in float64, so no pixel sits within rounding of a bin edge in practice:
    # the images are equal, for samples split across fewer slots than requested.
    model = make_model("maf", image_size=6, hidden_units=12)
    engine = SamplingEngine(eager_runner(model), EngineConfig(num_slots=4))
    for seed in range(8):
        latents = model.prior_latents(seed, range(6), temperature).numpy()
        cached = engine.generate(seed, 6, temperature, latents=latents)
        assert np.array_equal(cached, model.sample(6, seed, temperature).numpy()), seed


def test_decoding_joins_a_running_batch_and_gives_each_latents_own_image():
    model = make_model("maf", image_size=6, hidden_units=12)
    engine = SamplingEngine(eager_runner(model), EngineConfig(num_slots=5))
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
