"""The one table of tensor element types: Triton's name, numpy's dtype and torch's dtype together."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DType:
    """An element type as every layer spells it; `name` is Triton's (and the manifest's)."""

    name: str
    numpy: np.dtype
    torch: torch.dtype

    def __repr__(self) -> str:
        return self.name


UINT8 = DType("UINT8", np.dtype(np.uint8), torch.uint8)
INT64 = DType("INT64", np.dtype(np.int64), torch.int64)
FP32 = DType("FP32", np.dtype(np.float32), torch.float32)
FP64 = DType("FP64", np.dtype(np.float64), torch.float64)  # step-program states that must not round (MAF)
DTYPES = {d.name: d for d in (UINT8, INT64, FP32, FP64)}


def dtype_named(name: str) -> DType:
    """The DType of a Triton name; KeyError names the ones there are."""
    try:
        return DTYPES[name]
    except KeyError:
        raise KeyError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def dtype_of(array: np.ndarray | torch.Tensor) -> DType:
    """The DType of a numpy array or torch tensor; KeyError for any other element type."""
    if isinstance(array, torch.Tensor):
        found = [d for d in DTYPES.values() if d.torch == array.dtype]
    else:
        found = [d for d in DTYPES.values() if d.numpy == np.dtype(array.dtype).newbyteorder("=")]
    if not found:
        raise KeyError(f"no genserve dtype for {array.dtype}; expected one of {sorted(DTYPES)}")
    return found[0]
