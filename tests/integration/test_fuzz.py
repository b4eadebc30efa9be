"""Property-based fuzzing of every RPC against a real server on loopback: no INTERNAL, no UNKNOWN.

Hypothesis draws requests over every field's whole wire range (model names, counts, seeds,
temperatures including NaN and infinities, labels, and tensors whose dtype, shape and bytes
agree or disagree), sends each to a real embedded server, and requires a status a client can act
on. Bounded: a fixed number of derandomised examples per RPC and a deadline per call, so the run
is reproducible and takes well under a minute.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.v1 import generative_pb2 as pb
from tests.integration.server_fixtures import Connected, images_of, server_config

MODELS = ["pixelcnn_mnist", "gated_pixelcnn_mnist", "vae_mnist", "iaf_vae_mnist", "vae_gan_mnist", "aae_mnist",
          "dcgan_mnist", "realnvp_mnist", "flow_gan_mnist", "pixel_vae_mnist", "maf_mnist"]
ACTIONABLE = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

INT32, INT64, UINT64 = (-(2**31), 2**31 - 1), (-(2**63), 2**63 - 1), (0, 2**64 - 1)


def wide(bounds: tuple[int, int], small: tuple[int, int] = (-3, 40)) -> st.SearchStrategy[int]:
    """Mostly small values, sometimes the extremes of the wire type, sometimes anything between."""
    lo, hi = bounds
    return st.one_of(st.integers(max(lo, small[0]), small[1]), st.sampled_from([lo, hi]), st.integers(lo, hi))


models = st.one_of(st.sampled_from(MODELS), st.sampled_from(MODELS), st.text(max_size=12))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
labels = st.lists(wide(INT64, (-2, 12)), max_size=4)


EXTREME_SIZES = [2**60, 2**62, 2**63 - 1, 0, -1]  # 2**60 rows of 784 bytes wrap around 64 bits to 0 bytes


@st.composite
def tensors(draw, dtype: int, shapes: list[list[int]], broken: str) -> pb.Tensor:
    """One of the field's real shapes with the right bytes, then one part of it `broken`: the dtype,
    one axis (to an extreme size), the byte length, the whole thing made up, or "none"."""
    itemsize = {pb.DATA_TYPE_UINT8: 1, pb.DATA_TYPE_FLOAT32: 4}[dtype]
    shape = [draw(st.integers(1, 3)), *draw(st.sampled_from(shapes))]
    # random bytes of the right length, from a drawn seed (cheaper for Hypothesis than drawing each byte)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.integers(0, 256, int(np.prod(shape)) * itemsize, dtype=np.uint8).tobytes()
    if broken == "dtype":
        dtype = draw(st.one_of(st.sampled_from([pb.DATA_TYPE_UNSPECIFIED, pb.DATA_TYPE_INT64, pb.DATA_TYPE_UINT8,
                                                pb.DATA_TYPE_FLOAT32]), st.integers(*INT32)))
    elif broken == "axis":
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] = draw(st.one_of(st.sampled_from(EXTREME_SIZES), st.integers(*INT64)))
        data = draw(st.one_of(st.just(b""), st.just(data)))
    elif broken == "length":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))] + draw(st.binary(max_size=3))
    elif broken == "anything":
        shape = draw(st.lists(wide(INT64, (-1, 30)), max_size=5))
        dtype, data = draw(st.integers(*INT32)), draw(st.binary(max_size=64))
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


def optional(strategy):
    return st.one_of(st.none(), strategy)


def message(cls, **fields):
    """A request with the drawn fields that are not None (None: the field is left unset)."""
    return st.fixed_dictionaries(fields).map(lambda f: cls(**{k: v for k, v in f.items() if v is not None}))


BROKEN = ["none", "dtype", "axis", "length", "anything"]


def requests(method: str, broken: str) -> st.SearchStrategy:
    """Requests of one RPC; their tensors (if any) broken as `broken` says, every other field drawn freely."""
    images = optional(tensors(pb.DATA_TYPE_UINT8, [[1, 28, 28]], broken))
    latents = optional(tensors(pb.DATA_TYPE_FLOAT32, [[16], [8], [1, 28, 28], [64]], broken))  # VAEs, AAE, flows, DCGAN
    return {
        "GetModel": lambda: message(pb.GetModelRequest, model=models),
        "Sample": lambda: message(pb.SampleRequest, model=models, num_samples=wide(INT32, (-2, 4)),
                                  seed=optional(wide(UINT64)), start_index=wide(UINT64), temperature=optional(floats),
                                  labels=labels, return_png=st.booleans()),
        "SampleStream": lambda: message(pb.SampleRequest, model=models, num_samples=wide(INT32, (-2, 3)),
                                        seed=optional(wide(UINT64)), temperature=optional(floats), labels=labels),
        "Encode": lambda: message(pb.EncodeRequest, model=models, images=images),
        "Decode": lambda: message(pb.DecodeRequest, model=models, latents=latents, labels=labels,
                                  return_png=st.booleans()),
        "Score": lambda: message(pb.ScoreRequest, model=models, images=images, labels=labels,
                                 seed=optional(wide(UINT64)), importance_samples=optional(wide(INT32, (-2, 12)))),
    }[method]()


CASES = [(m, "none") for m in ("GetModel", "Sample", "SampleStream")] + [
    (m, b) for m in ("Encode", "Decode", "Score") for b in BROKEN]


@pytest.fixture(scope="module")
def api():
    connected = Connected(server_config())
    yield connected
    connected.close()


def call(api, method: str, request) -> str:
    """The status code name a request ends with (streams are read to the end)."""
    try:
        result = getattr(api.stub, method)(request, timeout=10)
        if method == "SampleStream":
            list(result)
        return "OK"
    except grpc.RpcError as error:
        assert error.code().name in ACTIONABLE, (method, request, error.code(), error.details())
        return error.code().name


@pytest.mark.parametrize(("method", "broken"), CASES)
def test_no_request_ends_internal_or_unknown_and_the_server_keeps_answering(api, method, broken):
    reference = images_of(api.stub.Sample(pb.SampleRequest(model="vae_mnist", num_samples=2, seed=5)))
    codes: list[str] = []

    @FUZZ
    @given(request=requests(method, broken))
    def fuzz(request):
        codes.append(call(api, method, request))

    fuzz()
    assert len(codes) >= 20 and "INVALID_ARGUMENT" in codes  # the fuzzer ran, and reached validation
    # a valid request still gets the right answer: the same seed's images as before the fuzzing
    again = images_of(api.stub.Sample(pb.SampleRequest(model="vae_mnist", num_samples=2, seed=5)))
    assert np.array_equal(again, reference)
