"""The Grafana dashboard's queries name only metrics that the servers really export.

A real genserve (embedded runtime) and a real tritonserver each answer a few requests (a good
and a bad one, a sample), then their /metrics are scraped as Prometheus would: every metric name
in every panel's query must be among the series they expose.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from genserve.v1 import generative_pb2 as pb
from tests.integration.server_fixtures import Connected, server_config, tensor
from tests.integration.test_triton import infer_input, sample_stream, sampler_inputs

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "genserve.json"
METRIC = re.compile(r"\b((?:genserve|nv)_[a-z0-9_]+)\b")


def exported(port: int) -> set[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_dashboard_query_names_metrics_the_servers_export(triton_server):
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queried = {name for panel in panels for target in panel["targets"] for name in METRIC.findall(target["expr"])}
    assert len(queried) >= 10

    api = Connected(server_config())
    try:
        api.stub.Sample(pb.SampleRequest(model="pixelcnn_mnist", num_samples=1, seed=1))
        api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=tensor(np.zeros((2, 16), np.float32))))
        try:
            api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=tensor(np.zeros((2, 3), np.float32))))
        except Exception:  # noqa: BLE001 - an INVALID_ARGUMENT, counted by code
            pass
        series = exported(api.server.metrics_port)
    finally:
        api.close()
    with grpcclient.InferenceServerClient(triton_server.config.grpc_url) as client:
        client.infer("vae_mnist_decode", [infer_input("z", np.zeros((2, 16), np.float32))])
        sample_stream(client, "pixelcnn_mnist_sample", sampler_inputs(1, [0]))
    series |= exported(triton_server.config.metrics_port)

    missing = sorted(queried - series)
    assert not missing, f"the dashboard queries metrics no server exports: {missing}"
