"""The embedded runtime: every entry point runs in this process.

Encode/decode/score-style entry points run in ONNX Runtime (CUDA EP when present) or
TorchScript behind a dynamic batcher each; autoregressive samplers run the sampling engine
(cached step programs, continuous batching) on a background thread. Every artifact's sha256 is
checked against its manifest before it is loaded (Manifest.artifact).
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from ..artifacts import ArtifactIntegrityError, Manifest
from ..batcher import BatchPolicy, DynamicBatcher
from ..config import BatcherConfig, RuntimeConfig
from ..engine import EngineConfig, EngineStopped, JobStatus, SampleJob, SamplingEngine, load_step_runner
from ..entry_runner import EntryPointRunner, OnnxEntryPoint, TorchScriptEntryPoint
from ..errors import DeadlineExceeded, ResourceExhausted, Unavailable
from ..metrics import ServerMetrics
from ..registry import ModelRegistry
from .base import Progress, ProgressCallback, Runtime, SampleBatch

log = logging.getLogger("genserve.embedded")


def batch_policy(manifest: Manifest, config: BatcherConfig) -> BatchPolicy:
    """The manifest's batching unless the server's config overrides it; disabled = every request alone."""
    if not config.enabled:
        return BatchPolicy(max_batch_size=1, max_queue_delay_s=0.0, max_queued_rows=config.max_queued_rows)
    batching = manifest.batching
    size = config.max_batch_size or batching.max_batch_size
    delay_us = config.max_queue_delay_us if config.max_queue_delay_us is not None else \
        batching.max_queue_delay_microseconds
    return BatchPolicy(max_batch_size=size, max_queue_delay_s=delay_us / 1e6, max_queued_rows=config.max_queued_rows)


class EmbeddedRuntime(Runtime):
    def __init__(self, config: RuntimeConfig, batcher: BatcherConfig, metrics: ServerMetrics | None = None) -> None:
        self.config, self.batcher_config, self.metrics = config, batcher, metrics
        self.batchers: dict[str, DynamicBatcher] = {}
        self.engines: dict[str, SamplingEngine] = {}
        self.refused: dict[str, str] = {}  # entry point → why it was not loaded

    async def start(self, registry: ModelRegistry) -> None:
        manifests = [m for spec in registry.models.values() for m in spec.entry_points.values()]
        # Loading is blocking work (hash checks, session creation): keep the event loop free.
        await asyncio.to_thread(self._load_all, manifests)

    def _load_all(self, manifests: list[Manifest]) -> None:
        for manifest in manifests:
            try:
                self._load(manifest)
            except ArtifactIntegrityError as error:  # that model is refused; the others still serve
                self.refused[manifest.triton_name] = str(error)
                log.error("not serving %s: %s", manifest.triton_name, error)

    def _load(self, manifest: Manifest) -> None:
        if manifest.step is not None:
            runner = load_step_runner(manifest, self.config.backend, self.config.device, fused=self.config.fused)
            config = EngineConfig(num_slots=manifest.batching.max_batch_size, name=manifest.triton_name,
                                  call_budget_ms=self.config.call_budget_ms)
            engine = SamplingEngine(runner, config)
            engine.start()
            self.engines[manifest.triton_name] = engine
            if self.metrics is not None:
                self.metrics.engines.engines[manifest.triton_name] = engine
        else:
            runner = self._entry_runner(manifest)
            self.batchers[manifest.triton_name] = DynamicBatcher(
                manifest.triton_name, runner.run_merged, batch_policy(manifest, self.batcher_config),
                self._observer(manifest.triton_name),
            )

    def _unavailable(self, name: str) -> Unavailable:
        why = self.refused.get(name) or (f"its sampling engine has stopped ({self.engines[name].died})"
                                         if name in self.engines else "it is not loaded")
        return Unavailable(f"{name} is not serving: {why}")

    def _entry_runner(self, manifest: Manifest) -> EntryPointRunner:
        if self.config.backend == "torchscript":
            return TorchScriptEntryPoint.load(manifest, device=self.config.device)
        return OnnxEntryPoint.load(manifest)

    def _observer(self, name: str):
        if self.metrics is None:
            return None
        queue, sizes = self.metrics.queue_time.labels(name), self.metrics.batch_size.labels(name)

        def observe(waits: list[float], rows: int) -> None:
            for wait in waits:
                queue.observe(wait)
            sizes.observe(rows)

        return observe

    async def infer(self, entry, feeds, deadline):
        if entry.triton_name not in self.batchers:
            raise self._unavailable(entry.triton_name)
        return await self.batchers[entry.triton_name].submit(feeds, deadline)

    async def sample_sequential(self, sampler: Manifest, batch: SampleBatch, deadline: float | None,
                                on_progress: ProgressCallback | None) -> np.ndarray:
        engine = self.engines.get(sampler.triton_name)
        if engine is None or not engine.alive:
            raise self._unavailable(sampler.triton_name)
        if engine.queued_samples + len(batch.indices) > self.config.max_waiting_samples:
            raise ResourceExhausted(
                f"the sampling queue of {sampler.triton_name} is full ({engine.queued_samples} samples waiting, "
                f"limit {self.config.max_waiting_samples}); retry later"
            )
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[SampleJob] = loop.create_future()

        def resolve(job: SampleJob) -> None:
            if not ended.done():
                ended.set_result(job)

        def progressed(job: SampleJob) -> None:  # engine thread: snapshot, then hand to the event loop
            snapshot = Progress(job.rows_done.copy(), job.images.copy())
            loop.call_soon_threadsafe(on_progress, snapshot)

        try:
            job = engine.submit(
                batch.seed, temperature=batch.temperature, labels=batch.labels, indices=batch.indices,
                latents=batch.latents,
                deadline=deadline, on_progress=progressed if on_progress is not None else None,
                on_done=lambda job: loop.call_soon_threadsafe(resolve, job),
            )
        except EngineStopped:
            raise self._unavailable(sampler.triton_name) from None
        try:
            await ended
        except asyncio.CancelledError:
            job.cancel()  # the engine frees its slots at the next step boundary
            raise
        if job.status is JobStatus.DEADLINE_EXCEEDED:
            raise DeadlineExceeded(f"deadline exceeded after {int(job.rows_done.min())} of "
                                   f"{job.images.shape[2]} rows; the samples were dropped")
        if engine.died is not None:
            raise self._unavailable(sampler.triton_name)
        if job.status is not JobStatus.FINISHED:
            raise RuntimeError(job.error)
        return job.images

    def ready(self, entry: Manifest) -> bool:
        engine = self.engines.get(entry.triton_name)
        return entry.triton_name in self.batchers or (engine is not None and engine.alive)

    async def close(self) -> None:
        for batcher in self.batchers.values():
            await batcher.close()
        for engine in self.engines.values():
            engine.stop()
