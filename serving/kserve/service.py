"""The KServe v2 inference protocol (`inference.GRPCInferenceService`, what Triton speaks) over genserve's runtime.

Served on genserve's own port beside genserve.v1, with the Triton repository's model names,
tensors and semantics, so a client written for Triton (tritonclient, KServe) works unchanged:
- every entry point (`vae_mnist_encode`, ...) answers ModelInfer through the runtime (the embedded
  runtime's dynamic batchers, or the Triton server behind genserve);
- every sampler (`<model>_sample`) is decoupled, as in the Triton repository: ModelStreamInfer
  streams its progress (one response each time all the request's samples have another row done)
  and ends with the finished images, flagged `triton_final_response` (the request parameter
  `progress: false` asks for that final response only); ModelInfer refuses it as
  Triton does. Samples run in genserve's engine, so stream requests join running ones at every
  step, and a cancelled stream frees its samples' slots.
Refusals use Triton's wording and codes (INVALID_ARGUMENT, NOT_FOUND for unknown models); limits
and full queues answer RESOURCE_EXHAUSTED as genserve.v1 does. ModelStatistics, shared memory,
tracing and repository load/unload are not served (UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
from importlib.metadata import version as package_version

import grpc
import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as v2

from ..artifacts import Manifest
from ..errors import NotFound, RequestError
from ..limits import check_free_axes
from ..metrics import ServerMetrics
from ..registry import ModelRegistry
from ..runtimes.base import Progress, Runtime
from ..sampler_rows import PROGRESS_PARAMETER, RequestProgress, check_sampler_feeds, sample_batches, wants_progress
from ..service import RpcCall, deadline_of, model_label, parsed, unary
from .tensors import infer_response, request_feeds, request_parameter, tensor_metadata

SERVICE = "GRPCInferenceService"
SERVICE_NAME = v2.DESCRIPTOR.services_by_name[SERVICE].full_name  # "inference.GRPCInferenceService"
PLATFORMS = {"python": "python", "onnxruntime": "onnxruntime_onnx", "pytorch": "pytorch_libtorch"}


class Unimplemented(RequestError):
    code = grpc.StatusCode.UNIMPLEMENTED


class KServeService:
    """The v2 RPCs (module docstring); one instance per server, over the server's registry and runtime."""

    def __init__(self, registry: ModelRegistry, runtime: Runtime, metrics: ServerMetrics) -> None:
        self.registry, self.runtime, self.metrics = registry, runtime, metrics
        self.entries: dict[str, Manifest] = {
            m.triton_name: m for spec in registry.models.values() for m in spec.entry_points.values()
        }
        self.configs = {name: text_format.Parse((m.folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
                        for name, m in self.entries.items()}

    def _entry(self, name: str, version: str = "") -> Manifest:
        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"Request for unknown model: '{name}' is not found")
        if version and version not in {str(v) for v in entry.versions}:
            raise NotFound(f"Request for unknown model: '{name}' version {version} is not found")
        return entry

    def _ready(self, name: str, version: str = "") -> bool:
        try:
            return self.runtime.ready(self._entry(name, version))
        except NotFound:
            return False

    # ---- health and metadata ----------------------------------------------------------------
    @unary
    async def ServerLive(self, request, context):
        return v2.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request, context):
        return v2.ServerReadyResponse(ready=all(self.runtime.ready(m) for m in self.entries.values()))

    @unary
    async def ModelReady(self, request, context):
        return v2.ModelReadyResponse(ready=self._ready(request.name, request.version))

    @unary
    async def ServerMetadata(self, request, context):
        return v2.ServerMetadataResponse(name="genserve", version=package_version("genserve"),
                                         extensions=["model_configuration", "model_repository(index)"])

    @unary
    async def ModelMetadata(self, request, context):
        entry = self._entry(request.name, request.version)
        return v2.ModelMetadataResponse(
            name=entry.triton_name, versions=[str(v) for v in entry.versions],
            platform=PLATFORMS.get(self.configs[entry.triton_name].backend, ""),
            inputs=[tensor_metadata(t) for t in entry.inputs], outputs=[tensor_metadata(t) for t in entry.outputs],
        )

    @unary
    async def ModelConfig(self, request, context):
        entry = self._entry(request.name, request.version)
        return v2.ModelConfigResponse(config=self.configs[entry.triton_name])

    @unary
    async def RepositoryIndex(self, request, context):
        index = v2.RepositoryIndexResponse()
        for name, entry in sorted(self.entries.items()):
            ready = self.runtime.ready(entry)
            if request.ready and not ready:
                continue
            index.models.add(name=name, version=str(entry.versions[-1]), state="READY" if ready else "UNAVAILABLE")
        return index

    # ---- inference --------------------------------------------------------------------------
    def _checked(self, entry: Manifest, request: v2.ModelInferRequest) -> dict[str, np.ndarray]:
        feeds = request_feeds(request, entry)
        if entry.step is not None:
            check_sampler_feeds(feeds, self.registry.get(entry.model).num_classes)
        else:
            check_free_axes(entry.inputs, feeds)
        return feeds

    @unary
    async def ModelInfer(self, request, context):
        entry = self._entry(request.model_name, request.model_version)
        if entry.step is not None:
            raise Unimplemented("ModelInfer RPC doesn't support models with decoupled transaction policy")
        outputs = await self.runtime.infer(entry, self._checked(entry, request), deadline_of(context))
        return infer_response(request, entry, outputs)

    def metrics_label(self, request) -> str:
        """The served model's name for an entry point's request (bounded, as genserve.v1's labels are)."""
        name = getattr(request, "model_name", "")
        return model_label(self.registry, self.entries[name].model if name in self.entries else name)

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request on the stream runs as its own task; responses go out as they are ready, tagged by id."""
        responses: asyncio.Queue[v2.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(self._stream_one(request, responses.put_nowait))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:  # the client half-closed: finish what it asked for, then end the stream
                    await asyncio.wait(set(tasks))
            finally:
                responses.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (message := await responses.get()) is not None:
                yield message
        finally:  # the client cancelled the stream (or it ended): stop every request's work
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_one(self, request, send) -> None:
        call = RpcCall(self.metrics, "ModelStreamInfer", self.metrics_label(request))
        try:
            request = parsed(request)
            entry = self._entry(request.model_name, request.model_version)
            feeds = self._checked(entry, request)
            if entry.step is None:
                outputs = await self.runtime.infer(entry, feeds, None)
                send(v2.ModelStreamInferResponse(infer_response=infer_response(request, entry, outputs, final=True)))
                return
            streams = wants_progress(request_parameter(request, PROGRESS_PARAMETER))
            outputs = await self._sample(entry, feeds, (lambda partial: send(v2.ModelStreamInferResponse(
                infer_response=infer_response(request, entry, partial, final=False)))) if streams else None)
            send(v2.ModelStreamInferResponse(infer_response=infer_response(request, entry, outputs, final=True)))
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:  # noqa: BLE001 - this request's error; the stream goes on
            send(v2.ModelStreamInferResponse(error_message=call.failed(error), infer_response=v2.ModelInferResponse(
                model_name=getattr(request, "model_name", ""), id=getattr(request, "id", ""))))
        finally:
            call.end()

    async def _sample(self, entry: Manifest, feeds: dict[str, np.ndarray], send_partial) -> dict[str, np.ndarray]:
        """Runs the request's rows in the runtime's sampler; `send_partial` (None: no progress) gets each
        progress response."""
        progress = RequestProgress(len(feeds["seed"]), entry.outputs[0].shape)
        height = progress.height

        async def run(positions: np.ndarray, batch) -> None:
            def progressed(update: Progress) -> None:
                if progress.update(positions, update.rows_done, update.images) and not progress.complete:
                    send_partial(progress.outputs())

            images = await self.runtime.sample_sequential(entry, batch, None, progressed if send_partial else None)
            progress.update(positions, np.full(len(positions), height), images)

        runs = [asyncio.ensure_future(run(positions, batch)) for positions, batch in sample_batches(feeds)]
        try:
            await asyncio.gather(*runs)
        finally:  # one failed (or the request was cancelled): the others stop too
            for task in runs:
                task.cancel()
        self.metrics.samples.labels(entry.model).inc(len(feeds["seed"]))
        return progress.outputs()

