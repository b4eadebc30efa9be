"""Reading a model's `genserve.json` manifest and checking its artifacts before loading.

`serving` knows artifacts and manifests only (offline model code stays in `export`). The
manifest format is written by `genserve export` (export/repository.py); this is
its reader, and nothing is loaded whose sha256 differs from what the manifest records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "genserve.json"
MANIFEST_FORMAT = "genserve-manifest/1"
NUMPY_DTYPES = {"UINT8": np.uint8, "INT64": np.int64, "FP32": np.float32}


class ArtifactIntegrityError(RuntimeError):
    """An artifact is missing or its sha256 differs from the manifest's: it is not loaded."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # Triton's name: UINT8, INT64, FP32
    shape: tuple[int, ...]  # without the batch axis; -1 is a free axis

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorInfo:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class Manifest:
    folder: Path
    triton_name: str
    model: str
    family: str
    entry_point: str
    capabilities: tuple[str, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    model_config: dict[str, Any]
    metrics: dict[str, Any]
    artifacts: dict[str, str]  # "VERSION/FILE" → sha256
    raw: dict[str, Any]

    @property
    def versions(self) -> list[int]:
        return sorted({int(key.split("/", 1)[0]) for key in self.artifacts})

    def artifact(self, filename: str, version: int | None = None) -> Path:
        """The verified path of `filename` in `version` (default: the newest)."""
        version = version if version is not None else self.versions[-1]
        key = f"{version}/{filename}"
        if key not in self.artifacts:
            raise ArtifactIntegrityError(f"{self.triton_name}: the manifest lists no artifact {key}")
        path = self.folder / key
        if not path.is_file():
            raise ArtifactIntegrityError(f"{self.triton_name}: artifact {path} is missing")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != self.artifacts[key]:
            raise ArtifactIntegrityError(
                f"{self.triton_name}: {path} has sha256 {digest[:16]}…, the manifest says "
                f"{self.artifacts[key][:16]}…; refusing to load it"
            )
        return path


def load_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    raw = json.loads((folder / MANIFEST).read_text())
    if raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{folder / MANIFEST}: not a {MANIFEST_FORMAT} manifest (format={raw.get('format')!r})")
    return Manifest(
        folder=folder,
        triton_name=raw["triton_name"],
        model=raw["model"],
        family=raw["family"],
        entry_point=raw["entry_point"],
        capabilities=tuple(raw["capabilities"]),
        inputs=tuple(TensorInfo.from_dict(t) for t in raw["inputs"]),
        outputs=tuple(TensorInfo.from_dict(t) for t in raw["outputs"]),
        model_config=raw["model_config"],
        metrics=raw["metrics"],
        artifacts=raw["artifacts"],
        raw=raw,
    )
