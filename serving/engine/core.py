"""Step-level continuous batching over a fixed set of sample slots.

The engine owns `num_slots` slots; each active slot is one sample in progress. One engine
step, in the shape schedule → execute → update:
  1. retire slots whose job was cancelled or ran past its deadline;
  2. schedule: the scheduler (scheduler.py) plans which waiting samples take free slots;
  3. execute: the slot runner (runner.py) calls the step program once on every active slot
     (one call advances every slot by the program's span: a whole row for the exported programs;
     the fused operators on the CPU run several whole rows per call while no waiting sample would
     join the running batch, as many as fit `call_budget_ms`: the Python between row calls cost ~40% of a batch-1
     row there);
  4. update: count completed rows, copy images out where someone looks (every row of a job that
     reports progress, each finished sample), retire finished samples, end finished jobs.

A sample's noise depends only on (seed, sample index) (kernels.sampling.noise_for), so the
images do not depend on what else shares the batch, or when the sample joined it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..sampling_args import check_sampling
from .jobs import JobStatus, SampleJob
from .program import StepRunner
from .runner import SlotRunner
from .scheduler import SCHEDULERS, StepPlan

log = logging.getLogger("genserve.engine")


class EngineStopped(RuntimeError):
    """The engine's thread has died: nothing submitted to it will run."""


@dataclass(frozen=True)
class EngineConfig:
    num_slots: int = 64
    batching: str = "continuous"  # or "static": admit only into an empty engine (the baseline)
    name: str = "sampler"  # the model it samples, for log lines
    # Where the program runs several whole rows per call (the fused operators on the CPU), a call runs
    # as many rows as fit in about this time, while no waiting sample would join the running batch: a
    # sample that arrives meanwhile waits at most about this long to join. 0: one row per call.
    call_budget_ms: float = 4.0

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        if not self.call_budget_ms >= 0:
            raise ValueError(f"call_budget_ms must be >= 0, got {self.call_budget_ms}")
        if self.batching not in SCHEDULERS:
            raise ValueError(f"batching must be one of {tuple(SCHEDULERS)}, got {self.batching!r}")


