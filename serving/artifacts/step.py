"""The step-program section of a sampler's manifest: the contract between export and the engine.

A step program carries each layer's causal context in named per-slot cache tensors
("states") and advances every sample slot by `span` positions per call. Its graphs take
inputs from a fixed vocabulary of controls the engine fills (`CONTROLS`) plus the program's
states; they output `pixel` and `next_<state>` for each state they update (ONNX forbids an
output named like an input).

`kind` says how the program is run: "graphs" is a `step` graph, usually with a `refresh` graph
(per-row work), exported as ONNX and TorchScript, run by the runtime the server chose; a program
may add a `start` graph, run once per slot when a sample is admitted, which turns the sample's
`latents` (a PixelVAE's z, a flow's latent) into states that every later call reads. "fused" adds a pair of fused
operators (`torch.ops.genserve.*`, serving/fused) over the same states and the weights file
they read; where the operators are not built for the device, the graphs run instead. An
engine that does not know a kind refuses the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .fields import Fields
from .specs import TensorSpec

NEXT = "next_"  # output `next_S` replaces state S
PIXEL = "pixel"  # the step's chosen pixels, (n, span, C) int64
# Inputs the engine fills per slot: raster index of the next pixel (n, 1); the sample so far
# (n, C, H, W); uniform noise of the step's pixels (n, span, C); temperature (n, 1); labels (n, 1);
# latents (n, D), the sample's z (the `start` graph's input).
CONTROLS = ("positions", "pixels", "noise", "temperature", "labels", "latents")
GRAPH_NAMES = ("start", "refresh", "step")  # "step" is required, the others optional
START, REFRESH, STEP = GRAPH_NAMES
STEP_KINDS = ("graphs", "fused")


@dataclass(frozen=True)
class GraphSignature:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class FusedSection:
    """Which fused operator family runs the program and the artifact holding its packed weights."""

    op: str  # a key of serving.fused.weights.FUSED_OPS, e.g. "gated_pixelcnn"
    weights: str  # file name in the version folder, listed (with its sha256) in the manifest's artifacts

    def to_dict(self) -> dict[str, str]:
        return {"op": self.op, "weights": self.weights}


@dataclass(frozen=True)
class StepSection:
    """How to drive a sampler's step program (shapes exclude the slot axis)."""

    kind: str
    states: tuple[TensorSpec, ...]
    graphs: Mapping[str, GraphSignature]  # "step" (every call) [, "refresh" (at row starts), "start"]
    period: int  # refresh runs for slots whose position is a multiple of this
    length: int  # positions per sample
    span: int  # positions one step call advances
    fused: FusedSection | None = None  # kind "fused" only

    def __post_init__(self) -> None:
        """Raises ValueError, "field: problem", where the section breaks the contract."""
        if self.kind not in STEP_KINDS:
            raise ValueError(f"kind: must be one of {STEP_KINDS}, got {self.kind!r}")
        if (self.kind == "fused") != (self.fused is not None):
            raise ValueError(f"fused: kind {self.kind!r} {'needs' if self.kind == 'fused' else 'takes no'} "
                             "fused section (op and weights)")
        if STEP not in self.graphs or set(self.graphs) - set(GRAPH_NAMES) or PIXEL not in self.graphs[STEP].outputs:
            raise ValueError(f"graphs: a step program needs a {STEP!r} graph with output {PIXEL!r} and may have "
                             f"{START!r} and {REFRESH!r}, got {dict(self.graphs)}")
        names = {s.name for s in self.states}
        unknown = [o for g in self.graphs.values() for o in g.outputs
                   if o != PIXEL and o.removeprefix(NEXT) not in names]
        if unknown:
            raise ValueError(f"graphs: outputs {unknown} are neither {PIXEL!r} nor next_<state> of {sorted(names)}")
        inputs = [i for g in self.graphs.values() for i in g.inputs if i not in CONTROLS and i not in names]
        if inputs:
            raise ValueError(f"graphs: inputs {inputs} are neither controls {CONTROLS} nor states")
        if self.span < 1 or self.period % self.span or self.length % self.period:
            raise ValueError(f"span: {self.span} must divide period {self.period}, which must divide {self.length}")

    def to_dict(self) -> dict[str, Any]:
        record = {
            "kind": self.kind,
            "period": self.period,
            "length": self.length,
            "span": self.span,
            "states": [s.to_dict() for s in self.states],
            "graphs": {name: {"inputs": list(g.inputs), "outputs": list(g.outputs)} for name, g in self.graphs.items()},
        }
        if self.fused is not None:
            record["fused"] = self.fused.to_dict()
        return record

    @classmethod
    def read(cls, fields: Fields) -> StepSection:
        graphs = {}
        for name, value in fields.get("graphs", dict).items():
            graph = Fields(fields.path, value, f"{fields.where}.graphs.{name}")
            graphs[name] = GraphSignature(tuple(graph.get("inputs", list)), tuple(graph.get("outputs", list)))
        fused = None
        if "fused" in fields.data:
            op = fields.child("fused")
            fused = FusedSection(op.get("op", str), op.get("weights", str))
        try:
            return cls(
                kind=fields.get("kind", str),
                states=tuple(TensorSpec.read(s) for s in fields.children("states")),
                graphs=graphs,
                period=fields.get("period", int),
                length=fields.get("length", int),
                span=fields.get("span", int),
                fused=fused,
            )
        except ValueError as error:
            if type(error) is not ValueError:  # already a ManifestError naming its field
                raise
            field, _, problem = str(error).partition(": ")
            raise fields.error(field, problem) from None
