"""genserve.v1.Tensor ↔ numpy, refusing anything whose bytes do not match its shape and dtype."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from genserve.v1 import generative_pb2 as pb

from .artifacts import FP32, INT64, UINT8
from .errors import InvalidArgument

# The wire's code for each genserve dtype; little-endian on the wire whatever the host's byte order.
WIRE_CODES = {pb.DATA_TYPE_UINT8: UINT8, pb.DATA_TYPE_INT64: INT64, pb.DATA_TYPE_FLOAT32: FP32}
WIRE_DTYPES = {code: d.numpy.newbyteorder("<") for code, d in WIRE_CODES.items()}
DTYPE_NAMES = {code: d.numpy.name for code, d in WIRE_CODES.items()}
_CODES = {d.numpy: code for code, d in WIRE_CODES.items()}


def to_numpy(tensor: pb.Tensor, field: str, dtype: int, shape: Sequence[int | None]) -> np.ndarray:
    """Decodes `tensor`, checking it against what `field` must hold.

    Args:
        tensor: the message as received.
        field: the request field's name, for error messages.
        dtype: the DataType the field must have.
        shape: the expected shape; None marks a free axis (the batch axis, >= 1).

    Raises:
        InvalidArgument: wrong dtype, rank, shape or byte length, or an empty batch.
    """
    expected = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
    if tensor.dtype != dtype:
        got = DTYPE_NAMES.get(tensor.dtype, pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values()
                              else str(tensor.dtype))
        raise InvalidArgument(f"{field}.dtype", f"expected {DTYPE_NAMES[dtype]}, got {got}")
    got_shape = tuple(tensor.shape)
    if len(got_shape) != len(shape) or any(s is not None and g != s for g, s in zip(got_shape, shape)):
        raise InvalidArgument(f"{field}.shape", f"expected {expected}, got {list(got_shape)}")
    if any(g < 1 for g in got_shape):
        raise InvalidArgument(f"{field}.shape", f"every axis must be >= 1, got {list(got_shape)}")
    wire = WIRE_DTYPES[dtype]
    size = math.prod(got_shape) * wire.itemsize  # Python integers: a huge shape cannot wrap around
    if len(tensor.data) != size:
        needs = f"shape {list(got_shape)} of {DTYPE_NAMES[dtype]} needs {size} bytes"
        raise InvalidArgument(f"{field}.data", f"{needs}, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=wire).reshape(got_shape).astype(wire.newbyteorder("="), copy=True)


def from_numpy(array: np.ndarray) -> pb.Tensor:
    """Encodes a uint8, int64 or float32 array (other dtypes are a server bug: ValueError)."""
    dtype = np.dtype(array.dtype).newbyteorder("=")
    if dtype not in _CODES:
        raise ValueError(f"no wire dtype for {array.dtype}")
    code = _CODES[dtype]
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[code]).tobytes()
    return pb.Tensor(shape=list(array.shape), dtype=code, data=data)


def png_bytes(image: np.ndarray, pixel_levels: int) -> bytes:
    """One (C, H, W) uint8 image as a PNG, values stretched from [0, pixel_levels) to [0, 255]; one
    (C, T) mu-law clip as a PNG of its waveform."""
    from PIL import Image

    if image.ndim == 2:
        from genserve.clients.audio import waveforms_png

        buffer = io.BytesIO()
        waveforms_png(image[None], pixel_levels).save(buffer, format="PNG")
        return buffer.getvalue()
    scaled = (image.astype(np.float32) * (255.0 / max(pixel_levels - 1, 1))).round().astype(np.uint8)
    pixels = scaled[0] if scaled.shape[0] == 1 else scaled.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
