"""Running an exported entry point (ONNX or TorchScript) on batches that may come from several requests."""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from .artifacts import Manifest
from .limits import MAX_RUN_BYTES, MAX_WORK_PER_RUN

log = logging.getLogger("genserve.runtime")


def onnx_session(path: str | Path):
    """An ONNX Runtime session on the best provider present: CUDA where available, else CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # A pool's threads spin on their cores for a while after each run, waiting for more work. A server
    # runs many sessions in turn (every entry point's, a step program's two graphs a row), so they spun on
    # the cores the next session needed: on 2 cores, four entry points run in turn took 199-237 ms a round
    # spinning and 93-95 ms not; the Gated PixelCNN's step graphs at batch 16 51-63 and 19-21 ms per image;
    # a PixelVAE's fused sampling at batch 1, its start graph in a session beside the operators' threads,
    # a median 6.0 and 2.1-3.1 ms per image; the embedded server under a minute's mixed soak, 851-888 and
    # 1453-1638 requests. A session run alone measured the same either way.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), options, providers=providers)


def intermediate_bytes(onnx_path: str | Path, manifest: Manifest) -> int:
    """The bytes of every tensor a run of the entry point's ONNX graph makes, summed, on one unit of work
    (one row, every free axis of length 1), found by running it so with every tensor as an output."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    named = {output.name for output in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in named:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                named.add(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {spec.name: np.zeros((1, *(1 if size == -1 else size for size in spec.shape)), spec.dtype.numpy)
             for spec in manifest.inputs}
    return sum(np.asarray(output).nbytes for output in session.run(None, feeds))


def reduce_pieces(values: list[np.ndarray], weights: np.ndarray, how: str) -> np.ndarray:
    """One output of a free axis run in pieces, from each piece's: `weights` are the pieces' shares of the
    axis. The mean of per-element values is the weighted mean of the pieces' means; the log of the mean of
    their exponentials is log sum_p weight_p exp(value_p), taken from the largest (log-sum-exp)."""
    stacked = np.stack([v.astype(np.float64) for v in values])  # (pieces, ...)
    shares = weights.reshape(-1, *[1] * (stacked.ndim - 1))
    if how == "mean":
        reduced = (shares * stacked).sum(0)
    elif how == "log_mean_exp":
        top = stacked.max(0)
        reduced = top + np.log((shares * np.exp(stacked - top)).sum(0))
    else:
        raise ValueError(f"no reduction {how!r}")
    return reduced.astype(values[0].dtype)


