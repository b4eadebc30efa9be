"""Triton's Python-backend sampler model: genserve's sampling engine inside Triton's stub."""

from __future__ import annotations

import functools
import json
import threading

import numpy as np

from .engine import EngineConfig, JobStatus, SamplingEngine, load_step_runner
from .metrics import ENGINE_ACTIVE, ENGINE_RUNS, ENGINE_SAMPLES
from .sampler_rows import PROGRESS_PARAMETER, RequestProgress, check_sampler_feeds, sample_batches, wants_progress
from .triton_python import TritonModel


class SamplingModel(TritonModel):
    """Runs genserve's sampling engine inside Triton, as a decoupled model.

    Rows of (seed, index, temperature[, label]) in; one engine (the fused operators where built, else
    the step graphs in ONNX Runtime) runs on its own thread across requests, so a request that
    arrives while others are sampling joins them at the next step (continuous batching, as in
    genserve's embedded runtime). `execute` only submits: each request's responses stream from the
    engine thread, one each time all its samples have one more row done (`sampler_rows`), the last
    one flagged final (only that one where the request's parameter `progress` is false).
    `request.is_cancelled()` is asked every step, so a cancelled request (the client cancelled its
    stream) leaves the engine and frees its slots at once. The engine's runs, finished samples and
    busy slots are custom metrics on Triton's /metrics.
    """

    def setup(self) -> None:
        runner = load_step_runner(self.manifest, "onnx", "cpu", self.version)
        self.num_classes, self.sample_shape = runner.spec.num_classes, runner.spec.sample_shape
        slots = self.manifest.batching.max_batch_size
        self.engine = SamplingEngine(runner, EngineConfig(num_slots=slots, name=self.manifest.triton_name))
        self.metrics = EngineMetrics(self.pb, self.manifest.triton_name)
        self.engine.start()

    def check(self, feeds):
        check_sampler_feeds(feeds, self.num_classes)
        return feeds

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                feeds = self.check(self._inputs(request))
                streams = wants_progress(json.loads(request.parameters() or "{}").get(PROGRESS_PARAMETER))
            except Exception as error:  # noqa: BLE001 - a bad request is answered alone
                sender.send(self._error(error), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self._submit(request, sender, feeds, streams)
        return None  # decoupled: the responses go through each request's sender

    def _submit(self, request, sender, feeds: dict[str, np.ndarray], streams: bool) -> None:
        """Runs the request's samples; `streams`: a response each time every sample has another row
        done, else the final response only."""
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        batches = sample_batches(feeds)
        progress = RequestProgress(len(feeds["seed"]), self.sample_shape)
        lock = threading.Lock()  # callbacks run on the engine thread, submissions on this one
        state = {"running": len(batches), "ended": False}
        jobs = []

        def send(response=None, flags: int = 0) -> None:
            try:
                sender.send(response, flags=flags)
            except Exception:  # noqa: BLE001 - Triton closed the request (its caller cancelled): stop its samples
                state["ended"] = True
                for job in jobs:
                    job.cancel()

        def progressed(positions, job) -> None:
            with lock:
                if progress.update(positions, job.rows_done, job.images) and not progress.complete:
                    send(self._respond(progress.outputs()))

        def ended(positions, job) -> None:
            with lock:
                self.metrics.update(self.engine)
                if state["ended"]:
                    return
                if job.status is JobStatus.FINISHED:
                    if not streams:  # no progress callbacks: this is the batch's only update
                        progress.update(positions, job.rows_done, job.images)
                    state["running"] -= 1
                    if state["running"] == 0:
                        state["ended"] = True
                        send(self._respond(progress.outputs()), final)
                    return
                state["ended"] = True
                for other in jobs:
                    other.cancel()
                if job.status is JobStatus.CANCELLED:
                    send(flags=final)  # nobody reads it: the caller has gone
                else:
                    send(self._error(RuntimeError(job.error)), final)

        for positions, batch in batches:
            jobs.append(self.engine.submit(
                batch.seed, temperature=batch.temperature, labels=batch.labels, indices=batch.indices,
                latents=batch.latents,
                on_progress=functools.partial(progressed, positions) if streams else None,
                on_done=functools.partial(ended, positions), cancelled=request.is_cancelled,
            ))

    def finalize(self) -> None:
        self.engine.stop()


class EngineMetrics:
    """The engine's figures as Triton custom metrics (Triton's /metrics, beside nv_inference_*)."""

    def __init__(self, pb_utils, model: str) -> None:
        labels = {"model": model}
        self._families = []  # Triton drops a family's metrics once the family object is garbage

        def metric(name: str, help_text: str, kind):
            self._families.append(pb_utils.MetricFamily(name=name, description=help_text, kind=kind))
            return self._families[-1].Metric(labels=labels)

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.runs = metric(f"{ENGINE_RUNS[0]}_total", ENGINE_RUNS[1], counter)
        self.samples = metric(f"{ENGINE_SAMPLES[0]}_total", ENGINE_SAMPLES[1], counter)
        self.active = metric(*ENGINE_ACTIVE, gauge)
        self._runs = self._samples = 0

    def update(self, engine: SamplingEngine) -> None:
        """Called from the engine thread when a job ends."""
        self.runs.increment(engine.runs - self._runs)
        self.samples.increment(engine.samples_finished - self._samples)
        self._runs, self._samples = engine.runs, engine.samples_finished
        self.active.set(engine.active)
