"""Step programs as the engine sees them: a spec from the manifest and a runner per runtime.

A step program (written by `genserve export`, see export/steps.py) is two graphs, `refresh`
and `step`, over named cache tensors ("states") and a fixed vocabulary of controls; its
contract is the manifest's step section (artifacts.StepSection). The engine knows only this
contract, never the architecture, so one engine runs every family that exports a step, in
ONNX Runtime or TorchScript, on CPU or GPU.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..artifacts import (
    NEXT,
    START,
    ArtifactIntegrityError,
    GraphSignature,
    Manifest,
    StepSection,
    TensorSpec,
    engine_shape,
)
from ..fused import load_ops
from ..fused.weights import FUSED_OPS, FusedOp

RUNTIMES = ("onnx", "torchscript")
# Row calls of up to this many slots replay CUDA graphs. Launch overhead per row is fixed, so its share
# shrinks with the batch: on an H200, 23% of a Gated PixelCNN row at batch 1, 19% at 256, 5% at 4096.
GRAPH_SLOTS = 256
log = logging.getLogger("genserve.engine")


@dataclass(frozen=True)
class StepSpec:
    """What the engine needs to drive a step program: its section and the model's image space."""

    states: tuple[TensorSpec, ...]  # per-slot cache tensors (shape without the slot axis)
    graphs: Mapping[str, GraphSignature]  # "step" [, "refresh", "start"]
    period: int  # refresh runs for slots whose position is a multiple of this
    length: int  # positions per sample
    span: int  # positions one step call advances (noise (n, span, C) in, pixel (n, span, C) out)
    sample_shape: tuple[int, int, int]  # (C, H, W); audio as (C, T / frame, frame) (artifacts.engine_shape)
    levels: int
    num_classes: int | None
    latent_shape: tuple[int, ...] | None = None  # of the `latents` every sample must bring (None: takes none)

    @classmethod
    def from_section(cls, section: StepSection, model_config: Mapping) -> StepSpec:
        """From a manifest's step section (validated when it was made) and its model_config."""
        sample_shape = engine_shape(model_config)
        takes_latents = any("latents" in g.inputs for g in section.graphs.values())
        # (D,) for a latent-variable model; a flow's latent has the image's shape
        latent_shape = (model_config["latent_dim"],) if "latent_dim" in model_config else sample_shape
        return cls(
            states=section.states,
            graphs=section.graphs,
            period=section.period,
            length=section.length,
            span=section.span,
            sample_shape=sample_shape,
            levels=model_config["pixel_levels"],
            num_classes=model_config.get("num_classes"),
            latent_shape=latent_shape if takes_latents else None,
        )

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> StepSpec:
        if manifest.step is None:
            raise ValueError(f"{manifest.triton_name}: the manifest has no step program")
        return cls.from_section(manifest.step, manifest.model_config)