class EntryPointRunner(ABC):
    """One entry point's artifact with the manifest's signature: named inputs in, named outputs out."""

    def __init__(self, manifest: Manifest, version: int | None = None) -> None:
        """`version`: the one loaded (default: the newest), whose ONNX graph sizes the pieces of large batches."""
        self.manifest, self.version = manifest, version

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

    @functools.cached_property
    def bytes_per_unit(self) -> int | None:
        """intermediate_bytes of this entry point's ONNX graph (the TorchScript one's too: the same network),
        measured on first use (about 0.01-0.2 s); None where the version has no intact ONNX graph."""
        version = self.version if self.version is not None else self.manifest.versions[-1]
        if f"{version}/model.onnx" not in self.manifest.artifacts:
            return None
        try:
            measured = intermediate_bytes(self.manifest.artifact("model.onnx", version), self.manifest)
        except Exception as error:  # a tampered artifact, or a graph whose tensors cannot all be outputs
            log.warning("%s: its tensors could not be measured (%s); its runs are sized by their work alone",
                        self.manifest.triton_name, error)
            return None
        log.info("%s: a run's tensors take %.1f MB per unit of work; merged batches run in pieces of at most %d "
                 "units", self.manifest.triton_name, measured / 2**20, max(1, MAX_RUN_BYTES // max(1, measured)))
        return measured

    def run_in_pieces(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`run`, over as many row ranges as keep each run's work within MAX_WORK_PER_RUN (rows times the
        sizes of free axes) and its tensors within MAX_RUN_BYTES (bytes_per_unit times the work). Where a
        single row is more than that and the manifest says how its outputs reduce over the free axis, each
        row runs alone, its free axis in pieces (run_free_axis_in_pieces)."""
        per_row = 1
        for spec in self.manifest.inputs:  # -1 in a manifest shape is a free axis; axis 0 of a feed is rows
            per_row *= int(np.prod([n for n, s in zip(feeds[spec.name].shape[1:], spec.shape) if s == -1]))
        per_row = max(1, per_row)
        rows = len(next(iter(feeds.values())))
        if self.manifest.free_axis and per_row > 1 and per_row > self.units_per_run:
            return self.run_free_axis_in_pieces(feeds, self.units_per_run)
        step = max(1, MAX_WORK_PER_RUN // per_row)
        if rows > 1 and self.bytes_per_unit:  # (a single row is split only as above)
            step = min(step, max(1, MAX_RUN_BYTES // (self.bytes_per_unit * per_row)))
        if rows <= step:
            return self.run(feeds)
        pieces = [self.run({k: a[i : i + step] for k, a in feeds.items()}) for i in range(0, rows, step)]
        return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}

    @property
    def units_per_run(self) -> int:
        """The most units of work one run may hold: MAX_WORK_PER_RUN, and MAX_RUN_BYTES of their tensors."""
        if not self.bytes_per_unit:
            return MAX_WORK_PER_RUN
        return max(1, min(MAX_WORK_PER_RUN, MAX_RUN_BYTES // self.bytes_per_unit))

    def run_free_axis_in_pieces(self, feeds: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
        """Each row alone, the free axis of its inputs (one, of the same length in each) in pieces of `size`;
        each output reduced over the pieces as the manifest's `free_axis` says, in float64, weighted by the
        pieces' lengths: exactly what one run over the whole axis computes, but for rounding."""
        axes = {spec.name: 1 + spec.shape.index(-1) for spec in self.manifest.inputs if -1 in spec.shape}
        (length,) = {feeds[name].shape[axis] for name, axis in axes.items()}
        rows = len(next(iter(feeds.values())))
        starts = range(0, length, size)
        weights = np.array([min(size, length - start) / length for start in starts])
        results = []
        for row in range(rows):
            pieces = []
            for start in starts:
                piece = {name: a[row : row + 1] for name, a in feeds.items()}
                for name, axis in axes.items():
                    piece[name] = np.take(piece[name], np.arange(start, min(start + size, length)), axis=axis)
                pieces.append(self.run(piece))
            results.append({name: reduce_pieces([p[name] for p in pieces], weights, how)
                            for name, how in self.manifest.free_axis.items()})
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}


class OnnxEntryPoint(EntryPointRunner):
    """The entry point's `model.onnx` in an ONNX Runtime session (CUDA EP when present)."""

    def __init__(self, manifest: Manifest, session, version: int | None = None) -> None:
        super().__init__(manifest, version)
        self.session = session

    @classmethod
    def load(cls, manifest: Manifest, version: int | None = None) -> OnnxEntryPoint:
        return cls(manifest, onnx_session(manifest.artifact("model.onnx", version)), version)

    def run(self, feeds):
        names = [t.name for t in self.manifest.outputs]
        return dict(zip(names, self.session.run(names, feeds)))


class TorchScriptEntryPoint(EntryPointRunner):
    """The entry point's traced `model.pt` on `device`; inputs are passed in manifest order."""

    def __init__(self, manifest: Manifest, module, device: str = "cpu", version: int | None = None) -> None:
        super().__init__(manifest, version)
        self.module, self.device = module, device

    @classmethod
    def load(cls, manifest: Manifest, version: int | None = None, device: str = "cpu") -> TorchScriptEntryPoint:
        import torch

        module = torch.jit.load(str(manifest.artifact("model.pt", version)), map_location=device)
        return cls(manifest, module, device, version)

    def run(self, feeds):
        import torch

        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device) for t in self.manifest.inputs]
            outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {t.name: out.cpu().numpy() for t, out in zip(self.manifest.outputs, outputs)}
