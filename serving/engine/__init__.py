"""The sampling engine: cached step programs run slot by slot with continuous batching."""

from .program import OnnxStepRunner, StepRunner, StepSpec, TorchStepRunner, load_step_runner
from .scheduler import EngineConfig, EngineStopped, SampleJob, SamplingEngine

__all__ = [
    "EngineConfig",
    "EngineStopped",
    "OnnxStepRunner",
    "SampleJob",
    "SamplingEngine",
    "StepRunner",
    "StepSpec",
    "TorchStepRunner",
    "load_step_runner",
]
