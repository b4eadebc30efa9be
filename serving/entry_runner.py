"""Running an exported entry point (ONNX or TorchScript) on batches that may come from several requests."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from .artifacts import Manifest
from .limits import MAX_WORK_PER_RUN


def onnx_session(path: str | Path):
    """An ONNX Runtime session on the best provider present: CUDA where available, else CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), options, providers=providers)


class EntryPointRunner(ABC):
    """One entry point's artifact with the manifest's signature: named inputs in, named outputs out."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs one batch; `feeds` holds every input the manifest declares."""

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
            outputs = self.run_in_pieces(merged)
            start = 0
            for k in members:
                rows = len(next(iter(requests[k].values())))
                results[k] = {name: out[start : start + rows] for name, out in outputs.items()}
                start += rows
        return results  # type: ignore[return-value]

    def run_in_pieces(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`run`, over as many row ranges as keep each run's work within MAX_WORK_PER_RUN."""
        per_row = 1
        for spec in self.manifest.inputs:  # -1 in a manifest shape is a free axis; axis 0 of a feed is rows
            per_row *= int(np.prod([n for n, s in zip(feeds[spec.name].shape[1:], spec.shape) if s == -1]))
        rows = len(next(iter(feeds.values())))
        step = max(1, MAX_WORK_PER_RUN // max(1, per_row))
        if rows <= step:
            return self.run(feeds)
        pieces = [self.run({k: a[i : i + step] for k, a in feeds.items()}) for i in range(0, rows, step)]
        return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}


class OnnxEntryPoint(EntryPointRunner):
    """The entry point's `model.onnx` in an ONNX Runtime session (CUDA EP when present)."""

    def __init__(self, manifest: Manifest, session) -> None:
        super().__init__(manifest)
        self.session = session

    @classmethod
    def load(cls, manifest: Manifest, version: int | None = None) -> OnnxEntryPoint:
        return cls(manifest, onnx_session(manifest.artifact("model.onnx", version)))

    def run(self, feeds):
        names = [t.name for t in self.manifest.outputs]
        return dict(zip(names, self.session.run(names, feeds)))


class TorchScriptEntryPoint(EntryPointRunner):
    """The entry point's traced `model.pt` on `device`; inputs are passed in manifest order."""

    def __init__(self, manifest: Manifest, module, device: str = "cpu") -> None:
        super().__init__(manifest)
        self.module, self.device = module, device

    @classmethod
    def load(cls, manifest: Manifest, version: int | None = None, device: str = "cpu") -> TorchScriptEntryPoint:
        import torch

        return cls(manifest, torch.jit.load(str(manifest.artifact("model.pt", version)), map_location=device), device)

    def run(self, feeds):
        import torch

        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device) for t in self.manifest.inputs]
            outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {t.name: out.cpu().numpy() for t, out in zip(self.manifest.outputs, outputs)}
