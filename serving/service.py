"""The gRPC handlers of genserve.v1.Generative: protobuf in, protobuf out, nothing else.

Every RPC takes one path: validate → from_pb (validation.py) → the model's
family (families.py, over a runtime) → to_pb. One decorator per call shape (unary, streaming)
maps exceptions to status codes (errors.py) and records metrics, so no handler handles errors.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from genserve.v1 import generative_pb2 as pb
from genserve.v1 import generative_pb2_grpc as pb_grpc

from .errors import InvalidArgument, status_of
from .families import EXACT, FAMILIES, LOWER_BOUND, Family, SampleParams, ScoreSet
from .metrics import ServerMetrics
from .registry import ModelRegistry
from .runtimes.base import Progress, Runtime
from .tensors import from_numpy, png_bytes
from .validation import checked_seed, images_from, labels_for, latents_from, sample_params, score_options

log = logging.getLogger("genserve.server")

CAPABILITY_CODES = {
    "sample": pb.CAPABILITY_SAMPLE, "encode": pb.CAPABILITY_ENCODE,
    "decode": pb.CAPABILITY_DECODE, "score": pb.CAPABILITY_SCORE,
}
SCORE_KINDS = {EXACT: pb.SCORE_KIND_EXACT, LOWER_BOUND: pb.SCORE_KIND_LOWER_BOUND}


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline as a time.monotonic() time (None when the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RpcCall:
    """Metrics and error mapping around one RPC; used by the two decorators below (whose services give
    `metrics` and `metrics_label(request)`) and per request of a stream."""

    def __init__(self, metrics: ServerMetrics, method: str, model: str) -> None:
        """`model`: the metrics label, a served model's name (or "unknown", or "" for no model)."""
        self.metrics, self.method, self.model = metrics, method, model
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK  # until something says otherwise
        self.metrics.in_flight.labels(method).inc()

    def failed(self, error: BaseException) -> str:
        """Records `error`'s status; returns the message for the client (INTERNAL hides the details)."""
        self.code = status_of(error)
        if self.code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", self.method, exc_info=error)
            return "internal error; the server logged the details"
        return str(error)

    async def fail(self, error: BaseException, context: grpc.aio.ServicerContext) -> None:
        """Ends the RPC with `error`'s status (aborting raises)."""
        message = self.failed(error)
        await context.abort(self.code, message)

    def end(self) -> None:
        self.metrics.in_flight.labels(self.method).dec()
        self.metrics.requests.labels(self.model, self.method, self.code.name).inc()
        self.metrics.latency.labels(self.model, self.method).observe(time.perf_counter() - self.start)


def model_label(registry: ModelRegistry, name: str) -> str:
    """The metrics label of a requested model name: bounded to served names, so clients cannot grow it."""
    return name if name in registry.models else ("" if not name else "unknown")


class Unparsable:
    """What a request whose bytes are not its message type decodes to; the handler refuses it."""

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type


