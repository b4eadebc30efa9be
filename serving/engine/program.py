"""Step programs as the engine sees them: a spec from the manifest and a runner per runtime.

A step program (written by `genserve export`, see export/steps.py) is two graphs, `refresh`
and `step`, over named cache tensors ("states") and a fixed vocabulary of controls; a graph's
output `next_<state>` replaces that state, `pixel` is the step's chosen pixel. The
engine knows only this contract, never the architecture, so one engine runs every family
that exports a step, in ONNX Runtime or TorchScript, on CPU or GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..manifest import Manifest, TensorInfo

STEP_FORMAT = "genserve-step/1"
NEXT = "next_"  # output `next_S` replaces state S
TORCH_DTYPES = {"UINT8": torch.uint8, "INT64": torch.int64, "FP32": torch.float32}
RUNTIMES = ("onnx", "torchscript")


@dataclass(frozen=True)
class GraphSignature:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class StepSpec:
    """What the engine needs to drive a step program."""

    states: tuple[TensorInfo, ...]  # per-slot cache tensors (shape without the slot axis)
    graphs: Mapping[str, GraphSignature]  # "refresh" and "step"
    period: int  # refresh runs for slots whose position is a multiple of this
    length: int  # positions per sample
    span: int  # positions one step call advances (noise (n, span, C) in, pixel (n, span, C) out)
    sample_shape: tuple[int, int, int]  # (C, H, W)
    levels: int
    num_classes: int | None

    @classmethod
    def from_section(cls, section: Mapping, model_config: Mapping) -> StepSpec:
        """From a manifest's "step" section and its "model_config"."""
        if section.get("format") != STEP_FORMAT:
            raise ValueError(f"not a {STEP_FORMAT} step program (format={section.get('format')!r})")
        graphs = {
            name: GraphSignature(tuple(g["inputs"]), tuple(g["outputs"])) for name, g in section["graphs"].items()
        }
        if set(graphs) != {"refresh", "step"} or "pixel" not in graphs["step"].outputs:
            raise ValueError(f"a step program needs graphs refresh and step (with output pixel), got {graphs}")
        states = tuple(TensorInfo.from_dict(s) for s in section["states"])
        names = {s.name for s in states}
        unknown = [o for g in graphs.values() for o in g.outputs if o != "pixel" and o.removeprefix(NEXT) not in names]
        if unknown:
            raise ValueError(f"step program outputs {unknown} are neither 'pixel' nor next_<state> of {sorted(names)}")
        size = model_config["image_size"]
        period, length, span = int(section["period"]), int(section["length"]), int(section["span"])
        if span < 1 or period % span or length % period:
            raise ValueError(f"step program: span {span} must divide period {period}, which must divide {length}")
        return cls(
            states=states,
            graphs=graphs,
            period=period,
            length=length,
            span=span,
            sample_shape=(model_config["channels"], size, size),
            levels=model_config["pixel_levels"],
            num_classes=model_config.get("num_classes"),
        )

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> StepSpec:
        if "step" not in manifest.raw or manifest.raw["step"].get("format") != STEP_FORMAT:
            raise ValueError(f"{manifest.triton_name}: the manifest has no {STEP_FORMAT} step program")
        return cls.from_section(manifest.raw["step"], manifest.model_config)


class StepRunner(ABC):
    """Runs one graph of a step program on torch tensors (the engine's own representation)."""

    spec: StepSpec
    device: torch.device

    @abstractmethod
    def run(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Feeds the graph's named inputs; returns its named outputs (on `device`)."""


class TorchStepRunner(StepRunner):
    """TorchScript artifacts, or the eager modules themselves (tests, benchmarks before export)."""

    def __init__(self, spec: StepSpec, graphs: Mapping[str, Callable], device: str | torch.device = "cpu") -> None:
        self.spec, self.graphs, self.device = spec, dict(graphs), torch.device(device)

    @classmethod
    def load(cls, manifest: Manifest, version: int | None = None, device: str = "cpu") -> TorchStepRunner:
        spec = StepSpec.from_manifest(manifest)
        graphs = {}
        for name in spec.graphs:
            module = torch.jit.load(str(manifest.artifact(f"{name}.pt", version)), map_location=device)
            graphs[name] = module.eval()
        return cls(spec, graphs, device)

    def run(self, graph, feeds):
        signature = self.spec.graphs[graph]
        with torch.inference_mode():
            outputs = self.graphs[graph](*(feeds[name] for name in signature.inputs))
        return dict(zip(signature.outputs, outputs if isinstance(outputs, tuple) else (outputs,)))


class OnnxStepRunner(StepRunner):
    """The ONNX artifacts in ONNX Runtime (CPU; CUDA execution provider where present)."""

    def __init__(self, spec: StepSpec, sessions: Mapping[str, object]) -> None:
        self.spec, self.sessions, self.device = spec, dict(sessions), torch.device("cpu")

    @classmethod
    def load(cls, manifest: Manifest, version: int | None = None) -> OnnxStepRunner:
        from ..entry_runner import onnx_session

        spec = StepSpec.from_manifest(manifest)
        return cls(spec, {name: onnx_session(manifest.artifact(f"{name}.onnx", version)) for name in spec.graphs})

    def run(self, graph, feeds):
        signature = self.spec.graphs[graph]
        arrays = {name: np.ascontiguousarray(feeds[name].numpy()) for name in signature.inputs}
        outputs = self.sessions[graph].run(list(signature.outputs), arrays)
        return {name: torch.from_numpy(out) for name, out in zip(signature.outputs, outputs)}


def load_step_runner(manifest: Manifest, runtime: str = "onnx", device: str = "cpu",
                     version: int | None = None) -> StepRunner:
    """The step program of a `<model>_sample` manifest in `runtime` (onnx or torchscript)."""
    if runtime == "onnx":
        return OnnxStepRunner.load(manifest, version)
    if runtime == "torchscript":
        return TorchStepRunner.load(manifest, version, device)
    raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
