"""deploy/, checked by tools: hadolint (Dockerfiles), kubernetes-validate (every manifest, against a
pinned Kubernetes), the compose file parsed, and every genserve command line in them accepted by
`genserve serve`. (The dashboard's metric names are checked against real servers in
tests/integration/test_dashboard.py.)"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genserve.serving.commands import serve

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES_VERSION = "1.34.0"  # the manifests are validated against this release's schemas (strict)
MANIFESTS = sorted((DEPLOY / "kubernetes").rglob("*.yaml"))


def tool(name: str) -> str:
    """A linter installed with the dev extras, next to this interpreter."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} is not installed (pip install -e '.[dev]')"
    return path


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


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


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "triton.Dockerfile"])
def test_the_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run([tool("hadolint"), str(DEPLOY / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_kubernetes_manifest_validates_against_the_pinned_release(manifest):
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(manifest)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


def containers(kind: str) -> dict[str, dict]:
    """name → container of every Deployment under deploy/kubernetes."""
    found = {}
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == "Deployment":
                for c in doc["spec"]["template"]["spec"].get(kind, []):
                    found[f"{path.parent.name}/{doc['metadata']['name']}/{c['name']}"] = c
    return found


def test_every_container_has_requests_limits_and_probes():
    for name, c in containers("containers").items():
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"], name
        assert "readinessProbe" in c and "livenessProbe" in c, name
    gpu = containers("containers")["gpu/triton/triton"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "KIND_GPU" in containers("initContainers")["gpu/triton/export"]["command"]


def test_the_front_ends_serve_through_the_triton_service_and_scale_on_load():
    frontend = containers("containers")["scale-out/genserve-frontend/genserve"]
    config = serve.config_from(parse_serve(frontend["args"]))
    assert (config.runtime.kind, config.runtime.triton_url) == ("triton", "triton:8001")
    services = {d["metadata"]["name"]: d for d in documents(DEPLOY / "kubernetes/scale-out/triton.yaml")
                if d["kind"] == "Service"}
    assert 8001 in [p["port"] for p in services["triton"]["spec"]["ports"]]
    scalers = {d["metadata"]["name"]: d for d in documents(DEPLOY / "kubernetes/scale-out/autoscaling.yaml")}
    adapter = documents(DEPLOY / "kubernetes/scale-out/prometheus-adapter.yaml")[0]["data"]["config.yaml"]
    exposed = {rule["name"]["as"] for rule in yaml.safe_load(adapter)["rules"]}
    for target in ("genserve-frontend", "triton"):
        hpa = scalers[target]
        assert hpa["spec"]["scaleTargetRef"]["name"] == target
        for metric in hpa["spec"]["metrics"]:  # each served by prometheus-adapter's custom metrics API
            assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in exposed


def test_the_compose_file_builds_what_exists_and_prometheus_scrapes_its_services():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name, service in services.items():
        assert "image" in service or (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists(), \
            name
    frontend = serve.config_from(parse_serve(services["genserve-frontend"]["command"]))
    assert frontend.runtime.triton_url == "triton:8001" and "--grpc-port=8001" in services["triton"]["command"][-1]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    ports = {"genserve": {9095}, "genserve-frontend": {frontend.metrics_port}, "triton": {8002}}
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in services and int(port) in ports[host], target
    assert {t.split(":")[0] for t in targets} == set(services) - {"prometheus", "grafana"}
    mounted = [v.split(":")[0] for v in services["grafana"]["volumes"]]
    assert all((DEPLOY / m).exists() for m in mounted)


def test_the_gpu_profiles_variants_set_the_switches_they_name(monkeypatch):
    # deploy/gpu/profile_fused.py runs only where a GPU is; its variants are what a short GPU session
    # measures, so their parsing is checked here.
    import importlib.util

    from genserve.serving.fused import triton_ops

    spec = importlib.util.spec_from_file_location("profile_fused", DEPLOY / "gpu" / "profile_fused.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    for name in ("WARPS", "SLOTS_PER_PROGRAM", "RESIDENT_STEP_SLOTS", "RESIDENT_THREADS", "SPLIT_REFRESH_SLOTS"):
        monkeypatch.setattr(triton_ops, name, getattr(triton_ops, name))  # restored after the test
    warps = dict(triton_ops.WARPS)

    def switches():
        return (triton_ops.WARPS, triton_ops.SLOTS_PER_PROGRAM, triton_ops.RESIDENT_STEP_SLOTS,
                triton_ops.RESIDENT_THREADS, triton_ops.SPLIT_REFRESH_SLOTS)

    profile.apply_variant("resident128+split", 64)
    assert switches() == (warps, 16, 64, 128, 64)
    profile.apply_variant("8x1", 2)
    assert switches() == (dict.fromkeys(warps, 8), 1, 0, 256, 0)
    profile.apply_variant("resident", 1)
    assert switches() == (warps, 16, 1, 256, 0)
    profile.apply_variant("default", 1)
    assert switches() == (warps, 16, 0, 256, 0)
