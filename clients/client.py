"""The Python client: `Client` (blocking) and `AsyncClient` (asyncio), numpy in and out.

Every call has a deadline (`timeout`, default 60 s, overridable per call) that covers its
retries; only UNAVAILABLE is retried (the server was not reached, or is restarting), with
exponential backoff and jitter. Failures raise `GenserveError` carrying the gRPC status.

Examples use `SERVER`, the server's HOST:PORT (`"127.0.0.1:50051"` for `make run`); a test runs
them all against a real server::

    >>> from genserve.clients import Client
    >>> with Client(SERVER) as client:
    ...     samples = client.sample("vae_mnist", 4, seed=7)
    ...     samples.images.shape, samples.seed
    ((4, 1, 28, 28), 7)
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from genserve.v1 import generative_pb2 as pb
from genserve.v1 import generative_pb2_grpc as pb_grpc

from .errors import GenserveError
from .wire import from_tensor, to_tensor

DEFAULT_SERVER = "127.0.0.1:50051"
CAPABILITY_NAMES = {pb.CAPABILITY_SAMPLE: "sample", pb.CAPABILITY_ENCODE: "encode", pb.CAPABILITY_DECODE: "decode",
                    pb.CAPABILITY_SCORE: "score"}
SCORE_KINDS = {pb.SCORE_KIND_EXACT: "exact", pb.SCORE_KIND_LOWER_BOUND: "lower bound",
               pb.SCORE_KIND_NOT_A_LIKELIHOOD: "not a likelihood"}


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the server and how patient to be.

    Args:
        server: HOST:PORT.
        timeout: seconds per call, retries included (each call may override it).
        retries: extra attempts after UNAVAILABLE.
        backoff: first retry delay in seconds; doubles per retry, up to `max_backoff`.
        tls: use TLS; `root_certificates` (PEM bytes) trusts a private CA, None the system's.
        token: sent as `authorization: Bearer TOKEN` on every call.
    """

    server: str = DEFAULT_SERVER
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.1
    max_backoff: float = 2.0
    tls: bool = False
    root_certificates: bytes | None = None
    token: str | None = None
    max_message_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0; got {self.timeout}, {self.retries}, "
                             f"{self.backoff}")

    @property
    def channel_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes)]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        return grpc.ssl_channel_credentials(self.root_certificates) if self.tls else None

    def delay(self, attempt: int) -> float:
        """Backoff before retry `attempt` (0-based), with jitter so clients do not retry in step."""
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)


# ---- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    capabilities: tuple[str, ...]
    image_shape: tuple[int, ...]
    pixel_levels: int
    num_classes: int | None
    latent_shape: tuple[int, ...]
    max_batch_size: int
    ready: bool
    metrics: dict = field(default_factory=dict)
    modality: str = "image"  # or "audio": samples (N, C, T) of mu-law codes
    sample_rate: int | None = None  # of audio, in Hz

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> ModelInfo:
        return cls(m.name, m.family, tuple(CAPABILITY_NAMES[c] for c in m.capabilities), tuple(m.image_shape),
                   m.pixel_levels, m.num_classes if m.HasField("num_classes") else None, tuple(m.latent_shape),
                   m.max_batch_size, m.ready, json.loads(m.metrics_json or "{}"), m.modality or "image",
                   m.sample_rate or None)


@dataclass(frozen=True)
class Samples:
    images: np.ndarray  # (N, C, H, W) uint8; audio (N, C, T)
    seed: int
    start_index: int
    temperature: float
    labels: np.ndarray | None  # (N,) int64, conditional models
    png: tuple[bytes, ...] = ()

    @classmethod
    def from_pb(cls, r: pb.SampleResponse) -> Samples:
        labels = np.asarray(r.labels, dtype=np.int64) if len(r.labels) else None
        return cls(from_tensor(r.images), r.seed, r.start_index, r.temperature, labels, tuple(r.png))


@dataclass(frozen=True)
class Progress:
    rows_done: np.ndarray  # (N,) rows completed per sample
    rows_total: int
    partial_images: np.ndarray  # (N, C, H, W): completed rows final, the rest zeros


@dataclass(frozen=True)
class Encoding:
    latents: np.ndarray
    log_var: np.ndarray | None = None  # VAE
    log_det: np.ndarray | None = None  # flows
    log_density: np.ndarray | None = None  # VAEs with a flow posterior: log q(latents | image)


@dataclass(frozen=True)
class Decoding:
    images: np.ndarray
    probabilities: np.ndarray | None = None  # VAE
    png: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Score:
    method: str  # "exact", "elbo", "iwae-K", "dequantised", "discriminator", "reconstruction", "latent_discriminator"
    kind: str  # "exact", "lower bound" or "not a likelihood"
    values: np.ndarray  # (N,) log p(x) in nats (or the bound; or the method's own figure)
    bits_per_dim: np.ndarray | None  # (N,), None when not a likelihood


# ---- requests and responses (shared by both clients) --------------------------------------------
def _sample_request(model, num_samples, seed, temperature, labels, start_index, png) -> pb.SampleRequest:
    return pb.SampleRequest(model=model, num_samples=num_samples, seed=seed, temperature=temperature,
                            labels=[] if labels is None else [int(v) for v in np.atleast_1d(labels)],
                            start_index=start_index, return_png=png)


