"""`genserve.json`: what one Triton model of a genserve repository is, and the sha256 of its artifacts.

`genserve export` writes manifests only through `write_manifest`; the server, the engine and
Triton's Python models read them only through `load_manifest`, so the format lives here
alone. Nothing is loaded whose sha256 differs from what the manifest records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .fields import Fields, ManifestError
from .specs import TensorSpec
from .step import StepSection

MANIFEST = "genserve.json"
# /2: the step section names its kind; TorchScript artifacts carry no debug source ranges.
MANIFEST_FORMAT = "genserve-manifest/2"
FLAVOURS = ("python", "native")  # python: pip-installable Triton (CPU); native: NVIDIA's containers
# How an output reduces over its inputs' free axis (a VAE score's K importance samples): the mean of
# per-sample values (the ELBO), or the log of the mean of their exponentials (the IWAE bound).
FREE_AXIS_REDUCTIONS = ("mean", "log_mean_exp")


class ArtifactIntegrityError(RuntimeError):
    """An artifact is missing or its sha256 differs from the manifest's: it is not loaded."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Batching:
    """What Triton's dynamic batcher is configured with; genserve's embedded batchers and engines read it too."""

    max_batch_size: int
    max_queue_delay_microseconds: int

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_delay_microseconds < 0:
            raise ValueError(f"batching: max_batch_size must be >= 1 and the delay >= 0, got {self}")


@dataclass(frozen=True)
class Training:
    """Where the checkpoint came from (each field absent for checkpoints that do not record it)."""

    data: str | None = None
    dataset: str | None = None
    seed: int | None = None
    epochs_done: int | None = None
    command: str | None = None


@dataclass(frozen=True)
class Manifest:
    """One Triton model's manifest. `folder` is where it was read from (not written)."""

    triton_name: str
    model: str
    family: str
    entry_point: str
    capabilities: tuple[str, ...]
    model_config: Mapping[str, Any]  # the family's config dataclass as a dict
    training: Training
    metrics: Mapping[str, Any]  # held-out figures, as the model card reports them
    flavour: str
    batching: Batching
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    torchscript: str | None = None  # how the TorchScript artifact was made (entry points)
    step: StepSection | None = None  # the cached step program (samplers)
    # Output name → its reduction over the free axis (FREE_AXIS_REDUCTIONS), given for every output or none:
    # where given, a row's free axis may run in pieces whose outputs are then reduced as it says.
    free_axis: Mapping[str, str] = field(default_factory=dict)
    artifacts: Mapping[str, str] = field(default_factory=dict)  # "VERSION/FILE" → sha256
    folder: Path | None = None

    @property
    def versions(self) -> list[int]:
        return sorted({int(key.split("/", 1)[0]) for key in self.artifacts})

    def artifact(self, filename: str, version: int | None = None) -> Path:
        """The verified path of `filename` in `version` (default: the newest)."""
        if self.folder is None:
            raise ArtifactIntegrityError(f"{self.triton_name}: the manifest was not read from a folder")
        version = version if version is not None else self.versions[-1]
        key = f"{version}/{filename}"
        if key not in self.artifacts:
            raise ArtifactIntegrityError(f"{self.triton_name}: the manifest lists no artifact {key}")
        path = self.folder / key
        if not path.is_file():
            raise ArtifactIntegrityError(f"{self.triton_name}: artifact {path} is missing")
        digest = sha256(path)
        if digest != self.artifacts[key]:
            raise ArtifactIntegrityError(
                f"{self.triton_name}: {path} has sha256 {digest[:16]}…, the manifest says "
                f"{self.artifacts[key][:16]}…; refusing to load it"
            )
        return path

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "triton_name": self.triton_name,
            "model": self.model,
            "family": self.family,
            "entry_point": self.entry_point,
            "capabilities": list(self.capabilities),
            "model_config": dict(self.model_config),
            "training": {k: getattr(self.training, k) for k in Training.__dataclass_fields__},
            "metrics": dict(self.metrics),
            "flavour": self.flavour,
            "batching": {"max_batch_size": self.batching.max_batch_size,
                         "max_queue_delay_microseconds": self.batching.max_queue_delay_microseconds},
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "artifacts": dict(sorted(self.artifacts.items())),
        }
        if self.torchscript is not None:
            record["torchscript"] = self.torchscript
        if self.step is not None:
            record["step"] = self.step.to_dict()
        if self.free_axis:
            record["free_axis"] = dict(self.free_axis)
        return record


def _read(path: Path, data: Any) -> Manifest:
    top = Fields(path, data)
    found = top.get("format", str, None)
    if found != MANIFEST_FORMAT:
        raise top.error("format", f"expected {MANIFEST_FORMAT!r}, got {found!r}: re-export the model with "
                        "this genserve (`genserve export`)")
    training, batching = top.child("training"), top.child("batching")
    flavour = top.get("flavour", str)
    if flavour not in FLAVOURS:
        raise top.error("flavour", f"must be one of {FLAVOURS}, got {flavour!r}")
    artifacts = top.get("artifacts", dict)
    bad = [k for k, v in artifacts.items() if not (isinstance(v, str) and len(v) == 64 and k.split("/")[0].isdigit())]
    if bad:
        raise top.error("artifacts", f"entries {bad} are not 'VERSION/FILE': sha256")
    try:
        batching_value = Batching(batching.get("max_batch_size", int),
                                  batching.get("max_queue_delay_microseconds", int))
    except ValueError as error:
        raise top.error("batching", str(error)) from None
    outputs = tuple(TensorSpec.read(t) for t in top.children("outputs"))
    free_axis = top.get("free_axis", dict, {})
    if free_axis and (set(free_axis) != {t.name for t in outputs}
                      or not set(free_axis.values()) <= set(FREE_AXIS_REDUCTIONS)):
        raise top.error("free_axis", f"must map every output to one of {FREE_AXIS_REDUCTIONS}, got {free_axis}")
    return Manifest(
        triton_name=top.get("triton_name", str),
        model=top.get("model", str),
        family=top.get("family", str),
        entry_point=top.get("entry_point", str),
        capabilities=tuple(top.get("capabilities", list)),
        model_config=top.get("model_config", dict),
        training=Training(**{k: training.get(k, (str, int, type(None)), None) for k in Training.__dataclass_fields__}),
        metrics=top.get("metrics", dict),
        flavour=flavour,
        batching=batching_value,
        inputs=tuple(TensorSpec.read(t) for t in top.children("inputs")),
        outputs=outputs,
        torchscript=top.get("torchscript", str, None),
        step=StepSection.read(top.child("step")) if "step" in top.data else None,
        free_axis=free_axis,
        artifacts=artifacts,
        folder=path.parent,
    )


def load_manifest(folder: str | Path) -> Manifest:
    """Reads `folder/genserve.json`; ManifestError names the file and the field that is wrong."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest here (is this a genserve model folder?)") from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: not JSON ({error})") from None
    return _read(path, data)


def write_manifest(folder: str | Path, manifest: Manifest, version: int, artifacts: list[Path]) -> Manifest:
    """Writes `folder/genserve.json` recording `artifacts` under `version`, keeping other versions' hashes."""
    path = Path(folder) / MANIFEST
    previous = load_manifest(folder).artifacts if path.exists() else {}
    hashes = {k: v for k, v in previous.items() if not k.startswith(f"{version}/")}
    hashes.update({f"{version}/{p.name}": sha256(p) for p in artifacts})
    manifest = replace(manifest, artifacts=dict(sorted(hashes.items())), folder=Path(folder))
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return manifest


