"""The dynamic batcher on its own: merging, limits, cancellation, deadlines, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from genserve.serving.batcher import BatchPolicy, DynamicBatcher
from genserve.serving.errors import DeadlineExceeded, ResourceExhausted


class Recorder:
    """A run_merged that doubles its input and records the batches it saw."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.batches: list[list[int]] = []  # rows per request, per batch
        self.gate, self.fail = gate, fail

    def __call__(self, requests):
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append([len(r["x"]) for r in requests])
        if self.fail:
            raise RuntimeError("the model broke")
        merged = np.concatenate([r["x"] for r in requests]) * 2
        out, start = [], 0
        for r in requests:
            out.append({"y": merged[start : start + len(r["x"])]})
            start += len(r["x"])
        return out


def policy(size=8, delay=0.05, queued=100) -> BatchPolicy:
    return BatchPolicy(max_batch_size=size, max_queue_delay_s=delay, max_queued_rows=queued)


def rows(n: int, start: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + n, dtype=np.float32).reshape(n, 1)}


async def _close(batcher):
    await batcher.close()


def test_concurrent_requests_merge_and_each_gets_its_own_rows():
    async def main():
        run = Recorder()
        batcher = DynamicBatcher("m", run, policy(size=8, delay=1.0))
        results = await asyncio.gather(*(batcher.submit(rows(2, 10 * k)) for k in range(4)))
        await _close(batcher)
        return run, results

    run, results = asyncio.run(main())
    assert run.batches == [[2, 2, 2, 2]]  # full at 8 rows: closed before the 1 s delay
    for k, out in enumerate(results):
        np.testing.assert_array_equal(out["y"], rows(2, 10 * k)["x"] * 2)


def test_batches_never_exceed_the_maximum_but_a_big_request_runs_alone():
    async def main():
        run = Recorder()
        batcher = DynamicBatcher("m", run, policy(size=4, delay=0.2))
        await asyncio.gather(*(batcher.submit(rows(n)) for n in (3, 3, 6, 1)))
        await _close(batcher)
        return run

    # All four are queued before the batch loop first runs: 3+3 > 4, so each 3 goes alone; the 6 is
    # over the maximum on its own and runs alone; the 1 is left.
    assert asyncio.run(main()).batches == [[3], [3], [6], [1]]


def test_a_lone_request_runs_without_a_full_batch():
    async def main():
        run = Recorder()
        batcher = DynamicBatcher("m", run, policy(size=8, delay=0.05))
        out = await asyncio.wait_for(batcher.submit(rows(1)), 60)  # the guard only stops a hang
        await _close(batcher)
        return run, out

    run, out = asyncio.run(main())
    assert run.batches == [[1]]  # the delay ran out and the 1-row batch ran, though 8 rows were allowed
    np.testing.assert_array_equal(out["y"], rows(1)["x"] * 2)


def test_a_full_queue_refuses_with_resource_exhausted():
    async def main():
        gate = threading.Event()
        batcher = DynamicBatcher("m", Recorder(gate), policy(size=1, delay=0, queued=4))
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.05)  # the first request is running (held at the gate); the queue is empty
        queued = [asyncio.ensure_future(batcher.submit(rows(2))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="queue of m is full"):
            await batcher.submit(rows(1))
        gate.set()
        await asyncio.gather(first, *queued)
        await _close(batcher)

    asyncio.run(main())


def test_cancelled_and_expired_requests_are_dropped_before_they_run():
    async def main():
        gate = threading.Event()
        run = Recorder(gate)
        batcher = DynamicBatcher("m", run, policy(size=8, delay=0))
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.05)  # running, held at the gate
        cancelled = asyncio.ensure_future(batcher.submit(rows(2)))
        expired = asyncio.ensure_future(batcher.submit(rows(3), deadline=time.monotonic() + 0.01))
        kept = asyncio.ensure_future(batcher.submit(rows(4)))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        gate.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await expired
        await kept
        await _close(batcher)
        return run, cancelled

    run, cancelled = asyncio.run(main())
    assert cancelled.cancelled()
    assert run.batches == [[1], [4]]  # neither the cancelled nor the expired request ran


def test_a_failing_batch_fails_its_requests_and_the_batcher_keeps_going():
    async def main():
        run = Recorder(fail=True)
        batcher = DynamicBatcher("m", run, policy(size=8, delay=0.01))
        with pytest.raises(RuntimeError, match="the model broke"):
            await batcher.submit(rows(1))
        run.fail = False
        out = await batcher.submit(rows(2))
        await _close(batcher)
        return out

    np.testing.assert_array_equal(asyncio.run(main())["y"], rows(2)["x"] * 2)


def test_metrics_observer_sees_queue_times_and_batch_rows():
    seen = []

    async def main():
        batcher = DynamicBatcher("m", Recorder(), policy(size=6, delay=1.0), observe=lambda w, r: seen.append((w, r)))
        await asyncio.gather(*(batcher.submit(rows(3)) for _ in range(2)))
        await _close(batcher)

    asyncio.run(main())
    assert [r for _, r in seen] == [6] and len(seen[0][0]) == 2 and all(w >= 0 for w in seen[0][0])