def _stream_event(message: pb.SampleStreamResponse) -> Progress | Samples:
    if message.WhichOneof("event") == "result":
        return Samples.from_pb(message.result)
    p = message.progress
    return Progress(np.asarray(p.rows_done), p.rows_total, from_tensor(p.partial_images))


def _encoding(r: pb.EncodeResponse) -> Encoding:
    def optional(name: str) -> np.ndarray | None:
        return from_tensor(getattr(r, name)) if r.HasField(name) else None

    return Encoding(from_tensor(r.latents), optional("log_var"), optional("log_det"), optional("log_density"))


def _decode_request(model, latents, labels, png, seed) -> pb.DecodeRequest:
    return pb.DecodeRequest(model=model, latents=to_tensor(latents, np.float32),
                            labels=[] if labels is None else [int(v) for v in np.atleast_1d(labels)], return_png=png,
                            seed=seed)


def _decoding(r: pb.DecodeResponse) -> Decoding:
    return Decoding(from_tensor(r.images), from_tensor(r.probabilities) if r.HasField("probabilities") else None,
                    tuple(r.png))


def _score_request(model, images, labels, seed, importance_samples) -> pb.ScoreRequest:
    return pb.ScoreRequest(model=model, images=to_tensor(images, np.uint8), seed=seed,
                           labels=[] if labels is None else [int(v) for v in np.atleast_1d(labels)],
                           importance_samples=importance_samples)


def _scores(r: pb.ScoreResponse) -> list[Score]:
    return [Score(s.method, SCORE_KINDS.get(s.kind, "unspecified"), np.asarray(s.values),
                  np.asarray(s.bits_per_dim) if len(s.bits_per_dim) else None) for s in r.scores]


class _Retry:
    """One call's deadline and retry budget, shared by the blocking and the asyncio client."""

    def __init__(self, config: ClientConfig, timeout: float | None, method: str) -> None:
        self.config, self.method, self.attempt = config, method, 0
        self.deadline = time.monotonic() + (timeout or config.timeout)

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    def delay_after(self, error: grpc.RpcError) -> float:
        """The wait before the next attempt; raises GenserveError when the call should not be retried."""
        delay = self.config.delay(self.attempt)
        retry = error.code() == grpc.StatusCode.UNAVAILABLE and self.attempt < self.config.retries
        if not retry or time.monotonic() + delay >= self.deadline:
            raise GenserveError.from_rpc(error, self.method, attempts=self.attempt + 1) from None
        self.attempt += 1
        return delay


