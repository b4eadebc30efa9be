"""Running an exported ONNX entry point on batches that may come from several requests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import Manifest


def onnx_session(path: str | Path):
    """An ONNX Runtime session on the best provider present: CUDA where available, else CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), options, providers=providers)


@dataclass
class OnnxEntryPoint:
    """An ONNX session with the manifest's signature: feeds named inputs, returns named outputs."""

    manifest: Manifest
    session: object

    @classmethod
    def load(cls, manifest: Manifest, version: int | None = None) -> OnnxEntryPoint:
        return cls(manifest, onnx_session(manifest.artifact("model.onnx", version)))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [t.name for t in self.manifest.outputs]
        return dict(zip(names, self.session.run(names, feeds)))

    def run_merged(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Runs many requests' feeds as few batches as their shapes allow; splits results back.

        Requests whose non-batch shapes agree (all, for fixed-shape entry points) are
        concatenated into one run: the merge a dynamic batcher pays for.
        """
        results: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for k, feeds in enumerate(requests):
            signature = tuple((name, a.shape[1:]) for name, a in sorted(feeds.items()))
            groups.setdefault(signature, []).append(k)
        for members in groups.values():
            merged = {name: np.concatenate([requests[k][name] for k in members]) for name in requests[members[0]]}
            outputs = self.run(merged)
            start = 0
            for k in members:
                rows = len(next(iter(requests[k].values())))
                results[k] = {name: out[start : start + rows] for name, out in outputs.items()}
                start += rows
        return results  # type: ignore[return-value]
