"""A sampling request inside the engine: what was asked, the images as they fill in, and how it ended."""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class JobStatus(enum.Enum):
    WAITING = "waiting"  # some samples not yet in a slot
    RUNNING = "running"  # every sample admitted, some unfinished
    FINISHED = "finished"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline exceeded"
    FAILED = "failed"  # the engine could not run it (`error` says why)

    @property
    def ended(self) -> bool:
        return self not in (JobStatus.WAITING, JobStatus.RUNNING)


@dataclass(eq=False)
class SampleJob:
    """One request's samples. Created by `SamplingEngine.submit`; read by the caller, written by the engine thread."""

    seed: int
    indices: tuple[int, ...]  # sample indices within the seed: each keys its own noise
    temperature: float
    labels: tuple[int, ...] | None
    latents: np.ndarray | None  # (count, *latent shape) float32: each sample's z, for programs that take latents
    # (count, C, H, W) uint8: each sample's image once it finishes; with on_progress, row r of sample
    # k is final once rows_done[k] > r (without, rows are not copied out as they complete)
    images: np.ndarray
    rows_done: np.ndarray  # (count,) rows completed per sample
    deadline: float | None = None  # time.monotonic() after which the job is dropped
    on_progress: Callable[[SampleJob], None] | None = None  # engine thread: after a step that finished rows
    on_done: Callable[[SampleJob], None] | None = None  # engine thread: once the job ends, however it ends
    cancelled: Callable[[], bool] | None = None  # asked at every step; True drops the job (a caller gone elsewhere)
    status: JobStatus = JobStatus.WAITING
    error: str | None = None  # why it did not finish: the status's text, or the failure
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

    @property
    def unadmitted(self) -> range:
        """The sample numbers k not yet given a slot."""
        return range(self._admitted, self.count)

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

    @property
    def watched(self) -> bool:
        """Whether the engine must look at this job every step (a deadline, or a cancellation predicate)."""
        return self.deadline is not None or self.cancelled is not None

    def dropped(self, now: float) -> JobStatus | None:
        """CANCELLED or DEADLINE_EXCEEDED when the job should leave the engine now, else None."""
        if self._cancel or (self.cancelled is not None and self.cancelled()):
            return JobStatus.CANCELLED
        if self.deadline is not None and now > self.deadline:
            return JobStatus.DEADLINE_EXCEEDED
        return None

    def end(self, status: JobStatus, error: str | None = None) -> None:
        """Records how the job ended and tells its waiters (once; later calls do nothing)."""
        if self.done.is_set():
            return
        self.status = status
        self.error = error if error is not None else (None if status is JobStatus.FINISHED else status.value)
        self.finished_at = time.monotonic()
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)