def tolerant_parser(message_class):
    """A request deserializer that never raises: gRPC would answer UNKNOWN with a Python class name."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError:
            return Unparsable(message_class.DESCRIPTOR.full_name)

    return parse


def parsed(request):
    if isinstance(request, Unparsable):
        raise InvalidArgument("request", f"the bytes do not parse as a {request.message_type} message")
    return request


def unary(method):
    @functools.wraps(method)
    async def handler(self: GenerativeService, request, context):
        call = RpcCall(self.metrics, method.__name__, self.metrics_label(request))
        try:
            return await method(self, parsed(request), context)
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a crash
            await call.fail(error, context)
        finally:
            call.end()

    return handler


def streaming(method):
    @functools.wraps(method)
    async def handler(self: GenerativeService, request, context):
        call = RpcCall(self.metrics, method.__name__, self.metrics_label(request))
        try:
            async for message in method(self, parsed(request), context):
                yield message
        except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
            call.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:  # noqa: BLE001
            await call.fail(error, context)
        finally:
            call.end()

    return handler


class GenerativeService(pb_grpc.GenerativeServicer):
    def __init__(self, registry: ModelRegistry, runtime: Runtime, metrics: ServerMetrics,
                 max_per_request: int, max_importance_work: int) -> None:
        self.registry, self.runtime, self.metrics = registry, runtime, metrics
        self.max_per_request, self.max_importance_work = max_per_request, max_importance_work
        self.families: dict[str, Family] = {
            name: FAMILIES[spec.family](spec, runtime) for name, spec in registry.models.items()
        }

    def metrics_label(self, request) -> str:
        return model_label(self.registry, getattr(request, "model", ""))

    def _family(self, name: str, capability: str) -> Family:
        spec = self.registry.get(name)
        spec.require(capability)
        return self.families[name]

    def _model_info(self, name: str) -> pb.ModelInfo:
        spec = self.registry.get(name)
        return pb.ModelInfo(
            name=spec.name, family=spec.family,
            capabilities=[CAPABILITY_CODES[c] for c in spec.capabilities],
            image_shape=list(spec.image_shape), pixel_levels=spec.pixel_levels, num_classes=spec.num_classes,
            modality=spec.modality, sample_rate=spec.sample_rate or 0,
            latent_shape=list(spec.latent_shape), max_batch_size=self.max_per_request,
            ready=all(self.runtime.ready(m) for m in spec.entry_points.values()),
            metrics_json=json.dumps(spec.metrics, sort_keys=True),
        )

    @unary
    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[self._model_info(name) for name in self.registry.models])

    @unary
    async def GetModel(self, request, context):
        return self._model_info(request.model)

    async def _sample(self, request: pb.SampleRequest, context, on_progress=None) -> pb.SampleResponse:
        family = self._family(request.model, "sample")
        params = sample_params(request, family.spec, self.max_per_request)
        images = await family.sample(params, deadline_of(context), on_progress)
        self.metrics.samples.labels(family.spec.name).inc(params.count)
        return self._sample_response(request, family, params, images)

    def _sample_response(self, request, family: Family, params: SampleParams, images: np.ndarray):
        return pb.SampleResponse(
            model=family.spec.name, seed=params.seed, start_index=params.start_index,
            temperature=params.temperature, images=from_numpy(images),
            labels=[] if params.labels is None else params.labels.tolist(),
            png=[png_bytes(image, family.spec.pixel_levels) for image in images] if request.return_png else [],
        )

    @unary
    async def Sample(self, request, context):
        return await self._sample(request, context)

    @streaming
    async def SampleStream(self, request, context):
        updates: asyncio.Queue[Progress] = asyncio.Queue()
        task = asyncio.ensure_future(self._sample(request, context, on_progress=updates.put_nowait))
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    break
                latest = getter.result()
                while not updates.empty():  # a slow reader gets the newest snapshot, not a backlog
                    latest = updates.get_nowait()
                height = latest.images.shape[2]  # the engine's rows: an audio model's frames
                shape = self.registry.get(request.model).image_shape
                yield pb.SampleStreamResponse(progress=pb.SampleProgress(
                    rows_done=latest.rows_done.tolist(), rows_total=height,
                    partial_images=from_numpy(latest.images.reshape(len(latest.images), *shape)),
                ))
            yield pb.SampleStreamResponse(result=await task)
        finally:
            # the client went away or the stream failed: stop the samples' compute, and the wait for
            # their next progress, which would otherwise be left pending when the loop closes
            task.cancel()
            if getter is not None:
                getter.cancel()

    @unary
    async def Encode(self, request, context):
        family = self._family(request.model, "encode")
        images = images_from(request.images, family.spec, self.max_per_request)
        encoded = await family.encode(images, deadline_of(context))
        return pb.EncodeResponse(
            model=family.spec.name, latents=from_numpy(encoded.latents),
            log_var=None if encoded.log_var is None else from_numpy(encoded.log_var),
            log_det=None if encoded.log_det is None else from_numpy(encoded.log_det),
            log_density=None if encoded.log_density is None else from_numpy(encoded.log_density),
        )

    @unary
    async def Decode(self, request, context):
        family = self._family(request.model, "decode")
        latents = latents_from(request.latents, family.spec, self.max_per_request)
        labels = labels_for(family.spec, request.labels, len(latents))
        decoded = await family.decode(latents, labels, checked_seed(request.seed), deadline_of(context))
        return pb.DecodeResponse(
            model=family.spec.name, images=from_numpy(decoded.images),
            probabilities=None if decoded.probabilities is None else from_numpy(decoded.probabilities),
            png=[png_bytes(image, family.spec.pixel_levels) for image in decoded.images] if request.return_png else [],
        )

    @unary
    async def Score(self, request, context):
        family = self._family(request.model, "score")
        images = images_from(request.images, family.spec, self.max_per_request)
        labels = labels_for(family.spec, request.labels, len(images))
        seed, k = score_options(request, family.spec, len(images), self.max_importance_work)
        scores = await family.score(images, labels, seed, k, deadline_of(context))
        return pb.ScoreResponse(model=family.spec.name, scores=[self._score_pb(s, family.spec.dims) for s in scores])

    @staticmethod
    def _score_pb(score: ScoreSet, dims: int) -> pb.Score:
        bpd = score.bits_per_dim(dims)
        return pb.Score(
            method=score.method, kind=SCORE_KINDS.get(score.kind, pb.SCORE_KIND_NOT_A_LIKELIHOOD),
            values=score.values.tolist(), bits_per_dim=[] if bpd is None else bpd.tolist(),
        )


def add_to_server(service, server: grpc.aio.Server, messages=pb, name: str = "Generative") -> None:
    """Registers service `name` of the proto module `messages` (default genserve.v1.Generative), as the
    generated `add_..._to_server` does but with deserializers that turn unparsable bytes into
    INVALID_ARGUMENT (see `tolerant_parser`)."""
    descriptor = messages.DESCRIPTOR.services_by_name[name]
    makers = {
        (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in descriptor.methods:
        if not hasattr(service, method.name):
            continue  # left out: gRPC answers UNIMPLEMENTED
        make = makers[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=tolerant_parser(getattr(messages, method.input_type.name)),
            response_serializer=getattr(messages, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)
