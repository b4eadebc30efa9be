"""deploy/: the server command lines in the container files are ones `genserve serve` accepts."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from genserve.serving.commands import serve

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def parse_serve(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    serve.add_arguments(parser)
    return parser.parse_args(args)


def test_the_dockerfile_serves_the_shipped_repository_on_the_exposed_ports():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["genserve", "serve"\]$', text, re.M)
    args = parse_serve(json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1)))
    config = serve.config_from(args)
    assert (config.address, config.port, config.metrics_port, config.runtime.kind) == \
        ("0.0.0.0", 50051, 9095, "embedded")
    assert re.search(r"^EXPOSE 50051 9095$", text, re.M)
    assert str(config.repository).startswith("/opt/genserve/") and "--check-sums model_repository/SHA256SUMS" in text


def test_the_kubernetes_manifest_probes_the_served_port_and_outlasts_the_grace_period():
    text = (DEPLOY / "kubernetes" / "genserve.yaml").read_text()
    args_text = re.search(r"args: (\[.*?\])", text, re.S).group(1)
    config = serve.config_from(parse_serve(json.loads(args_text)))
    assert f"grpc: {{port: {config.port}, service: genserve.v1.Generative}}" in text
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", text).group(1))
    assert grace > config.grace_seconds
    assert f'prometheus.io/port: "{config.metrics_port}"' in text
    assert f"genserve:{config.metrics_port}" in (DEPLOY / "prometheus.yml").read_text()
