"""Triton `config.pbtxt` from typed dataclasses, one small function per section.

The text is validated by parsing it into Triton's own `ModelConfig` protobuf (shipped in
tritonclient), so a typo in a field name or enum fails the export, not the server start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import text_format

from genserve.serving.artifacts import TensorSpec

NATIVE_BACKENDS = {"onnxruntime": "model.onnx", "pytorch": "model.pt"}


@dataclass(frozen=True)
class DynamicBatching:
    max_queue_delay_microseconds: int = 2000
    preferred_batch_size: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_queue_delay_microseconds < 0:
            raise ValueError(f"max_queue_delay_microseconds must be >= 0, got {self.max_queue_delay_microseconds}")


@dataclass(frozen=True)
class InstanceGroup:
    count: int = 1
    kind: str = "KIND_CPU"  # KIND_CPU, KIND_GPU or KIND_AUTO

    def __post_init__(self) -> None:
        if self.count < 1 or self.kind not in ("KIND_CPU", "KIND_GPU", "KIND_AUTO"):
            raise ValueError(f"bad instance group: count={self.count} kind={self.kind!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The parts of Triton's ModelConfig that genserve sets."""

    name: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_batching: DynamicBatching | None = field(default_factory=DynamicBatching)
    instance_group: InstanceGroup = field(default_factory=InstanceGroup)
    latest_versions: int = 1  # version policy: serve the newest N versions
    default_model_filename: str | None = None
    parameters: tuple[tuple[str, str], ...] = ()
    decoupled: bool = False  # responses go through a sender: any number per request (the streaming sampler)

    def __post_init__(self) -> None:
        if self.max_batch_size < 0 or self.latest_versions < 1:
            raise ValueError(
                f"max_batch_size must be >= 0 and latest_versions >= 1, got {self.max_batch_size}, "
                f"{self.latest_versions}"
            )


def _tensor(t: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in t.shape)
    return f'  {{\n    name: "{t.name}"\n    data_type: TYPE_{t.dtype.name}\n    dims: [ {dims} ]\n  }}'


def _tensors(kind: str, tensors: tuple[TensorSpec, ...]) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(t) for t in tensors) + "\n]"


def _dynamic_batching(d: DynamicBatching) -> str:
    preferred = "".join(f"\n  preferred_batch_size: {b}" for b in d.preferred_batch_size)
    return f"dynamic_batching {{{preferred}\n  max_queue_delay_microseconds: {d.max_queue_delay_microseconds}\n}}"


def _instance_group(g: InstanceGroup) -> str:
    return f"instance_group [\n  {{\n    count: {g.count}\n    kind: {g.kind}\n  }}\n]"


def _version_policy(latest: int) -> str:
    return f"version_policy: {{ latest: {{ num_versions: {latest} }} }}"


def _parameters(parameters: tuple[tuple[str, str], ...]) -> str:
    return "\n".join(
        f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}' for k, v in parameters
    )


def render(config: ModelConfig) -> str:
    """config.pbtxt text, validated by a parse into Triton's ModelConfig protobuf."""
    sections = [
        f'name: "{config.name}"',
        f'backend: "{config.backend}"',
        f"max_batch_size: {config.max_batch_size}",
        _version_policy(config.latest_versions),
        *(["model_transaction_policy { decoupled: true }"] if config.decoupled else []),
        _tensors("input", config.inputs),
        _tensors("output", config.outputs),
        _instance_group(config.instance_group),
    ]
    if config.dynamic_batching is not None:
        sections.append(_dynamic_batching(config.dynamic_batching))
    if config.default_model_filename:
        sections.append(f'default_model_filename: "{config.default_model_filename}"')
    if config.parameters:
        sections.append(_parameters(config.parameters))
    text = "\n".join(sections) + "\n"
    parse(text)
    return text


def parse(text: str):
    """Parses config.pbtxt text into Triton's ModelConfig message (raises on any error)."""
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())
