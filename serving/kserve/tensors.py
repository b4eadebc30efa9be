"""KServe v2 inference tensors ↔ numpy, checked against an entry point's manifest as Triton checks them.

A request's inputs arrive as raw little-endian bytes (`raw_input_contents`, what tritonclient
sends) or as typed `contents`; both are accepted. The checks and their messages follow Triton's
own (unknown or missing inputs, data type, shape with the batch axis first, rows within
max_batch_size, byte counts), so a client sees the same refusal from genserve as from Triton.
"""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import service_pb2 as v2

from ..artifacts import Manifest, TensorSpec
from ..errors import InvalidArgument

CONTENTS_FIELD = {"UINT8": "uint_contents", "INT64": "int64_contents", "FP32": "fp32_contents"}


class RequestRefused(InvalidArgument):
    """A v2 request that does not fit its model; the message is Triton's wording, naming the tensor."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _shape(spec: TensorSpec) -> list[int]:
    return [-1, *spec.shape]


def _dims(shape) -> str:
    """A shape as Triton writes it in messages: [-1,16]."""
    return "[" + ",".join(str(d) for d in shape) + "]"


def _fits(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    return len(shape) == len(spec.shape) + 1 and all(d == s or (s == -1 and d >= 1)
                                                     for d, s in zip(shape[1:], spec.shape))


def _decode(tensor: v2.ModelInferRequest.InferInputTensor, raw: bytes | None, spec: TensorSpec,
            model: str) -> np.ndarray:
    shape = tuple(int(d) for d in tensor.shape)
    if tensor.datatype != spec.dtype.name:
        raise RequestRefused(spec.name, f"inference input '{spec.name}' data-type is '{tensor.datatype}', but model "
                             f"'{model}' expects '{spec.dtype.name}'")
    if not _fits(shape, spec):
        raise RequestRefused(spec.name, f"unexpected shape for input '{spec.name}' for model '{model}'. Expected "
                             f"{_dims(_shape(spec))}, got {_dims(shape)}")
    count = int(np.prod(shape))
    wire = spec.dtype.numpy.newbyteorder("<")
    if raw is not None:
        if len(raw) != count * wire.itemsize:
            raise RequestRefused(spec.name, f"unexpected number of bytes for input '{spec.name}' for model "
                                 f"'{model}': expected {count * wire.itemsize}, got {len(raw)}")
        array = np.frombuffer(raw, dtype=wire)
    else:
        values = getattr(tensor.contents, CONTENTS_FIELD[spec.dtype.name])
        if len(values) != count:
            raise RequestRefused(spec.name, f"unexpected number of values for input '{spec.name}' for model "
                                 f"'{model}': expected {count}, got {len(values)}")
        array = np.asarray(values).astype(wire)
    return array.astype(spec.dtype.numpy).reshape(shape)


def request_feeds(request: v2.ModelInferRequest, entry: Manifest) -> dict[str, np.ndarray]:
    """Every input of `entry` from the request, checked (RequestRefused names what is wrong)."""
    model = entry.triton_name
    specs = {spec.name: spec for spec in entry.inputs}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestRefused("raw_input_contents", f"expected {len(request.inputs)} raw input contents, one per "
                             f"input, got {len(raw)}")
    given = [tensor.name for tensor in request.inputs]
    for name in given:
        if name not in specs:
            raise RequestRefused(name, f"unexpected inference input '{name}' for model '{model}'")
    missing = [name for name in specs if name not in given]
    if missing:
        raise RequestRefused(missing[0], f"expected {len(specs)} inputs but got {len(given)} inputs for model "
                             f"'{model}'. Got input(s) {given}, but missing required input(s) {missing}. "
                             "Please provide all required input(s).")
    feeds = {tensor.name: _decode(tensor, raw[k] if raw else None, specs[tensor.name], model)
             for k, tensor in enumerate(request.inputs)}
    rows = {len(array) for array in feeds.values()}
    if len(rows) > 1:
        raise RequestRefused(given[0], f"the inputs of a request to '{model}' must have the same batch size, got "
                             f"{sorted(rows)}")
    (count,) = rows
    if count > entry.batching.max_batch_size:
        raise RequestRefused(given[0], f"inference request batch-size must be <= {entry.batching.max_batch_size} "
                             f"for '{model}'")
    if count == 0:
        raise RequestRefused(given[0], f"inference request to '{model}' has no rows (batch size 0)")
    for name in (output.name for output in request.outputs):
        if name not in {spec.name for spec in entry.outputs}:
            raise RequestRefused(name, f"unexpected inference output '{name}' for model '{model}'")
    return feeds


def request_parameter(request: v2.ModelInferRequest, name: str) -> bool | int | str | float | None:
    """A request parameter's value (whichever of bool, int64, uint64, string, double it holds); None if absent."""
    if name not in request.parameters:
        return None
    parameter = request.parameters[name]
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def infer_response(request: v2.ModelInferRequest, entry: Manifest, outputs: dict[str, np.ndarray],
                   final: bool | None = None) -> v2.ModelInferResponse:
    """The response carrying `outputs` (those the request asked for, or all), as raw little-endian bytes.

    `final` sets the `triton_final_response` parameter Triton puts on streamed responses.
    """
    asked = [output.name for output in request.outputs] or [spec.name for spec in entry.outputs]
    specs = {spec.name: spec for spec in entry.outputs}
    response = v2.ModelInferResponse(model_name=entry.triton_name, model_version=str(entry.versions[-1]),
                                     id=request.id)
    for name in asked:
        array = np.ascontiguousarray(outputs[name], dtype=specs[name].dtype.numpy.newbyteorder("<"))
        response.outputs.add(name=name, datatype=specs[name].dtype.name, shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return response


def tensor_metadata(spec: TensorSpec) -> v2.ModelMetadataResponse.TensorMetadata:
    return v2.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.dtype.name, shape=_shape(spec))

