"""Step-level continuous batching over a fixed set of sample slots.

The engine owns `num_slots` slots. Each active slot is one sample in progress with its own
position, noise, temperature, label and cache rows. One engine step:
  1. retire slots whose job was cancelled or ran past its deadline;
  2. admit waiting samples into free slots (continuous: at every step; static: only when
     every slot is free, the classic run-the-batch-to-completion baseline);
  3. run `refresh` on the slots starting a row, then `step` on all active slots (one call
     advances every slot by the program's span: a whole row for the exported programs);
  4. write each slot's pixel, report finished rows, retire finished samples at once.
Active slots are kept packed at the front of every per-slot tensor (a retiring slot takes
the last active slot's row), so graphs run on plain leading slices, never on idle slots.

A sample's noise depends only on (seed, sample index) (kernels.sampling.noise_for), so the
images do not depend on what else shares the batch, or when the sample joined it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..artifacts import NEXT, PIXEL
from ..kernels.sampling import noise_for
from .program import StepRunner

log = logging.getLogger("genserve.engine")


class EngineStopped(RuntimeError):
    """The engine's thread has died: nothing submitted to it will run."""

BATCHING = ("continuous", "static")


@dataclass(frozen=True)
class EngineConfig:
    num_slots: int = 64
    batching: str = "continuous"  # or "static": admit only into an empty engine (the baseline)
    name: str = "sampler"  # the model it samples, for log lines

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {self.batching!r}")


