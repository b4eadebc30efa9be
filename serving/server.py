"""The genserve gRPC server: the Generative service, KServe v2 beside it, health, reflection, metrics, shutdown.

`GenserveServer` wires the parts: registry (manifests) → runtime (embedded or triton) →
service (handlers), on a grpc.aio server with a max message size, the standard health service
(overall, per service, and one status per model name) and server reflection (grpcurl, Postman).
`stop()` is graceful: health turns NOT_SERVING, new RPCs are refused, in-flight ones get
`grace_seconds` to finish, then the runtime stops. `ServerThread` runs one in a background
thread with its own event loop (tests and benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2 as v2

from genserve.v1 import generative_pb2 as pb

from . import kserve
from .auth import BearerTokenInterceptor
from .config import ServerConfig
from .kserve import KServeService
from .metrics import ServerMetrics
from .registry import ModelRegistry
from .runtimes.base import Runtime
from .service import GenerativeService, add_to_server

log = logging.getLogger("genserve.server")
HEALTH_INTERVAL_S = 0.5  # how often per-model health is re-read from the runtime
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generative"].full_name  # "genserve.v1.Generative"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def make_runtime(config: ServerConfig, metrics: ServerMetrics) -> Runtime:
    if config.runtime.kind == "triton":
        from .runtimes.triton import TritonRuntime

        return TritonRuntime(config.runtime, config.max_message_bytes)
    from .runtimes.embedded import EmbeddedRuntime

    return EmbeddedRuntime(config.runtime, config.batcher, metrics)


class GenserveServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.registry = ModelRegistry.from_repository(config.repository)
        self.runtime = make_runtime(config, self.metrics)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http = None
        self._health_watch: asyncio.Future | None = None

    @property
    def address(self) -> str:
        return f"{self.config.address}:{self.port}"

    async def start(self) -> None:
        """Loads the models, then starts listening; returns once the server answers."""
        await self.runtime.start(self.registry)
        limit = self.config.max_message_bytes
        interceptors = [BearerTokenInterceptor(self.config.auth_token)] if self.config.auth_token else []
        self._grpc = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ])
        service = GenerativeService(self.registry, self.runtime, self.metrics, self.config.max_samples_per_request,
                                    self.config.max_importance_work)
        add_to_server(service, self._grpc)
        add_to_server(KServeService(self.registry, self.runtime, self.metrics), self._grpc, v2, kserve.SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, kserve.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        self.port = self._listen(f"{self.config.address}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.address}:{self.config.port}")
        await self._update_health()
        await self.health.set(SERVICE_NAME, SERVING)
        self._health_watch = asyncio.ensure_future(self._watch_health())
        if self.config.metrics_port is not None:
            self._metrics_http = self.metrics.serve_http(self.config.metrics_port, self.config.address)
            self.metrics_port = self._metrics_http.server_port
        await self._grpc.start()
        log.info("genserve listening on %s (%s runtime, %d models)", self.address, self.config.runtime.kind,
                 len(self.registry.models))

    async def _update_health(self) -> None:
        for name, spec in self.registry.models.items():
            ready = all(self.runtime.ready(m) for m in spec.entry_points.values())
            await self.health.set(name, SERVING if ready else NOT_SERVING)

    async def _watch_health(self) -> None:
        """Per-model health follows the runtime (an engine that died, a model Triton unloaded)."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            await self.runtime.refresh()
            await self._update_health()

    def _listen(self, address: str) -> int:
        if self.config.tls_cert is None:
            return self._grpc.add_insecure_port(address)
        key, chain = self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes()
        return self._grpc.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: refuse new RPCs, let in-flight ones finish within the grace period, then stop."""
        grace = self.config.grace_seconds if grace is None else grace
        if self._health_watch is not None:
            self._health_watch.cancel()
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.runtime.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    async def wait(self) -> None:
        await self._grpc.wait_for_termination()


class ServerThread:
    """A GenserveServer on its own event loop in a daemon thread: `with ServerThread(config) as s: s.address`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server: GenserveServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="genserve-server", daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        self.server = self.call(self._build())
        return self

    async def _build(self) -> GenserveServer:
        server = GenserveServer(self.config)
        await server.start()
        return server

    def call(self, coroutine, timeout: float | None = 600):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess:
    """`genserve serve ARGS` in a child process, waited on until it answers health checks.

    What a deployment runs: benchmarks use it so client and server do not share a GIL, and
    tests use it to signal a real process (graceful shutdown).
    """

    def __init__(self, *args: str, startup_timeout_s: float = 120.0) -> None:
        self.port: int | None = None  # the port the server bound (it is given port 0 and says which it got)
        self.metrics_port: int | None = None  # likewise, when started with --metrics-port 0
        self.args = ["serve", "--port", "0", *args]
        self.startup_timeout_s = startup_timeout_s
        self.process = None
        self.output: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        import subprocess
        import sys
        import time

        self.process = subprocess.Popen(
            [sys.executable, "-m", "genserve.clients.cli", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        give_up = time.monotonic() + self.startup_timeout_s
        reported = threading.Event()

        def read_output() -> None:  # until the process ends: its "serving ... on HOST:PORT" line gives the port
            for line in self.process.stdout:
                self.output.append(line)
                found = re.search(r"^genserve serving .* on [^ ]+:(\d+) ", line)
                if found and not reported.is_set():
                    self.port = int(found.group(1))
                    metrics = re.search(r"metrics http://[^ ]+:(\d+)/metrics", line)
                    self.metrics_port = int(metrics.group(1)) if metrics else None
                    reported.set()
            reported.set()

        threading.Thread(target=read_output, daemon=True).start()
        if not reported.wait(self.startup_timeout_s) or self.port is None:
            self.stop()
            raise RuntimeError(f"genserve serve did not report its port:\n{''.join(self.output)}")
        with grpc.insecure_channel(self.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"genserve serve exited with {self.process.returncode}:\n"
                                       f"{''.join(self.output)}")
                try:
                    if check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1).status == SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > give_up:
                    self.stop()
                    raise TimeoutError(f"genserve serve did not answer within {self.startup_timeout_s:g} s")
                time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after `timeout`; returns the exit code."""
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
