"""numpy ↔ genserve.v1.Tensor on the client side (raw little-endian, row-major bytes)."""

from __future__ import annotations

import numpy as np

from genserve.v1 import generative_pb2 as pb

DTYPES = {pb.DATA_TYPE_UINT8: np.dtype("u1"), pb.DATA_TYPE_INT64: np.dtype("<i8"),
          pb.DATA_TYPE_FLOAT32: np.dtype("<f4")}
CODES = {np.dtype(np.uint8): pb.DATA_TYPE_UINT8, np.dtype(np.int64): pb.DATA_TYPE_INT64,
         np.dtype(np.float32): pb.DATA_TYPE_FLOAT32}


def to_tensor(array: np.ndarray, dtype: np.dtype) -> pb.Tensor:
    """`array` converted to `dtype` (uint8, int64 or float32) as a Tensor message."""
    array = np.asarray(array)
    code = CODES[np.dtype(dtype)]
    return pb.Tensor(shape=list(array.shape), dtype=code, data=np.ascontiguousarray(array, DTYPES[code]).tobytes())


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """A writable native-endian array of the message's dtype and shape."""
    wire = DTYPES[tensor.dtype]
    return np.frombuffer(tensor.data, wire).reshape(tuple(tensor.shape)).astype(wire.newbyteorder("="))