@dataclass(eq=False)
class SampleJob:
    """One request's samples: what was asked, the images as they fill in, and how it ended.

    Created by `SamplingEngine.submit`; read by the caller, written by the engine thread.
    """

    seed: int
    indices: tuple[int, ...]  # sample indices within the seed: each keys its own noise
    temperature: float
    labels: tuple[int, ...] | None
    images: np.ndarray  # (count, C, H, W) uint8; row r of sample k is final once rows_done[k] > r
    rows_done: np.ndarray  # (count,) rows completed per sample
    deadline: float | None = None  # time.monotonic() after which the job is dropped
    on_progress: Callable[[SampleJob], None] | None = None  # engine thread: after a step that finished rows
    on_done: Callable[[SampleJob], None] | None = None  # engine thread: once the job ends, however it ends
    error: str | None = None  # "cancelled" or "deadline exceeded" when the job did not finish
    done: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    _admitted: int = 0
    _finished: int = 0
    _cancel: bool = False
    _notify: Callable[[], None] | None = None  # set by the engine: look for dropped jobs at the next step

    @property
    def count(self) -> int:
        return len(self.indices)

    def cancel(self) -> None:
        """Asks the engine to drop this job; its slots are freed at the next step boundary."""
        self._cancel = True
        if self._notify is not None:
            self._notify()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    @property
    def latency(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.submitted_at


class SamplingEngine:
    """Runs a step program for many sample slots at once; see the module docstring.

    Cache states live in torch tensors on the runner's device; the per-slot bookkeeping the
    loop touches every step (positions, noise, pixels) lives in host numpy arrays, where a
    batch-1 step costs microseconds of Python rather than a dozen tensor dispatches.
    """

    def __init__(self, runner: StepRunner, config: EngineConfig | None = None) -> None:
        self.runner, self.spec = runner, runner.spec
        self.config = config or EngineConfig()
        slots, device = self.config.num_slots, runner.device
        channels, height, width = self.spec.sample_shape
        self.states = {
            s.name: torch.zeros((slots, *s.shape), dtype=s.dtype.torch, device=device)
            for s in self.spec.states
        }
        self.positions = np.zeros(slots, dtype=np.int64)
        self.temperature = np.zeros((slots, 1), dtype=np.float32)
        self.labels = np.zeros((slots, 1), dtype=np.int64)
        self.noise = np.zeros((slots, self.spec.length, channels), dtype=np.float32)  # per position: (C,)
        self.pixels = np.zeros((slots, channels, height * width), dtype=np.uint8)
        self.slot_jobs: list[tuple[SampleJob, int] | None] = [None] * slots  # (job, k): sample k of job
        self.active = 0
        self.steps_run = 0
        self._waiting: deque[SampleJob] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._look_for_drops = False  # a job was cancelled, or one has a deadline
        self.died: str | None = None  # why the engine thread died, once it has

    # ---- requests ---------------------------------------------------------------------------
    def submit(
        self,
        seed: int,
        count: int | None = None,
        temperature: float = 1.0,
        labels: Sequence[int] | None = None,
        indices: Sequence[int] | None = None,
        deadline: float | None = None,
        on_progress: Callable[[SampleJob], None] | None = None,
        on_done: Callable[[SampleJob], None] | None = None,
    ) -> SampleJob:
        """Queues samples `indices` (default 0..count-1) of `seed`; returns the job to wait on.

        Args:
            seed: the request's seed; sample k's noise is keyed by (seed, indices[k]).
            count: how many samples (when `indices` is not given).
            temperature: >= 0; 0 takes the most likely value of every pixel.
            labels: one class label per sample, for a conditional model.
            indices: explicit sample indices (e.g. to regenerate sample 17 of a seed alone).
            deadline: a `time.monotonic()` time after which the job is dropped.
            on_progress: called from the engine thread whenever samples of the job finish rows.
            on_done: called from the engine thread when the job ends (finished, cancelled or expired).

        Raises:
            ValueError: bad counts, seeds, temperatures or labels (the caller's mistake).
        """
        indices = tuple(range(count)) if indices is None else tuple(int(i) for i in indices)
        if not indices or (count is not None and count != len(indices)):
            raise ValueError(f"count must be >= 1 and match indices, got count={count}, {len(indices)} indices")
        if seed < 0 or min(indices) < 0:
            raise ValueError(f"seed and sample indices must be >= 0, got seed={seed}, min index={min(indices)}")
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        num_classes = self.spec.num_classes
        if num_classes:
            if labels is None or len(labels) != len(indices):
                raise ValueError(f"labels: this model is conditional, give one label per sample ({len(indices)})")
            bad = [v for v in labels if not 0 <= v < num_classes]
            if bad:
                raise ValueError(f"labels must lie in [0, {num_classes}), got {bad}")
            labels = tuple(int(v) for v in labels)
        elif labels is not None:
            raise ValueError("labels: this model is unconditional")
        job = SampleJob(
            seed=seed, indices=indices, temperature=float(temperature), labels=labels,
            images=np.zeros((len(indices), *self.spec.sample_shape), dtype=np.uint8),
            rows_done=np.zeros(len(indices), dtype=np.int64), deadline=deadline, on_progress=on_progress,
            on_done=on_done,
        )
        job._notify = self._note_drop
        with self._wake:
            if self.died is not None:
                raise EngineStopped(f"the sampling engine has stopped ({self.died})")
            self._waiting.append(job)
            self._look_for_drops |= deadline is not None
            self._wake.notify()
        return job

    def generate(self, seed: int, count: int, temperature: float = 1.0,
                 labels: Sequence[int] | None = None) -> np.ndarray:
        """Samples synchronously (no background thread may be running): (count, C, H, W) uint8."""
        if self._thread is not None:
            raise RuntimeError("generate() drives the engine itself; use submit() while the engine thread runs")
        job = self.submit(seed, count, temperature, labels)
        self.run_until_idle()
        return job.images

    @property
    def queued_samples(self) -> int:
        """Samples submitted but not yet in a slot."""
        with self._wake:
            return sum(job.count - job._admitted for job in self._waiting)

    def _note_drop(self) -> None:
        with self._wake:
            self._look_for_drops = True
            self._wake.notify()

    # ---- the loop ---------------------------------------------------------------------------
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
        """Ends every job in the engine with `error` and frees all slots (the thread keeps serving)."""
        for slot in range(self.active - 1, -1, -1):
            job, _ = self.slot_jobs[slot]
            self._release(slot)
            self._end(job, error)
        with self._wake:
            while self._waiting:
                self._end(self._waiting.popleft(), error)

    def step(self) -> bool:
        """One engine step (module docstring); False when there was nothing to do."""
        if self._look_for_drops:
            self._retire_dropped()
        self._admit()
        n = self.active
        if n == 0:
            return False
        positions = self.positions[:n]
        starting = np.flatnonzero(positions % self.spec.period == 0)
        if len(starting) == n:
            self._run("refresh", slice(0, n))
        elif len(starting):
            self._run("refresh", starting)
        pixel = self._run("step", slice(0, n))[PIXEL].cpu().numpy()  # (n, span, C)
        span = self.spec.span
        taken = positions[:, None] + np.arange(span)  # (n, span)
        self.pixels[np.arange(n)[:, None], :, taken] = pixel
        positions += span
        self.steps_run += 1
        ended_rows = np.flatnonzero(positions % self.spec.sample_shape[2] == 0)
        if len(ended_rows):
            self._finish_rows(ended_rows)
        return True

    def _run(self, graph: str, slots: slice | np.ndarray) -> dict[str, torch.Tensor]:
        """Runs `graph` on `slots` (a leading slice, or indices) and stores the states it returns."""
        signature, device = self.spec.graphs[graph], self.runner.device
        channels, height, width = self.spec.sample_shape
        rows = slots if isinstance(slots, slice) else torch.from_numpy(slots).to(device)
        feeds = {}
        for name in signature.inputs:
            if name in self.states:
                feeds[name] = self.states[name][rows]
                continue
            if name == "noise":  # the noise of the step's pixels, (n, span, C)
                picked = self.noise[slots]
                taken = self.positions[slots, None] + np.arange(self.spec.span)
                value = picked[np.arange(len(picked))[:, None], taken]
            elif name == "positions":
                value = self.positions[slots, None]
            elif name == "pixels":
                value = self.pixels[slots].reshape(-1, channels, height, width)
            else:  # temperature, labels
                value = getattr(self, name)[slots]
            feeds[name] = torch.from_numpy(np.ascontiguousarray(value)).to(device)
        outputs = self.runner.run(graph, feeds)
        for name in signature.outputs:
            if name.startswith(NEXT):
                state = self.states[name[len(NEXT):]]
                if isinstance(slots, slice):
                    state[slots].copy_(outputs[name])
                else:
                    state.index_copy_(0, rows, outputs[name].to(device))
        return outputs

    # ---- slots ------------------------------------------------------------------------------
    def _admit(self) -> None:
        if self.config.batching == "static" and self.active:
            return
        with self._wake:
            while self._waiting and self.active < self.config.num_slots:
                job = self._waiting[0]
                if job._cancel or self._expired(job):
                    self._waiting.popleft()
                    self._end(job, "cancelled" if job._cancel else "deadline exceeded")
                    continue
                take = min(job.count - job._admitted, self.config.num_slots - self.active)
                self._occupy(job, range(job._admitted, job._admitted + take))
                job._admitted += take
                if job._admitted == job.count:
                    self._waiting.popleft()

    def _occupy(self, job: SampleJob, ks: range) -> None:
        """Puts samples `ks` of `job` into the next free slots, with fresh (zero) caches."""
        first, last = self.active, self.active + len(ks)
        for state in self.states.values():
            state[first:last].zero_()
        self.positions[first:last] = 0
        self.pixels[first:last] = 0
        self.temperature[first:last] = job.temperature
        if job.labels is not None:
            self.labels[first:last, 0] = [job.labels[k] for k in ks]
        channels, height, width = self.spec.sample_shape
        noise = noise_for([(job.seed, job.indices[k]) for k in ks], (channels, height * width))  # (n, C, H*W)
        self.noise[first:last] = noise.transpose(1, 2).numpy()
        for slot, k in zip(range(first, last), ks):
            self.slot_jobs[slot] = (job, k)
        self.active = last

    def _finish_rows(self, slots: np.ndarray) -> None:
        """Copies each slot's just-completed row to its job; retires finished samples."""
        channels, height, width = self.spec.sample_shape
        finished, progressed = [], {}
        for slot, position in zip(slots.tolist(), self.positions[slots].tolist()):
            job, k = self.slot_jobs[slot]
            row = position // width - 1
            job.images[k, :, row] = self.pixels[slot, :, row * width : position]
            job.rows_done[k] = row + 1
            progressed[id(job)] = job
            if row + 1 == height:
                finished.append(slot)
        for job in progressed.values():
            if job.on_progress is not None:
                job.on_progress(job)
        for slot in sorted(finished, reverse=True):
            job, _ = self.slot_jobs[slot]
            self._release(slot)
            job._finished += 1
            if job._finished == job.count:
                self._end(job, None)

    def _retire_dropped(self) -> None:
        self._look_for_drops = False
        for slot in range(self.active - 1, -1, -1):
            job, _ = self.slot_jobs[slot]
            self._look_for_drops |= job.deadline is not None
            if job._cancel or self._expired(job):
                self._release(slot)
                if not job.done.is_set():
                    self._end(job, "cancelled" if job._cancel else "deadline exceeded")
        with self._wake:
            self._look_for_drops |= any(job._cancel or job.deadline is not None for job in self._waiting)

    def _release(self, slot: int) -> None:
        """Frees `slot`, moving the last active slot into its place to keep active slots packed."""
        last = self.active - 1
        if slot != last:
            for array in (*self.states.values(), self.positions, self.temperature, self.labels, self.noise,
                          self.pixels):
                array[slot] = array[last]
            self.slot_jobs[slot] = self.slot_jobs[last]
        self.slot_jobs[last] = None
        self.active = last

    @staticmethod
    def _expired(job: SampleJob) -> bool:
        return job.deadline is not None and time.monotonic() > job.deadline

    @staticmethod
    def _end(job: SampleJob, error: str | None) -> None:
        if job.done.is_set():
            return
        job.error = error
        job.finished_at = time.monotonic()
        job.done.set()
        if job.on_done is not None:
            job.on_done(job)
