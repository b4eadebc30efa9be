"""`genserve soak` against a real server: a short run of the same mix the long runs use."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from genserve.clients.soak import SoakConfig, run_soak
from tests.integration.server_fixtures import Connected, server_config

MISTAKES = {
    "unknown model": "NOT_FOUND", "too many samples": "RESOURCE_EXHAUSTED", "NaN temperature": "INVALID_ARGUMENT",
    "wrong image shape": "INVALID_ARGUMENT", "shape overflowing 64 bits": "INVALID_ARGUMENT",
    "wrong byte length": "INVALID_ARGUMENT", "bytes that are no message": "INVALID_ARGUMENT",
    "vae_mnist score over the K budget": "RESOURCE_EXHAUSTED",
}


@pytest.fixture(scope="module")
def api():
    connected = Connected(server_config())
    yield connected
    connected.close()


def test_a_short_soak_passes_with_every_kind_of_answer(api):
    config = SoakConfig(api.thread.address, duration_s=4, concurrency=8, pids=(os.getpid(),), seed=1)
    report = asyncio.run(run_soak(config, progress=lambda line: None))
    assert report.passed, report.table()
    assert report.requests == sum(report.codes.values()) == sum(sum(c.values()) for c in report.by_kind.values())
    # every mistake got the code a client can act on, each kind its own
    seen = {kind: codes for kind, codes in report.by_kind.items() if kind in MISTAKES}
    assert len(seen) >= 4, report.table()
    assert {kind: set(codes) for kind, codes in seen.items()} == {kind: {MISTAKES[kind]} for kind in seen}
    assert set(report.valid_codes) == {"OK"} and report.valid_p50_ms > 0
    memory = report.rss_mb[str(os.getpid())]
    assert 0 < memory["start"] <= memory["peak"] and memory["end"] <= memory["peak"]


def test_the_soak_command_reports_an_absent_server_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "genserve.clients.cli", "soak", "--server", "127.0.0.1:1",
                             "--duration", "1", "--timeout", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "UNAVAILABLE from 127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr
