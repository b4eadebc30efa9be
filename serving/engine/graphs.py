"""A fused row call replayed from a CUDA graph, one graph per slot count.

At small batch sizes launching is a large part of a row call on a GPU: the operator's Python
checks and its kernel launches, during which the GPU waits. Captured once as a CUDA graph, a row
costs one replay (on an H200 at batch 1, a Gated PixelCNN row call took 1270 µs launched and
975 µs replayed, its kernels 971 µs).

Occupancy changes only when samples join or finish, and an engine always passes the same
state views for the same slot count (leading slices of its own tensors), so one graph per
slot count replays on exactly the tensors it was captured on. The controls (pixels,
positions, noise, ...) are copied into the graph's own input tensors before each replay, or,
where the caller passes the same control tensors every time too (`copy_inputs=False`: the
engine's mirrored rows, runner.py), the graph is captured on them and replays with nothing copied.
Each engine has its own graphs (runner.py), captured when it is made: a capture while
samples are in flight would stall them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

log = logging.getLogger("genserve.engine")

RowCall = Callable[[Mapping[str, torch.Tensor | None], list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class CapturedRow:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor | None]  # the graph's own copies of the controls (or the controls)
    states: list[torch.Tensor]  # held so that their memory cannot pass to other tensors
    pixel: torch.Tensor  # the graph's output, rewritten by every replay


class RowGraphs:
    """Runs `call(feeds, states)` through a CUDA graph per slot count up to `max_slots`, eagerly above."""

    def __init__(self, call: RowCall, max_slots: int, copy_inputs: bool = True) -> None:
        """`copy_inputs=False`: every call passes the same control tensors for a slot count (and `call`
        touches nothing else but the states), so graphs are captured on them and nothing is copied."""
        self.call, self.max_slots, self.copy_inputs = call, max_slots, copy_inputs
        # One memory pool for every graph: they replay one at a time on one stream, and the only
        # memory a graph leaves in use is its `pixel`, read before the next replay.
        self.pool = torch.cuda.graph_pool_handle()
        self.captured: dict[tuple[int, ...], CapturedRow] = {}
        self.failed: str | None = None  # why capture failed once; then every call runs eagerly

    def __call__(self, feeds: Mapping[str, torch.Tensor | None], states: list[torch.Tensor]) -> torch.Tensor:
        """The row call's `pixel`: a tensor that the next call may overwrite, so read it first."""
        row = self.prepare(feeds, states)
        if row is None:
            return self.call(feeds, states)
        if self.copy_inputs:
            for name, tensor in row.inputs.items():
                if tensor is not None:
                    tensor.copy_(feeds[name])
        row.graph.replay()
        return row.pixel

    def prepare(self, feeds: Mapping[str, torch.Tensor | None], states: list[torch.Tensor]) -> CapturedRow | None:
        """The graph of a call on these states, captured now if it has not been; None: the call runs eagerly
        (more than `max_slots` slots, or a capture has failed)."""
        n = feeds["positions"].shape[0]
        if n > self.max_slots or self.failed:
            return None
        key = (n, *(state.data_ptr() for state in states))
        if not self.copy_inputs:  # captured on the controls themselves
            key += tuple(tensor.data_ptr() for tensor in feeds.values() if tensor is not None)
        row = self.captured.get(key)
        if row is None:
            try:
                row = self.captured[key] = self._capture(feeds, states)
            except RuntimeError as error:
                self.failed = f"{type(error).__name__}: {error}"
                log.warning("CUDA graph capture of the row call failed; launching it eagerly from now on (%s)",
                            self.failed)
        return row

    def _capture(self, feeds, states) -> CapturedRow:
        copies = {name: None if tensor is None else tensor.clone() for name, tensor in feeds.items()}
        inputs = copies if self.copy_inputs else dict(feeds)
        # One call outside the capture, so that any kernel this slot count needs is compiled first (a
        # compiler cannot run inside a capture), on copies of the states and controls: a row call updates
        # its states (and a device row its controls).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.call(copies, [state.clone() for state in states])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Records the kernels, runs nothing. Thread-local: CUDA work of the server's other threads (other
        # models, encode and score calls) goes on meanwhile rather than failing the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            pixel = self.call(inputs, states)
        return CapturedRow(graph, inputs, list(states), pixel)
