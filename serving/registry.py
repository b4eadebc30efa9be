"""The served models: a repository's manifests grouped by model, as clients see them.

A model (e.g. `vae_mnist`) is exported as several Triton models, one per entry point
(`vae_mnist_encode`, `vae_mnist_decode`, ...); each carries a `genserve.json` manifest. The
registry groups them back into one `ModelSpec` per model. It reads manifests only: loading
(and hash-checking) artifacts is the runtime's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .artifacts import MANIFEST, Manifest, load_manifest, modality, sample_rate, sample_shape
from .errors import InvalidArgument, NotFound

CAPABILITIES = ("sample", "encode", "decode", "score")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    capabilities: tuple[str, ...]
    entry_points: MappingProxyType  # entry point name ("decode", "sample", ...) → Manifest
    model_config: MappingProxyType

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W), or (C, T) for audio."""
        return sample_shape(self.model_config)

    @property
    def modality(self) -> str:
        return modality(self.model_config)

    @property
    def sample_rate(self) -> int | None:
        return sample_rate(self.model_config)

    @property
    def dims(self) -> int:
        return math.prod(self.image_shape)

    @property
    def pixel_levels(self) -> int:
        return int(self.model_config["pixel_levels"])

    @property
    def num_classes(self) -> int | None:
        return self.model_config.get("num_classes") or None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        if "latent_dim" in self.model_config:
            return (int(self.model_config["latent_dim"]),)
        if "encode" in self.capabilities or "decode" in self.capabilities:
            return self.image_shape  # flows: z has the image's shape
        return ()

    @property
    def metrics(self) -> dict[str, Any]:
        return next(iter(self.entry_points.values())).metrics

    @property
    def takes_importance_samples(self) -> bool:
        """True for bounds computed from K posterior draws (VAEs): their score graph takes eps."""
        return "score" in self.entry_points and any(t.name == "eps" for t in self.entry("score").inputs)

    def entry(self, name: str) -> Manifest:
        return self.entry_points[name]

    def require(self, capability: str) -> None:
        """Raises NotFound naming the capability when this model's family lacks it."""
        if capability not in self.capabilities:
            raise NotFound(
                f"model '{self.name}' ({self.family}) has no capability '{capability}'; "
                f"it offers {', '.join(self.capabilities)}"
            )


class ModelRegistry:
    def __init__(self, models: dict[str, ModelSpec]) -> None:
        self.models = dict(sorted(models.items()))

    @classmethod
    def from_repository(cls, repository: str | Path) -> ModelRegistry:
        repository = Path(repository)
        if not repository.is_dir():
            raise FileNotFoundError(f"no model repository at {repository}")
        groups: dict[str, list[Manifest]] = {}
        for path in sorted(repository.glob(f"*/{MANIFEST}")):
            manifest = load_manifest(path.parent)
            groups.setdefault(manifest.model, []).append(manifest)
        if not groups:
            raise FileNotFoundError(f"{repository} holds no genserve models (no */{MANIFEST}); run `genserve export`")
        models = {}
        for name, manifests in groups.items():
            first = manifests[0]
            models[name] = ModelSpec(
                name=name,
                family=first.family,
                capabilities=tuple(c for c in CAPABILITIES if c in first.capabilities),
                entry_points=MappingProxyType({m.entry_point: m for m in manifests}),
                model_config=MappingProxyType(dict(first.model_config)),
            )
        return cls(models)

    def get(self, name: str) -> ModelSpec:
        if not name:
            raise InvalidArgument("model", "required: the name of a served model (ListModels lists them)")
        if name not in self.models:
            raise NotFound(f"model '{name}' is not served here; served: {', '.join(self.models)}")
        return self.models[name]
