"""One named tensor of an entry point or step program, as the manifest and Triton's config declare it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dtypes import DType, dtype_named
from .fields import Fields


@dataclass(frozen=True)
class TensorSpec:
    """`shape` excludes the batch axis; -1 marks a free axis."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    def renamed(self, name: str) -> TensorSpec:
        return TensorSpec(name, self.dtype, self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}

    @classmethod
    def read(cls, fields: Fields) -> TensorSpec:
        shape = fields.get("shape", list)
        if not all(isinstance(s, int) and (s >= 1 or s == -1) for s in shape):
            raise fields.error("shape", f"must list sizes >= 1 or -1, got {shape}")
        try:
            dtype = dtype_named(fields.get("dtype", str))
        except KeyError as error:
            raise fields.error("dtype", str(error.args[0])) from None
        return cls(fields.get("name", str), dtype, tuple(shape))
