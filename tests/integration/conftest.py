"""A real Triton Inference Server (nvidia-pytriton wheel) over a model repository, on loopback."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from genserve.serving.tritonserver import TritonServer, TritonServerConfig

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@dataclass(frozen=True)
class RunningServer:
    """What the tests use of a running tritonserver: its config, ports included."""

    config: TritonServerConfig


def start_server(log_path: Path) -> TritonServer:
    """The committed model_repository/ served by a real tritonserver, on ports chosen at start."""
    return TritonServer(TritonServerConfig(REPOSITORY, 0, 0, 0, startup_timeout_s=300), log_path=log_path).start()


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, worker_id) -> Iterator[RunningServer]:
    """One tritonserver for the whole run. Under xdist the workers share it (`shared_server`): its
    start-up loads every shipped model into a Python stub of its own, about 40 s of CPU on 2 cores."""
    if worker_id == "master":
        server = start_server(tmp_path_factory.mktemp("triton") / "tritonserver.log")
        yield RunningServer(server.config)
        server.stop()
    else:
        yield from shared_server(tmp_path_factory.getbasetemp().parent)


def shared_server(shared: Path) -> Iterator[RunningServer]:
    """The server of every xdist worker: the first worker to ask starts it; each user registers a file
    naming its pid. The starting worker stops it at its own end, once no other registered worker is
    alive, so a server is never stopped under a worker still using it."""
    lock, state, me = FileLock(shared / "triton.lock"), shared / "triton.json", shared / f"triton-user-{os.getpid()}"
    owned = None
    with lock:
        if state.exists():
            config = TritonServerConfig(**{**json.loads(state.read_text()), "repository": REPOSITORY})
        else:
            owned = start_server(shared / "tritonserver.log")
            config = owned.config
            fields = ("grpc_port", "http_port", "metrics_port", "address")
            state.write_text(json.dumps({name: getattr(config, name) for name in fields}))
        me.touch()
    yield RunningServer(config)
    me.unlink()
    if owned is None:
        return
    while True:
        with lock:
            if not any(_alive(int(user.name.rsplit("-", 1)[1])) for user in shared.glob("triton-user-*")):
                state.unlink()
                owned.stop()
                return
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def triton(triton_server):
    """That server's gRPC URL."""
    return triton_server.config.grpc_url


@pytest.fixture(scope="module", params=("embedded", "triton"))
def api(request):
    """A genserve server on each runtime in turn (the conformance suites run against both): embedded, then
    forwarding to the session's tritonserver. Modules that need one server of their own define `api` too."""
    from tests.integration.server_fixtures import Connected, server_config  # it imports this module

    url = request.getfixturevalue("triton") if request.param == "triton" else None
    connected = Connected(server_config(request.param, url))
    yield connected
    connected.close()