class Client:
    """A blocking client. Use as a context manager, or call `close()`.

    Args:
        server: HOST:PORT of a genserve server (default 127.0.0.1:50051).
        **options: any `ClientConfig` field (timeout, retries, tls, root_certificates, token, ...).

    Example::

        >>> from genserve.clients import Client
        >>> with Client(SERVER, timeout=30) as client:
        ...     [m.name for m in client.models()][:2]
        ...     x = client.sample("realnvp_mnist", 2, seed=1).images
        ...     z = client.encode("realnvp_mnist", x).latents
        ...     bool((client.decode("realnvp_mnist", z).images == x).all())
        ...     client.score("gated_pixelcnn_mnist", client.sample("gated_pixelcnn_mnist", 1, seed=3).images)[0].method
        ['aae_mnist', 'dcgan_mnist']
        True
        'exact'
    """

    def __init__(self, server: str = DEFAULT_SERVER, **options) -> None:
        self.config = ClientConfig(server=server, **options)
        credentials = self.config.credentials()
        self.channel = (grpc.secure_channel(server, credentials, self.config.channel_options) if credentials
                        else grpc.insecure_channel(server, self.config.channel_options))
        self.stub = pb_grpc.GenerativeStub(self.channel)

    def _call(self, method: str, request, timeout: float | None):
        retry = _Retry(self.config, timeout, method)
        while True:
            try:
                return getattr(self.stub, method)(request, timeout=retry.remaining(), metadata=self.config.metadata)
            except grpc.RpcError as error:
                time.sleep(retry.delay_after(error))

    def models(self, timeout: float | None = None) -> list[ModelInfo]:
        """Every served model."""
        return [ModelInfo.from_pb(m) for m in self._call("ListModels", pb.ListModelsRequest(), timeout).models]

    def model(self, name: str, timeout: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(self._call("GetModel", pb.GetModelRequest(model=name), timeout))

    def sample(self, model: str, num_samples: int, *, seed: int | None = None, temperature: float | None = None,
               labels: Sequence[int] | int | None = None, start_index: int = 0, png: bool = False,
               timeout: float | None = None) -> Samples:
        """Draws `num_samples` images; sample k is sample `start_index + k` of `seed` (random when None)."""
        request = _sample_request(model, num_samples, seed, temperature, labels, start_index, png)
        return Samples.from_pb(self._call("Sample", request, timeout))

    def sample_stream(self, model: str, num_samples: int, *, seed: int | None = None,
                      temperature: float | None = None, labels: Sequence[int] | int | None = None,
                      start_index: int = 0, timeout: float | None = None) -> Iterator[Progress | Samples]:
        """Yields `Progress` while a sequential model samples, then the `Samples` (not retried)."""
        request = _sample_request(model, num_samples, seed, temperature, labels, start_index, False)
        try:
            for message in self.stub.SampleStream(request, timeout=timeout or self.config.timeout,
                                                  metadata=self.config.metadata):
                yield _stream_event(message)
        except grpc.RpcError as error:
            raise GenserveError.from_rpc(error, "SampleStream") from None

    def encode(self, model: str, images: np.ndarray, timeout: float | None = None) -> Encoding:
        """uint8 (N, C, H, W) pixel values → latents."""
        return _encoding(self._call("Encode", pb.EncodeRequest(model=model, images=to_tensor(images, np.uint8)),
                                    timeout))

    def decode(self, model: str, latents: np.ndarray, labels: Sequence[int] | int | None = None, png: bool = False,
               timeout: float | None = None, seed: int = 0) -> Decoding:
        """float32 (N, *latent_shape) latents → images; `seed` keys a PixelVAE decoder's pixel noise."""
        return _decoding(self._call("Decode", _decode_request(model, latents, labels, png, seed), timeout))

    def score(self, model: str, images: np.ndarray, labels: Sequence[int] | int | None = None,
              seed: int | None = None, importance_samples: int | None = None,
              timeout: float | None = None) -> list[Score]:
        """log p(x) in nats and bits/dim per image, one `Score` per method the model reports."""
        return _scores(self._call("Score", _score_request(model, images, labels, seed, importance_samples),
                                  timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The asyncio client: the same methods as `Client`, as coroutines.

    Example::

        >>> import asyncio
        >>> from genserve.clients import AsyncClient
        >>> async def main():
        ...     async with AsyncClient(SERVER) as client:
        ...         batches = await asyncio.gather(*(client.sample("vae_mnist", 2, seed=s) for s in range(3)))
        ...         return [b.images.shape for b in batches]
        >>> asyncio.run(main())
        [(2, 1, 28, 28), (2, 1, 28, 28), (2, 1, 28, 28)]
    """

    def __init__(self, server: str = DEFAULT_SERVER, **options) -> None:
        self.config = ClientConfig(server=server, **options)
        credentials = self.config.credentials()
        self.channel = (grpc.aio.secure_channel(server, credentials, self.config.channel_options) if credentials
                        else grpc.aio.insecure_channel(server, self.config.channel_options))
        self.stub = pb_grpc.GenerativeStub(self.channel)

    async def _call(self, method: str, request, timeout: float | None):
        retry = _Retry(self.config, timeout, method)
        while True:
            try:
                return await getattr(self.stub, method)(request, timeout=retry.remaining(),
                                                        metadata=self.config.metadata)
            except grpc.RpcError as error:
                await asyncio.sleep(retry.delay_after(error))

    async def models(self, timeout: float | None = None) -> list[ModelInfo]:
        return [ModelInfo.from_pb(m) for m in (await self._call("ListModels", pb.ListModelsRequest(), timeout)).models]

    async def model(self, name: str, timeout: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(await self._call("GetModel", pb.GetModelRequest(model=name), timeout))

    async def sample(self, model: str, num_samples: int, *, seed: int | None = None,
                     temperature: float | None = None, labels: Sequence[int] | int | None = None,
                     start_index: int = 0, png: bool = False, timeout: float | None = None) -> Samples:
        request = _sample_request(model, num_samples, seed, temperature, labels, start_index, png)
        return Samples.from_pb(await self._call("Sample", request, timeout))

    async def sample_stream(self, model: str, num_samples: int, *, seed: int | None = None,
                            temperature: float | None = None, labels: Sequence[int] | int | None = None,
                            start_index: int = 0, timeout: float | None = None) -> AsyncIterator[Progress | Samples]:
        request = _sample_request(model, num_samples, seed, temperature, labels, start_index, False)
        try:
            async for message in self.stub.SampleStream(request, timeout=timeout or self.config.timeout,
                                                        metadata=self.config.metadata):
                yield _stream_event(message)
        except grpc.RpcError as error:
            raise GenserveError.from_rpc(error, "SampleStream") from None

    async def encode(self, model: str, images: np.ndarray, timeout: float | None = None) -> Encoding:
        request = pb.EncodeRequest(model=model, images=to_tensor(images, np.uint8))
        return _encoding(await self._call("Encode", request, timeout))

    async def decode(self, model: str, latents: np.ndarray, labels: Sequence[int] | int | None = None,
                     png: bool = False, timeout: float | None = None, seed: int = 0) -> Decoding:
        return _decoding(await self._call("Decode", _decode_request(model, latents, labels, png, seed), timeout))

    async def score(self, model: str, images: np.ndarray, labels: Sequence[int] | int | None = None,
                    seed: int | None = None, importance_samples: int | None = None,
                    timeout: float | None = None) -> list[Score]:
        request = _score_request(model, images, labels, seed, importance_samples)
        return _scores(await self._call("Score", request, timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
