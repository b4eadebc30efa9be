"""`genserve triton` as a user runs it: starts a real server, serves, and stops on Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from genserve.export.checkpoint import load_checkpoint, save_checkpoint
from genserve.export.repository import export_checkpoint
from tests.conftest import make_model


def test_genserve_triton_serves_until_interrupted(tmp_path):
    save_checkpoint(tmp_path / "tiny_vae", make_model("vae"), training={"data": "none"})
    export_checkpoint(load_checkpoint(tmp_path / "tiny_vae"), tmp_path / "repo")
    process = subprocess.Popen(  # port 0: the command picks free ports and says which
        [sys.executable, "-m", "genserve.clients.cli", "triton", "--repository", str(tmp_path / "repo"),
         "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready = process.stdout.readline()
        assert "tritonserver ready" in ready
        grpc_port = int(re.search(r"gRPC 127\.0\.0\.1:(\d+),", ready).group(1))
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            z = grpcclient.InferInput("z", [1, 3], "FP32")
            z.set_data_from_numpy(np.zeros((1, 3), np.float32))
            assert client.infer("tiny_vae_decode", [z]).as_numpy("probs").shape == (1, 1, 8, 8)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    # the server went with it: nothing listens on its port any more
    with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
        with pytest.raises(InferenceServerException, match="(?i)unavailable|failed to connect|connection refused"):
            client.is_server_live()


def test_triton_bench_prints_latency_per_batch_size(tmp_path):
    save_checkpoint(tmp_path / "tiny_vae", make_model("vae"), training={"data": "none"})
    export_checkpoint(load_checkpoint(tmp_path / "tiny_vae"), tmp_path / "repo")
    result = subprocess.run(
        [sys.executable, "-m", "genserve.clients.cli", "triton-bench", "tiny_vae_score", "--repository",
         str(tmp_path / "repo"), "--batch", "1", "--batch", "8", "--requests", "5", "--warmup", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [row["batch"] for row in report["rows"]] == [1, 8]
    assert all(row["p50_ms"] > 0 and row["images_per_s"] > 0 for row in report["rows"])
    missing = subprocess.run(
        [sys.executable, "-m", "genserve.clients.cli", "triton-bench", "nope", "--repository", str(tmp_path / "repo")],
        capture_output=True, text=True, timeout=60,
    )
    assert missing.returncode == 2 and "no model 'nope'" in missing.stderr