class StepRunner(ABC):
    """Runs one graph of a step program on torch tensors (the engine's own representation)."""

    spec: StepSpec
    device: torch.device
    row_inputs: tuple[str, ...] = ()  # the controls `run_row` takes; empty: no `run_row`
    runs_rows: bool = False  # whether `run_rows` runs (on the CPU, for fused programs)
    # Row calls of up to this many slots may be replayed from CUDA graphs (graphs.py); 0: never.
    row_graph_slots: int = 0

    @abstractmethod
    def run(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Feeds the graph's named inputs; returns its named outputs (on `device`)."""

    def run_row(self, feeds: Mapping[str, torch.Tensor], states: list[torch.Tensor]) -> torch.Tensor:
        """Refresh then step in one call, for slots that all start a row: `states` (the program's
        states in order, leading slices of the engine's own) are updated in place; returns `pixel`."""
        raise NotImplementedError(f"{type(self).__name__} has no row call")

    def run_rows(self, feeds: Mapping[str, torch.Tensor | None], states: list[torch.Tensor], rows: int) -> None:
        """`rows` row calls in one, for slots that each start a row with that many left, in place: the
        states; `pixels` (n, C, H, W), each call's pixels written in; `positions` (n, 1), advanced a row
        per call. `noise` is each sample's over its whole image, (n, H * W, C); `labels` None for an
        unconditional model. A program whose span is a whole row only."""
        raise NotImplementedError(f"{type(self).__name__} runs one row per call")


class TorchStepRunner(StepRunner):
    """TorchScript artifacts, or the eager modules themselves (tests, benchmarks before export)."""

    def __init__(self, spec: StepSpec, graphs: Mapping[str, Callable], device: str | torch.device = "cpu") -> None:
        self.spec, self.graphs, self.device = spec, dict(graphs), torch.device(device)

    @classmethod
    def load(cls, manifest: Manifest, version: int | None = None, device: str = "cpu",
             graphs: tuple[str, ...] | None = None) -> TorchStepRunner:
        """`graphs`: the program's graphs to load (default all)."""
        spec = StepSpec.from_manifest(manifest)
        modules = {}
        for name in graphs or spec.graphs:
            module = torch.jit.load(str(manifest.artifact(f"{name}.pt", version)), map_location=device)
            modules[name] = module.eval()
        return cls(spec, modules, device)

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
    def load(cls, manifest: Manifest, version: int | None = None,
             graphs: tuple[str, ...] | None = None) -> OnnxStepRunner:
        """`graphs`: the program's graphs to load (default all)."""
        from ..entry_runner import onnx_session

        spec = StepSpec.from_manifest(manifest)
        return cls(spec, {name: onnx_session(manifest.artifact(f"{name}.onnx", version))
                          for name in graphs or spec.graphs})

    def run(self, graph, feeds):
        signature = self.spec.graphs[graph]
        arrays = {name: np.ascontiguousarray(feeds[name].numpy()) for name in signature.inputs}
        outputs = self.sessions[graph].run(list(signature.outputs), arrays)
        return {name: torch.from_numpy(out) for name, out in zip(signature.outputs, outputs)}


class FusedStepRunner(StepRunner):
    """A family's fused operators (torch.ops.genserve.*) over the program's states, weights packed at export."""

    def __init__(self, spec: StepSpec, op: FusedOp, weights: list[torch.Tensor], device: str | torch.device = "cpu",
                 namespace=None, graph_slots: int = GRAPH_SLOTS, start: StepRunner | None = None):
        """`namespace` holds the operator functions by name: torch.ops.genserve (default), or a module of
        functions with the same signatures (tests run the GPU launches that way under Triton's interpreter).
        `graph_slots`: on CUDA, row calls of up to this many slots may replay CUDA graphs (`row_graph_slots`).
        `start`: runs the program's `start` graph (once per sample, at admission: a PixelVAE's latents → m(z),
        a MAF's → u and its hidden units); the exported graph, as nothing per pixel is gained by fusing it.
        Given exactly where the program has one."""
        if (START in spec.graphs) != (start is not None):
            raise ValueError("start: a runner for the program's start graph is given exactly where it has one")
        if op.row_span:  # a row per call, the rows' Python between calls saved too (run_rows)
            spec = replace(spec, span=spec.sample_shape[2])
        self.spec, self.op, self.weights, self.device = spec, op, weights, torch.device(device)
        self.start = start
        if namespace is None:
            status = load_ops()
            if not status:
                raise RuntimeError(f"the fused operators are not available: {status.reason}")
            namespace = torch.ops.genserve
        self.row = None if op.row is None else getattr(namespace, op.row)
        self.row_inputs = op.row_inputs
        # The multi-row call exists on the CPU only, where it saves the Python between row calls.
        self.rows = getattr(namespace, op.rows, None) if self.device.type == "cpu" else None
        self.runs_rows = self.rows is not None and spec.span == spec.sample_shape[2]
        # Per graph: the operator, its arguments (a state-list pattern expanded to its names) and
        # its outputs' names, worked out once here rather than on every call.
        self.calls = {
            graph: (getattr(namespace, function),
                    [self._states(name) if name.endswith("*") else name for name in inputs],
                    [n for name in outputs for n in
                     ([NEXT + s for s in self._states(name.removeprefix(NEXT))] if name.endswith("*") else [name])])
            for graph, function, inputs, outputs in (
                ("refresh", op.refresh, op.refresh_inputs, op.refresh_outputs),
                ("step", op.step, op.step_inputs, op.step_outputs),
            ) if function is not None
        }
        self.row_graph_slots = graph_slots if self.device.type == "cuda" else 0

    @classmethod
    def load(cls, manifest: Manifest, version: int | None = None, device: str = "cpu") -> FusedStepRunner:
        from safetensors.torch import load_file

        spec, section = StepSpec.from_manifest(manifest), manifest.step
        op = FUSED_OPS[section.fused.op]
        tensors = load_file(str(manifest.artifact(section.fused.weights, version)), device=str(device))
        missing = [name for name in op.weights if name not in tensors]
        if missing:
            raise ArtifactIntegrityError(f"{manifest.triton_name}: {section.fused.weights} lacks weights {missing}")
        start = None
        if START in spec.graphs:  # ONNX Runtime on the CPU; TorchScript where the states live on a GPU
            start = (OnnxStepRunner.load(manifest, version, graphs=(START,)) if torch.device(device).type == "cpu"
                     else TorchStepRunner.load(manifest, version, device, graphs=(START,)))
        runner = cls(spec, op, [tensors[name] for name in op.weights], device, start=start)
        if runner.device.type == "cuda":
            runner.warm_up()  # GPU kernels compile on their first launch: here, not on a request
        return runner

    def run(self, graph, feeds):
        if graph == START:
            return self.start.run(graph, feeds)
        function, inputs, outputs = self.calls[graph]
        arguments = [[feeds[s] for s in name] if isinstance(name, list) else feeds.get(name) for name in inputs]
        with torch.inference_mode():
            results = function(*arguments, self.weights)
        return dict(zip(outputs, results))

    def run_row(self, feeds, states):
        with torch.inference_mode():
            return self.row(*(feeds.get(name) for name in self.row_inputs), states, self.weights)

    def run_rows(self, feeds, states, rows):
        with torch.inference_mode():
            self.rows(feeds["pixels"], feeds["positions"], feeds.get("labels"), feeds["noise"], feeds["temperature"],
                      states, self.weights, rows)

    def warm_up(self) -> None:
        """One row call on a slot of zeros: every kernel a sampling run launches is then compiled."""
        spec = self.spec

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        feeds = {
            "pixels": zeros(1, *spec.sample_shape, dtype=torch.uint8),
            "positions": zeros(1, 1, dtype=torch.int64),
            "labels": zeros(1, 1, dtype=torch.int64) if spec.num_classes else None,
            "noise": zeros(1, spec.span, spec.sample_shape[0]),
            "temperature": torch.ones(1, 1, device=self.device),
        }
        self.run_row(feeds, [zeros(1, *state.shape, dtype=state.dtype.torch) for state in spec.states])

    def _states(self, pattern: str) -> list[str]:
        """The program's states named `prefix*`, in order."""
        return [s.name for s in self.spec.states if s.name.startswith(pattern[:-1])]


def fused_unavailable(manifest: Manifest, device: str) -> str | None:
    """Why the manifest's fused operators cannot run on `device` in this process; None if they can."""
    section = manifest.step
    if section is None or section.fused is None:
        return "the model was exported without fused operators"
    if section.fused.op not in FUSED_OPS:
        return f"this genserve has no fused operator family {section.fused.op!r}"
    status = load_ops()
    if not status:
        return status.reason
    step = f"genserve::{FUSED_OPS[section.fused.op].step}"
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    if key == "CUDA" and not torch.cuda.is_available():
        return "no CUDA device in this process"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(step, key):
        return f"{step} has no {key} implementation in this build ({status.reason})"
    return None


def load_step_runner(manifest: Manifest, runtime: str = "onnx", device: str = "cpu",
                     version: int | None = None, fused: bool = True) -> StepRunner:
    """The step program of a `<model>_sample` manifest: its fused operators where they run, else `runtime`.

    Args:
        runtime: onnx or torchscript, for the exported graphs.
        fused: use the fused operators of a "fused" program when they are built for `device`;
            False always runs the graphs. One log line says which runs and why.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if fused and manifest.step is not None and manifest.step.kind == "fused":
        reason = fused_unavailable(manifest, device)
        if reason is None:
            log.info("%s: sampling with the fused %s operators on %s", manifest.triton_name,
                     manifest.step.fused.op, device)
            return FusedStepRunner.load(manifest, version, device)
        log.info("%s: sampling with the exported %s step graphs: %s", manifest.triton_name, runtime, reason)
    if runtime == "onnx":
        return OnnxStepRunner.load(manifest, version)
    return TorchStepRunner.load(manifest, version, device)
