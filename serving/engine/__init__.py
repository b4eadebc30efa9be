"""The sampling engine: cached step programs run slot by slot with continuous batching.

core.py (SamplingEngine: requests, the thread, schedule → execute → update), scheduler.py
(admission policy → StepPlan), runner.py (slot state, inputs, the step program's calls),
jobs.py (SampleJob, JobStatus), program.py (StepSpec and a StepRunner per runtime: ONNX Runtime,
TorchScript, or the fused operators of serving/fused).
"""

from .core import EngineConfig, EngineStopped, SamplingEngine
from .jobs import JobStatus, SampleJob
from .program import FusedStepRunner, OnnxStepRunner, StepRunner, StepSpec, TorchStepRunner, load_step_runner
from .scheduler import ContinuousScheduler, Scheduler, StaticScheduler, StepPlan

__all__ = [
    "ContinuousScheduler",
    "EngineConfig",
    "EngineStopped",
    "FusedStepRunner",
    "JobStatus",
    "OnnxStepRunner",
    "SampleJob",
    "SamplingEngine",
    "Scheduler",
    "StaticScheduler",
    "StepPlan",
    "StepRunner",
    "StepSpec",
    "TorchStepRunner",
    "load_step_runner",
]
