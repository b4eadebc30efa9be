"""What admission alone can gain: the engine's schedulers replayed on a request trace in simulated time.

Continuous batching shortens a request's wait for a slot; it does not shorten its own sample,
which takes the same calls either way. So on a trace of equal-length samples its gain has a
ceiling, set by the trace, the slots and the calls per sample: this module finds it by running
the engine's own schedulers (scheduler.py) on the trace with every call costing `call_seconds`
whatever the occupancy, which is a GPU's case at these slot counts (a CPU's call grows with the
occupancy, which narrows the gap further). `genserve bench-sampler` prints it beside the
measured ratio.

Continuous admission here happens at every call boundary, the earliest the engine can admit;
requests are served first come first served, their samples split over free slots as the
schedulers split them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .scheduler import ContinuousScheduler, Scheduler, StaticScheduler


@dataclass
class _Request:
    """The part of a job the schedulers read (`unadmitted`), and its bookkeeping here."""

    arrival: float
    count: int
    admitted: int = 0
    unfinished: int = 0
    finished_at: float = 0.0

    @property
    def unadmitted(self) -> range:
        return range(self.admitted, self.count)


@dataclass(frozen=True)
class ModelledBatching:
    batching: str
    p50_ms: float
    p99_ms: float


def request_latencies(scheduler: Scheduler, arrivals: Sequence[tuple[float, int]], slots: int,
                      calls_per_sample: int, call_seconds: float) -> list[float]:
    """Seconds from each request's arrival to its last sample's end, in arrival order.

    `arrivals`: (offset seconds, samples) per request, offsets ascending. A call starts when the
    previous one ends, or when a request arrives at an idle engine; samples admitted before a call
    step in it; a sample ends after `calls_per_sample` calls."""
    if slots < 1 or calls_per_sample < 1 or not call_seconds > 0:
        raise ValueError(f"slots, calls_per_sample and call_seconds must be positive, got {slots}, "
                         f"{calls_per_sample}, {call_seconds}")
    requests = [_Request(offset, count) for offset, count in arrivals]
    calls_left: list[tuple[_Request, int]] = []  # (request, calls its sample still needs) per busy slot
    waiting: list[_Request] = []
    now, arrived = 0.0, 0
    while arrived < len(requests) or waiting or calls_left:
        if not calls_left and not waiting:  # idle until the next arrival
            now = max(now, requests[arrived].arrival)
        while arrived < len(requests) and requests[arrived].arrival <= now:
            waiting.append(requests[arrived])
            arrived += 1
        for admission in scheduler.plan(waiting, len(calls_left), slots).admit:
            request = admission.job
            request.admitted += len(admission.samples)
            request.unfinished += len(admission.samples)
            calls_left += [(request, calls_per_sample)] * len(admission.samples)
        waiting = [r for r in waiting if r.unadmitted]
        now += call_seconds  # both schedulers admit into an idle engine: a call always has samples
        stepped = [(request, left - 1) for request, left in calls_left]
        calls_left = [(request, left) for request, left in stepped if left]
        for request, left in stepped:
            if not left:
                request.unfinished -= 1
                if not request.unfinished and not request.unadmitted:
                    request.finished_at = now
    return [r.finished_at - r.arrival for r in requests]


def modelled_batching(arrivals: Sequence[tuple[float, int]], slots: int, calls_per_sample: int,
                      call_seconds: float) -> list[ModelledBatching]:
    """Static and continuous latency percentiles of the trace, as `request_latencies` models them."""
    rows = []
    for batching, scheduler in (("static", StaticScheduler()), ("continuous", ContinuousScheduler())):
        ms = np.array(request_latencies(scheduler, arrivals, slots, calls_per_sample, call_seconds)) * 1e3
        rows.append(ModelledBatching(batching, round(float(np.percentile(ms, 50)), 1),
                                     round(float(np.percentile(ms, 99)), 1)))
    return rows
