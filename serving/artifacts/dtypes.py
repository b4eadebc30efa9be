"""The one table of tensor element types: Triton's name, numpy's dtype and torch's dtype together."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """An element type as every layer spells it; `name` is Triton's (and the manifest's).

    torch's dtype is looked up by name when asked for, so what needs only numpy (Triton's ONNX
    entry-point models) never imports torch: a second of start-up and ~230 MB per process."""

    name: str
    numpy: np.dtype
    torch_name: str  # the attribute of the torch module

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)

    def __repr__(self) -> str:
        return self.name


UINT8 = DType("UINT8", np.dtype(np.uint8), "uint8")
INT64 = DType("INT64", np.dtype(np.int64), "int64")
FP32 = DType("FP32", np.dtype(np.float32), "float32")
FP64 = DType("FP64", np.dtype(np.float64), "float64")  # step-program states that must not round (MAF)
DTYPES = {d.name: d for d in (UINT8, INT64, FP32, FP64)}


def dtype_named(name: str) -> DType:
    """The DType of a Triton name; KeyError names the ones there are."""
    try:
        return DTYPES[name]
    except KeyError:
        raise KeyError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def dtype_of(array: np.ndarray | torch.Tensor) -> DType:
    """The DType of a numpy array or torch tensor; KeyError for any other element type."""
    torch = sys.modules.get("torch")  # a tensor exists only where torch was imported
    if torch is not None and isinstance(array, torch.Tensor):
        found = [d for d in DTYPES.values() if d.torch == array.dtype]
    else:
        found = [d for d in DTYPES.values() if d.numpy == np.dtype(array.dtype).newbyteorder("=")]
    if not found:
        raise KeyError(f"no genserve dtype for {array.dtype}; expected one of {sorted(DTYPES)}")
    return found[0]
