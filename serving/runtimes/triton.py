"""The triton runtime: the same API, its entry points forwarded to a Triton Inference Server.

Each entry point is the Triton model of the same name (the repository genserve exported, served
by Triton), called over gRPC with `tritonclient.grpc.aio`. Requests larger than a model's
`max_batch_size` are split into chunks sent concurrently (Triton's own dynamic batcher merges
requests). Autoregressive sampling calls the `<model>_sample` Python model, which runs the same
sampling engine inside Triton; it answers once, so SampleStream sends no progress here, and a
cancelled request stops waiting but Triton finishes the batch it has started.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from ..artifacts import Manifest, dtype_of
from ..config import RuntimeConfig
from ..errors import DeadlineExceeded, InvalidArgument, Unavailable
from ..registry import ModelRegistry
from .base import ProgressCallback, Runtime, SampleBatch


class TritonRuntime(Runtime):
    def __init__(self, config: RuntimeConfig, max_message_bytes: int) -> None:
        self.config, self.max_message_bytes = config, max_message_bytes
        self.client = None
        self._names: list[str] = []
        self._ready: set[str] = set()

    async def start(self, registry: ModelRegistry) -> None:
        import tritonclient.grpc.aio as triton

        limit = self.max_message_bytes
        self.client = triton.InferenceServerClient(self.config.triton_url, channel_args=[
            ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            # After Triton restarts, reconnect within a second rather than gRPC's default backoff (up to 2 min).
            ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ])
        self._names = [m.triton_name for spec in registry.models.values() for m in spec.entry_points.values()]
        for name in self._names:
            if await self._call(self.client.is_model_ready(name, client_timeout=30)):
                self._ready.add(name)

    async def refresh(self) -> None:
        """Readiness from Triton's repository index: one call; Triton unreachable means nothing is ready."""
        try:
            index = await self.client.get_model_repository_index(client_timeout=2)
        except Exception:  # noqa: BLE001 - any failure to answer: no model can be served through it now
            self._ready.clear()
            return
        states = {(m.name, m.state) for m in index.models}
        self._ready = {name for name in self._names if (name, "READY") in states}

    async def _call(self, awaitable):
        """Awaits a tritonclient call, translating its exceptions to genserve's."""
        from tritonclient.utils import InferenceServerException

        try:
            return await awaitable
        except InferenceServerException as error:
            status = str(error.status() or "")
            if "DEADLINE_EXCEEDED" in status:
                raise DeadlineExceeded("deadline exceeded waiting for Triton") from error
            if "UNAVAILABLE" in status:
                raise Unavailable(f"Triton at {self.config.triton_url} is unavailable: {error.message()}") from error
            if "NOT_FOUND" in status or "unknown model" in error.message():  # unloaded in Triton meanwhile
                raise Unavailable(f"Triton at {self.config.triton_url} does not serve it now: {error.message()}"
                                  ) from error
            if "INVALID_ARGUMENT" in status:
                raise InvalidArgument("request", f"Triton refused it: {error.message()}") from error
            raise RuntimeError(f"Triton: {status} {error.message()}") from error

    async def _infer_chunk(self, entry: Manifest, feeds: dict[str, np.ndarray], deadline: float | None):
        import tritonclient.grpc.aio as triton

        inputs = []
        for name, array in feeds.items():
            tensor = triton.InferInput(name, list(array.shape), dtype_of(array).name)
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput(t.name) for t in entry.outputs]
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise DeadlineExceeded("deadline exceeded before the request reached Triton")
        result = await self._call(self.client.infer(entry.triton_name, inputs, outputs=outputs, client_timeout=timeout))
        return {t.name: result.as_numpy(t.name) for t in entry.outputs}

    async def infer(self, entry, feeds, deadline):
        rows = len(next(iter(feeds.values())))
        step = entry.batching.max_batch_size
        chunks = [{name: a[i : i + step] for name, a in feeds.items()} for i in range(0, rows, step)]
        results = await asyncio.gather(*(self._infer_chunk(entry, chunk, deadline) for chunk in chunks))
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}

    async def sample_sequential(self, sampler: Manifest, batch: SampleBatch, deadline: float | None,
                                on_progress: ProgressCallback | None) -> np.ndarray:
        n = len(batch.indices)
        feeds = {
            "seed": np.full((n, 1), batch.seed, dtype=np.int64),
            "index": np.asarray(batch.indices, dtype=np.int64).reshape(n, 1),
            "temperature": np.full((n, 1), batch.temperature, dtype=np.float32),
        }
        if batch.labels is not None:
            feeds["labels"] = np.asarray(batch.labels, dtype=np.int64).reshape(n, 1)
        return (await self.infer(sampler, feeds, deadline))["images"]

    def ready(self, entry: Manifest) -> bool:
        return entry.triton_name in self._ready

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
