"""The batching model (serving/engine/batching_model): the engine's schedulers on a trace in simulated time.

Expected latencies are worked out by hand on traces small enough to follow call by call; calls cost
one second, samples take three calls.
"""

from __future__ import annotations

import pytest

from genserve.serving.engine.batching_model import modelled_batching, request_latencies
from genserve.serving.engine.scheduler import ContinuousScheduler, StaticScheduler

CALLS = 3  # calls per sample


def latencies(scheduler, arrivals, slots=4):
    return request_latencies(scheduler, arrivals, slots, CALLS, call_seconds=1.0)


@pytest.mark.parametrize("scheduler", [StaticScheduler(), ContinuousScheduler()])
def test_a_request_alone_takes_its_samples_calls_and_an_idle_engine_starts_at_the_arrival(scheduler):
    assert latencies(scheduler, [(0.0, 2)]) == [3.0]
    assert latencies(scheduler, [(0.0, 1), (10.0, 1)]) == [3.0, 3.0]  # the second finds the engine idle


def test_a_request_arriving_mid_batch_waits_for_the_batch_or_for_the_next_call():
    arrivals = [(0.0, 1), (0.5, 1)]
    # Static: the second starts when the first ends (t = 3), ends at 6. Continuous: it joins at t = 1, ends at 4.
    assert latencies(StaticScheduler(), arrivals) == [3.0, 5.5]
    assert latencies(ContinuousScheduler(), arrivals) == [3.0, 3.5]


@pytest.mark.parametrize("scheduler", [StaticScheduler(), ContinuousScheduler()])
def test_samples_beyond_the_free_slots_wait_for_a_slot(scheduler):
    assert latencies(scheduler, [(0.0, 3)], slots=2) == [6.0]  # two run 0..3, the third 3..6


def test_continuous_admission_splits_a_request_over_the_slots_as_they_free():
    arrivals = [(0.0, 1), (0.5, 2)]
    # Two slots. Continuous: one of the second request's samples joins at t = 1 (ends 4), the other takes
    # the first request's slot at t = 3 (ends 6). Static: both start at t = 3.
    assert latencies(ContinuousScheduler(), arrivals, slots=2) == [3.0, 5.5]
    assert latencies(StaticScheduler(), arrivals, slots=2) == [3.0, 5.5]
    # With a slot for each, continuous has both join at t = 1.
    assert latencies(ContinuousScheduler(), arrivals, slots=3) == [3.0, 3.5]


def test_the_percentiles_of_both_policies_in_milliseconds():
    static, continuous = modelled_batching([(0.0, 1), (0.5, 1)], slots=4, calls_per_sample=CALLS, call_seconds=1.0)
    assert (static.batching, static.p50_ms, static.p99_ms) == ("static", 4250.0, 5475.0)  # of 3 and 5.5 s
    assert (continuous.batching, continuous.p50_ms, continuous.p99_ms) == ("continuous", 3250.0, 3495.0)


def test_nonsense_sizes_are_refused():
    with pytest.raises(ValueError, match="must be positive"):
        request_latencies(StaticScheduler(), [(0.0, 1)], 0, CALLS, 1.0)
