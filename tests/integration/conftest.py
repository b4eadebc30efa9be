"""A real Triton Inference Server (nvidia-pytriton wheel) over a model repository, on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.serving.tritonserver import TritonServer, TritonServerConfig

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory):
    """The committed model_repository/ served by a real tritonserver (its config names the ports)."""
    config = TritonServerConfig(REPOSITORY, 0, 0, 0, startup_timeout_s=300)  # 0: ports chosen at start
    server = TritonServer(config, log_path=tmp_path_factory.mktemp("triton") / "tritonserver.log").start()
    yield server
    server.stop()


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
