"""The triton runtime: the same API, its entry points forwarded to a Triton Inference Server.

Each entry point is the Triton model of the same name (the repository genserve exported, served
by Triton), called over gRPC with `tritonclient.grpc.aio`. Requests larger than a model's
`max_batch_size` are split into chunks sent concurrently (Triton's own dynamic batcher merges
requests). Autoregressive sampling streams from the `<model>_sample` Python model (decoupled),
which runs the same sampling engine inside Triton across requests: its progress responses become
SampleStream's progress, and cancelling the call cancels the stream, which frees the samples'
engine slots inside Triton at the next step.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from ..artifacts import Manifest, dtype_of
from ..config import RuntimeConfig
from ..errors import DeadlineExceeded, InvalidArgument, Unavailable
from ..registry import ModelRegistry
from ..sampler_rows import PROGRESS_OUTPUT, PROGRESS_PARAMETER
from .base import Progress, ProgressCallback, Runtime, SampleBatch


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

    def _translated(self, error) -> Exception:
        """genserve's exception for a tritonclient one."""
        status = str(error.status() or "")
        if "DEADLINE_EXCEEDED" in status:
            return DeadlineExceeded("deadline exceeded waiting for Triton")
        if "UNAVAILABLE" in status:
            return Unavailable(f"Triton at {self.config.triton_url} is unavailable: {error.message()}")
        if "NOT_FOUND" in status or "unknown model" in error.message():  # unloaded in Triton meanwhile
            return Unavailable(f"Triton at {self.config.triton_url} does not serve it now: {error.message()}")
        if "INVALID_ARGUMENT" in status:
            return InvalidArgument("request", f"Triton refused it: {error.message()}")
        return RuntimeError(f"Triton: {status} {error.message()}")

    async def _call(self, awaitable):
        """Awaits a tritonclient call, translating its exceptions to genserve's."""
        from tritonclient.utils import InferenceServerException

        try:
            return await awaitable
        except InferenceServerException as error:
            raise self._translated(error) from error

    @staticmethod
    def _timeout(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the request reached Triton")
        return timeout

    @staticmethod
    def _inputs(feeds: dict[str, np.ndarray]) -> list:
        import tritonclient.grpc.aio as triton

        inputs = []
        for name, array in feeds.items():
            tensor = triton.InferInput(name, list(array.shape), dtype_of(array).name)
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(tensor)
        return inputs

    async def _infer_chunk(self, entry: Manifest, feeds: dict[str, np.ndarray], deadline: float | None):
        import tritonclient.grpc.aio as triton

        outputs = [triton.InferRequestedOutput(t.name) for t in entry.outputs]
        result = await self._call(self.client.infer(entry.triton_name, self._inputs(feeds), outputs=outputs,
                                                    client_timeout=self._timeout(deadline)))
        return {t.name: result.as_numpy(t.name) for t in entry.outputs}

    async def infer(self, entry, feeds, deadline):
        rows = len(next(iter(feeds.values())))
        step = entry.batching.max_batch_size
        chunks = [{name: a[i : i + step] for name, a in feeds.items()} for i in range(0, rows, step)]
        results = await asyncio.gather(*(self._infer_chunk(entry, chunk, deadline) for chunk in chunks))
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}

    async def sample_sequential(self, sampler: Manifest, batch: SampleBatch, deadline: float | None,
                                on_progress: ProgressCallback | None) -> np.ndarray:
        import grpc
        from tritonclient.utils import InferenceServerException

        n = len(batch.indices)
        feeds = {
            "seed": np.full((n, 1), batch.seed, dtype=np.int64),
            "index": np.asarray(batch.indices, dtype=np.int64).reshape(n, 1),
            "temperature": np.full((n, 1), batch.temperature, dtype=np.float32),
        }
        if batch.labels is not None:
            feeds["labels"] = np.asarray(batch.labels, dtype=np.int64).reshape(n, 1)
        if batch.latents is not None:
            feeds["latents"] = np.asarray(batch.latents, dtype=np.float32)
        step = sampler.batching.max_batch_size  # one stream request per chunk Triton accepts
        chunks = {str(k): slice(start, start + step) for k, start in enumerate(range(0, n, step))}
        images = np.zeros((n, *sampler.outputs[0].shape), dtype=np.uint8)
        rows_done = np.zeros(n, dtype=np.int64)
        answered = asyncio.Event()

        async def requests():
            for key, rows in chunks.items():
                chunk = {name: a[rows] for name, a in feeds.items()}
                # Without a progress callback only the final response is of use: the sampler then
                # sends no partial images.
                yield {"model_name": sampler.triton_name, "inputs": self._inputs(chunk), "request_id": key,
                       "parameters": {PROGRESS_PARAMETER: on_progress is not None}}
            await answered.wait()  # the stream stays open until every final response is in

        stream = self.client.stream_infer(requests(), stream_timeout=self._timeout(deadline))
        waiting = set(chunks)
        try:
            async for result, error in stream:
                if error is not None:
                    raise self._translated(error)
                response = result.get_response()
                rows = chunks[response.id]
                images[rows] = result.as_numpy("images")
                rows_done[rows] = result.as_numpy(PROGRESS_OUTPUT)[:, 0]
                if response.parameters["triton_final_response"].bool_param:
                    waiting.discard(response.id)
                if on_progress is not None:
                    on_progress(Progress(rows_done.copy(), images.copy()))
                if not waiting:
                    return images
        except grpc.aio.AioRpcError as error:
            raise self._translated(InferenceServerException(error.details(), str(error.code()))) from error
        finally:
            answered.set()
            stream.cancel()  # a caller that went away (or an error) cancels the samples inside Triton
        raise Unavailable(f"Triton at {self.config.triton_url} ended the stream before the samples were done")

    def ready(self, entry: Manifest) -> bool:
        return entry.triton_name in self._ready

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