class SamplingEngine:
    """Runs a step program for many sample slots at once; see the module docstring."""

    def __init__(self, runner: StepRunner, config: EngineConfig | None = None) -> None:
        self.runner, self.spec = runner, runner.spec  # the step program, in its runtime
        self.config = config or EngineConfig()
        self.scheduler = SCHEDULERS[self.config.batching]()
        self.slots = SlotRunner(runner, self.config.num_slots)
        self.steps_run = 0
        self._row_seconds = 0.0  # the last call's time per row; 0 before the first
        self.samples_finished = 0
        self.runs = 0  # busy periods: an idle engine that admits samples starts a run; joiners share it
        self._waiting: deque[SampleJob] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._look_for_drops = False  # a job was cancelled, or one has a deadline
        self.died: str | None = None  # why the engine thread died, once it has

    @property
    def active(self) -> int:
        """Slots holding a sample in progress."""
        return self.slots.active

    # ---- requests ---------------------------------------------------------------------------
    def submit(
        self,
        seed: int,
        count: int | None = None,
        temperature: float = 1.0,
        labels: Sequence[int] | None = None,
        indices: Sequence[int] | None = None,
        latents: np.ndarray | None = None,
        deadline: float | None = None,
        on_progress: Callable[[SampleJob], None] | None = None,
        on_done: Callable[[SampleJob], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> SampleJob:
        """Queues samples `indices` (default 0..count-1) of `seed`; returns the job to wait on.

        Args:
            seed: the request's seed; sample k's noise is keyed by (seed, indices[k]).
            count: how many samples (when `indices` is not given).
            temperature: >= 0; 0 takes the most likely value of every pixel.
            labels: one class label per sample, for a conditional model.
            indices: explicit sample indices (e.g. to regenerate sample 17 of a seed alone).
            latents: (count, *spec.latent_shape) float32, each sample's z: required by programs that
                take latents (a PixelVAE's decoder, a MAF), refused by the others.
            deadline: a `time.monotonic()` time after which the job is dropped.
            on_progress: called from the engine thread whenever samples of the job finish rows.
            on_done: called from the engine thread when the job ends (finished, cancelled or expired).
            cancelled: asked from the engine thread before every step; True cancels the job (e.g. Triton's
                `request.is_cancelled`, for a caller whose cancellation arrives somewhere else).

        Raises:
            ValueError: bad counts; InvalidArgument (a ValueError) naming a bad seed, index, temperature or label.
            EngineStopped: the engine's thread has died.
        """
        indices = tuple(range(count)) if indices is None else tuple(int(i) for i in indices)
        if not indices or (count is not None and count != len(indices)):
            raise ValueError(f"count must be >= 1 and match indices, got count={count}, {len(indices)} indices")
        check_sampling(seed, indices, temperature, labels, self.spec.num_classes)
        job = SampleJob(
            seed=seed, indices=indices, temperature=float(temperature),
            labels=None if labels is None or not self.spec.num_classes else tuple(int(v) for v in labels),
            latents=self._checked_latents(latents, len(indices)),
            images=np.zeros((len(indices), *self.spec.sample_shape), dtype=np.uint8),
            rows_done=np.zeros(len(indices), dtype=np.int64), deadline=deadline, on_progress=on_progress,
            on_done=on_done, cancelled=cancelled,
        )
        job._notify = self._note_drop
        with self._wake:
            if self.died is not None:
                raise EngineStopped(f"the sampling engine has stopped ({self.died})")
            self._waiting.append(job)
            self._look_for_drops |= job.watched
            self._wake.notify()
        return job

    def _checked_latents(self, latents: np.ndarray | None, count: int) -> np.ndarray | None:
        shape = self.spec.latent_shape
        if shape is None:
            if latents is not None:
                raise ValueError("latents: this model's sampler takes no latents")
            return None
        expected = (count, *shape)
        if latents is None:
            raise ValueError(f"latents: this model's sampler needs latents of shape {expected}")
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != expected or not np.isfinite(latents).all():
            raise ValueError(f"latents: expected finite values of shape {expected}, got {latents.shape}")
        return latents

    def generate(self, seed: int, count: int, temperature: float = 1.0,
                 labels: Sequence[int] | None = None, latents: np.ndarray | None = None) -> np.ndarray:
        """Samples synchronously (no background thread may be running): (count, C, H, W) uint8."""
        if self._thread is not None:
            raise RuntimeError("generate() drives the engine itself; use submit() while the engine thread runs")
        job = self.submit(seed, count, temperature, labels, latents=latents)
        self.run_until_idle()
        return job.images

    @property
    def queued_samples(self) -> int:
        """Samples submitted but not yet in a slot."""
        with self._wake:
            return sum(len(job.unadmitted) for job in self._waiting)

    def _note_drop(self) -> None:
        with self._wake:
            self._look_for_drops = True
            self._wake.notify()

    # ---- the thread -------------------------------------------------------------------------
    def run_until_idle(self) -> None:
        while self.step():
            pass

    def start(self) -> None:
        """Runs the engine in a background thread until `stop()`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="genserve-sampling-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        """Whether submitted samples will run: the thread is running (or was never started) and never died."""
        return self.died is None and (self._thread is None or self._thread.is_alive())

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # noqa: BLE001 - the thread is ending: no caller may wait forever
            with self._wake:
                self.died = f"{type(error).__name__}: {error}"
            log.error("the sampling engine of %s died (%s); its requests fail UNAVAILABLE", self.config.name, self.died)
            self._fail_all(f"the sampling engine has stopped ({self.died})")

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and self.active == 0:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - a failed step must not hang every waiting caller
                self._fail_all(f"sampling engine error: {type(error).__name__}: {error}")

    def _fail_all(self, error: str) -> None:
        """Ends every job in the engine as FAILED and frees all slots (the thread keeps serving)."""
        running = {}
        for slot in range(self.active - 1, -1, -1):
            running[self.slots.slot_jobs[slot][0]] = None
            self.slots.release(slot)
        for job in running:  # once every slot is free
            job.end(JobStatus.FAILED, error)
        with self._wake:
            while self._waiting:
                self._waiting.popleft().end(JobStatus.FAILED, error)

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> bool:
        """One engine step (module docstring); False when there was nothing to do."""
        if self._look_for_drops:
            self._retire_dropped()
        idle = self.active == 0
        self._admit(self._schedule())
        if self.active == 0:
            return False
        self.runs += idle
        rows = self._rows_per_call()
        started = time.perf_counter()
        ended_rows = self.slots.execute(rows)
        self._row_seconds = (time.perf_counter() - started) / rows
        self.steps_run += 1
        if len(ended_rows):
            self._finish_rows(ended_rows)
        return True

    def _rows_per_call(self) -> int:
        """Whole rows for the next call (module docstring): 1 unless the program runs several per call.
        No more than the fewest rows any slot has left (a finished sample frees its slot at once),
        nor than fit the time budget at the last call's time per row; 1 while a waiting sample would
        join at the next row (continuous batching with a free slot)."""
        if not self.slots.whole_rows:
            return 1
        # The queue is read without the lock: a job queued just after this only joins a call later.
        if self._waiting and self.scheduler.joins_running_batch(self.active, self.config.num_slots):
            return 1
        height, width = self.spec.sample_shape[1:]
        left = height - int(self.slots.positions[:self.active].max()) // width
        fit = int(self.config.call_budget_ms / 1e3 / self._row_seconds) if self._row_seconds else 1
        return max(1, min(left, fit))

    def _schedule(self) -> StepPlan:
        """Admissions for this step; dropped jobs already left the queue in `_retire_dropped`."""
        if self.active == self.config.num_slots:  # nothing can join: skip the queue (hot path)
            return StepPlan()
        with self._wake:
            return self.scheduler.plan(self._waiting, self.active, self.config.num_slots)

    def _admit(self, plan: StepPlan) -> None:
        for admission in plan.admit:
            job = admission.job
            self.slots.occupy(job, admission.samples)
            job._admitted += len(admission.samples)
            if not job.unadmitted:
                job.status = JobStatus.RUNNING
                with self._wake:
                    self._waiting.remove(job)

    def _finish_rows(self, slots: np.ndarray) -> None:
        """Records the rows `slots` just completed; copies out the images that someone looks at now
        (every sample of a job that reports progress, every sample that finished) and retires
        finished samples. Only those copies wait for a GPU: rows that nobody watches leave the
        device once, with their image, so the host queues row calls back to back meanwhile."""
        height = self.spec.sample_shape[1]
        finished, shown = [], []
        for job, job_slots, ks, rows_done in self.slots.completed_rows(slots):
            job.rows_done[ks] = rows_done
            ending = rows_done == height
            finished.extend(job_slots[ending].tolist())
            if job.on_progress is not None:
                shown.append((job, job_slots, ks))
            elif ending.any():
                shown.append((job, job_slots[ending], ks[ending]))
        if shown:
            images = self.slots.images(np.concatenate([job_slots for _, job_slots, _ in shown]))
            start = 0
            for job, _, ks in shown:
                job.images[ks] = images[start:start + len(ks)]
                start += len(ks)
                if job.on_progress is not None:
                    job.on_progress(job)
        for slot in sorted(finished, reverse=True):
            job, _ = self.slots.slot_jobs[slot]
            self.slots.release(slot)
            job._finished += 1
            self.samples_finished += 1
            if job._finished == job.count:
                job.end(JobStatus.FINISHED)

    def _retire_dropped(self) -> None:
        """Ends jobs cancelled (by `cancel` or their predicate) or past their deadline; frees their slots."""
        self._look_for_drops = False
        now = time.monotonic()
        verdicts: dict[SampleJob, JobStatus | None] = {}  # asked once per job: a predicate may flip meanwhile
        for slot in range(self.active - 1, -1, -1):
            job, _ = self.slots.slot_jobs[slot]
            self._look_for_drops |= job.watched
            if job not in verdicts:
                verdicts[job] = job.dropped(now)
            if verdicts[job] is not None:
                self.slots.release(slot)
        for job, why in verdicts.items():  # once every slot is free: on_done sees the engine as it is
            if why is not None:
                job.end(why)
        with self._wake:
            for job in list(self._waiting):
                why = job.dropped(now)
                if why is not None:
                    self._waiting.remove(job)
                    job.end(why)
            self._look_for_drops |= any(job.watched for job in self._waiting)
