"""Admission policy: which waiting samples take which free slots before a step.

A scheduler looks at the queue and the free slots and returns a `StepPlan`; it never touches
slot state (the runner's) or jobs' outcomes (the engine's). Two policies:
- continuous: fill every free slot at every step (new samples join a running batch);
- static: admit only into an empty engine and run that batch to completion (the baseline).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from .jobs import SampleJob


@dataclass(frozen=True)
class Admission:
    job: SampleJob
    samples: range  # the job's sample numbers k, in order, that get the next free slots


@dataclass(frozen=True)
class StepPlan:
    """What the next step does before it runs: the samples admitted into free slots."""

    admit: tuple[Admission, ...] = ()

    @property
    def admitted(self) -> int:
        return sum(len(a.samples) for a in self.admit)


class Scheduler(ABC):
    @abstractmethod
    def plan(self, waiting: Iterable[SampleJob], active: int, num_slots: int) -> StepPlan:
        """The admissions for the next step; `waiting` holds live jobs in arrival order."""

    @abstractmethod
    def joins_running_batch(self, active: int, num_slots: int) -> bool:
        """Whether a waiting sample would join the `active` running samples at the next step."""


class ContinuousScheduler(Scheduler):
    """Every free slot is filled at every step, first come first served."""

    def plan(self, waiting, active, num_slots):
        admit, free = [], num_slots - active
        for job in waiting:
            if free == 0:
                break
            samples = job.unadmitted[:free]
            admit.append(Admission(job, samples))
            free -= len(samples)
        return StepPlan(tuple(admit))

    def joins_running_batch(self, active, num_slots):
        return active < num_slots


class StaticScheduler(ContinuousScheduler):
    """Admits only into an empty engine: each batch runs to completion before the next starts."""

    def plan(self, waiting, active, num_slots):
        return super().plan(waiting, active, num_slots) if active == 0 else StepPlan()

    def joins_running_batch(self, active, num_slots):
        return False


SCHEDULERS: dict[str, type[Scheduler]] = {"continuous": ContinuousScheduler, "static": StaticScheduler}
