"""A dynamic batcher: concurrent requests for one entry point merged into few runs.

Triton's dynamic batcher, in asyncio: a request waits at most `max_queue_delay` for others to
join it; a batch closes early once it holds `max_batch_size` rows. Batches of one entry point
run one at a time on a worker thread (the event loop never blocks), so requests arriving while
a batch runs form the next one: under load, batches fill by themselves. A request larger than
`max_batch_size` runs alone. Requests cancelled or past their deadline before their batch
starts are dropped without running; a full queue refuses new requests (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .errors import DeadlineExceeded, ResourceExhausted

Feeds = dict[str, np.ndarray]
RunMerged = Callable[[list[Feeds]], list[Feeds]]  # many requests' feeds → their outputs, in order


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int  # rows
    max_queue_delay_s: float
    max_queued_rows: int


@dataclass(eq=False)
class _Pending:
    feeds: Feeds
    rows: int
    deadline: float | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Batches requests for one entry point; `run_merged` does the work on a worker thread.

    Args:
        name: the entry point's name (metrics label, thread name).
        run_merged: runs a list of requests' feeds, returns their outputs in the same order.
        policy: batch size, queue delay and queue bound.
        observe: called with (queue seconds, batch rows) per batch, for metrics.
    """

    def __init__(self, name: str, run_merged: RunMerged, policy: BatchPolicy,
                 observe: Callable[[list[float], int], None] | None = None) -> None:
        self.name, self.run_merged, self.policy, self.observe = name, run_merged, policy, observe
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"genserve-batch-{name}")
        self._task: asyncio.Task | None = None
        self.batches_run = 0

    async def submit(self, feeds: Feeds, deadline: float | None = None) -> Feeds:
        """Queues one request (every feed has the same leading batch axis); returns its outputs."""
        rows = len(next(iter(feeds.values())))
        if self._queued_rows + rows > self.policy.max_queued_rows:
            raise ResourceExhausted(
                f"the queue of {self.name} is full ({self._queued_rows} rows waiting, limit "
                f"{self.policy.max_queued_rows}); retry later"
            )
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")
        pending = _Pending(feeds, rows, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued_rows += rows
        self._arrived.set()
        # A cancelled caller cancels its future: the loop then skips it if its batch has not started.
        return await pending.future

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._gather()
            batch = self._take()
            if batch:
                await self._run(batch)

    async def _gather(self) -> None:
        """Waits until the queue holds a full batch or the oldest request has waited max_queue_delay."""
        close_at = self._queue[0].enqueued + self.policy.max_queue_delay_s
        while self._queued_rows < self.policy.max_batch_size:
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:  # noqa: UP041 - distinct from TimeoutError before 3.11
                return

    def _take(self) -> list[_Pending]:
        """Pops up to max_batch_size rows of live requests (always at least one request)."""
        batch, rows, now = [], 0, time.monotonic()
        while self._queue and (not batch or rows + self._queue[0].rows <= self.policy.max_batch_size):
            pending = self._queue.popleft()
            self._queued_rows -= pending.rows
            if pending.future.done():  # cancelled by its caller
                continue
            if pending.deadline is not None and now > pending.deadline:
                pending.future.set_exception(DeadlineExceeded("deadline exceeded while queued; nothing was run"))
                continue
            batch.append(pending)
            rows += pending.rows
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        if self.observe is not None:
            self.observe([started - p.enqueued for p in batch], sum(p.rows for p in batch))
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self.run_merged, [p.feeds for p in batch])
        except Exception as error:  # noqa: BLE001 - the batch's requests share the failure
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        self.batches_run += 1
        for p, out in zip(batch, outputs):
            if not p.future.done():
                p.future.set_result(out)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)
