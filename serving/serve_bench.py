"""Measuring the server: dynamic batching on vs off, gRPC overhead, embedded vs Triton.

Every figure of one report is measured in one run, side by side (these machines are noisy).
Servers run as child processes (`genserve serve`, as deployed), so the load generator in this
process does not share their GIL. The load is closed-loop: `concurrency` callers, each sending
its next request when the last one answers, for `duration_s` after a warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .artifacts import load_manifest
from .registry import ModelRegistry


@dataclass(frozen=True)
class ServeBenchConfig:
    repository: Path = Path("model_repository")
    model: str = "vae_mnist"
    concurrency: int = 32
    duration_s: float = 5.0
    warmup_s: float = 1.0
    with_triton: bool = True  # also start a Triton server over the model's entry points

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError(f"need concurrency >= 1, duration_s > 0, warmup_s >= 0; got {self.concurrency}, "
                             f"{self.duration_s}, {self.warmup_s}")


@dataclass(frozen=True)
class LoadResult:
    label: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


async def closed_loop(label: str, call: Callable[[], Awaitable], concurrency: int, duration_s: float,
                      warmup_s: float) -> LoadResult:
    """`concurrency` workers calling `call` back to back; latencies of calls that start after the warm-up."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def worker() -> None:
        nonlocal errors
        while True:
            began = time.perf_counter()
            if began >= stop_at:
                return
            try:
                await call()
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors += began >= measure_from
                continue
            if began >= measure_from:
                latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - measure_from
    ms = np.asarray(latencies) * 1e3 if latencies else np.asarray([np.nan])
    return LoadResult(label, concurrency, len(latencies), errors, elapsed,
                      float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


def decode_latents(repository: Path, model: str) -> np.ndarray:
    spec = ModelRegistry.from_repository(repository).get(model)
    spec.require("decode")
    return np.random.default_rng(0).standard_normal((1, *spec.latent_shape)).astype(np.float32)


def genserve_decode(address: str, model: str, latents: np.ndarray):
    """A batch-1 Decode call on a grpc.aio channel (returned so the caller can close it)."""
    import grpc

    from genserve.v1 import generative_pb2 as pb
    from genserve.v1 import generative_pb2_grpc as pb_grpc

    from .tensors import from_numpy

    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.GenerativeStub(channel)
    request = pb.DecodeRequest(model=model, latents=from_numpy(latents))
    return channel, lambda: stub.Decode(request, timeout=30)


def triton_decode(url: str, triton_name: str, input_name: str, latents: np.ndarray):
    import tritonclient.grpc.aio as triton

    client = triton.InferenceServerClient(url)
    tensor = triton.InferInput(input_name, list(latents.shape), "FP32")
    tensor.set_data_from_numpy(latents)
    return client, lambda: client.infer(triton_name, [tensor], client_timeout=30)


def in_process_decode(manifest_folder: Path, latents: np.ndarray, repeats: int = 2000) -> float:
    """p50 ms of the same batch-1 ONNX Runtime call, in this process (no gRPC, no batcher)."""
    from .entry_runner import OnnxEntryPoint

    runner = OnnxEntryPoint.load(load_manifest(manifest_folder))
    feeds = {runner.manifest.inputs[0].name: latents}
    for _ in range(50):
        runner.run(feeds)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        runner.run(feeds)
        times.append(time.perf_counter() - began)
    return float(np.percentile(times, 50) * 1e3)


@contextlib.contextmanager
def model_only_triton(repository: Path, model: str):
    """A Triton server over just `model`'s entry points (symlinked): starts in seconds, not a minute."""
    from .tritonserver import TritonServer, TritonServerConfig

    with tempfile.TemporaryDirectory(prefix="genserve-bench-") as tmp:
        for folder in ModelRegistry.from_repository(repository).get(model).entry_points.values():
            (Path(tmp) / folder.folder.name).symlink_to(folder.folder.resolve())
        config = TritonServerConfig(Path(tmp), 0, 0, 0, startup_timeout_s=300)
        server = TritonServer(config).start()  # ports chosen at start: server.config has them
        try:
            yield server.config.grpc_url
        finally:
            server.stop()


async def _measure(call_factory, label: str, config: ServeBenchConfig, concurrency: int) -> LoadResult:
    handle, call = call_factory()
    try:
        return await closed_loop(label, call, concurrency, config.duration_s, config.warmup_s)
    finally:
        await handle.close()


def mean_batch_rows(metrics_port: int, entry_point: str) -> float:
    """Mean rows per batch the server ran for `entry_point`, from its Prometheus endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.labels.get("entry_point") == entry_point and s.name.startswith("genserve_batch_size_")}
    return values["genserve_batch_size_sum"] / max(values["genserve_batch_size_count"], 1)


def run_serve_bench(config: ServeBenchConfig, progress: Callable[[str], None] = print) -> dict:
    """Runs every comparison; returns the figures (see `format_serve_report`)."""
    from .server import ServerProcess

    repo, model, c = config.repository, config.model, config.concurrency
    latents = decode_latents(repo, model)
    decode_entry = ModelRegistry.from_repository(repo).get(model).entry("decode")
    results: dict[str, LoadResult] = {}
    common = ("--repository", str(repo), "--metrics-port", "-1")

    progress(f"in-process ONNX Runtime decode of {model}, batch 1 ...")
    in_process_p50 = in_process_decode(decode_entry.folder, latents)
    with ServerProcess("--repository", str(repo), "--metrics-port", "0") as batched, \
            ServerProcess(*common, "--no-batching") as unbatched:
        for label, server in (("batching on", batched), ("batching off", unbatched)):
            progress(f"genserve embedded, {label}, concurrency {c} ...")
            results[f"{label} c{c}"] = asyncio.run(_measure(
                lambda s=server: genserve_decode(s.address, model, latents), label, config, c))
        mean_batch = mean_batch_rows(batched.metrics_port, decode_entry.triton_name)
        progress("genserve embedded, concurrency 1 ...")
        results["embedded c1"] = asyncio.run(_measure(
            lambda: genserve_decode(batched.address, model, latents), "genserve embedded", config, 1))
        if config.with_triton:
            progress("starting Triton over the model's entry points ...")
            with model_only_triton(repo, model) as url, \
                    ServerProcess(*common, "--runtime", "triton", "--triton-url", url) as forwarding:
                input_name = decode_entry.inputs[0].name
                for level in (1, c):
                    progress(f"Triton direct and genserve→Triton, concurrency {level} ...")
                    results[f"triton c{level}"] = asyncio.run(_measure(
                        lambda: triton_decode(url, decode_entry.triton_name, input_name, latents),
                        "Triton direct", config, level))
                    results[f"forwarded c{level}"] = asyncio.run(_measure(
                        lambda: genserve_decode(forwarding.address, model, latents), "genserve→Triton", config,
                        level))
    return {"config": {k: str(v) for k, v in asdict(config).items()}, "in_process_p50_ms": in_process_p50,
            "mean_batch_rows_batching_on": mean_batch,
            "results": {k: {**asdict(r), "throughput": r.throughput} for k, r in results.items()}}


def format_serve_report(report: dict) -> str:
    r = report["results"]
    c = int(report["config"]["concurrency"])
    lines = [f"model {report['config']['model']}, batch-1 Decode, closed loop, "
             f"{report['config']['duration_s']} s per row", ""]
    header = f"{'':28} {'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"

    def row(key: str) -> str:
        x = r[key]
        return (f"{x['label']:28} {x['concurrency']:>5} {x['throughput']:>9.1f} {x['p50_ms']:>8.2f} "
                f"{x['p99_ms']:>8.2f} {x['errors']:>6}")

    on, off = r[f"batching on c{c}"], r[f"batching off c{c}"]
    lines += ["Dynamic batching (genserve embedded)", header, row(f"batching on c{c}"), row(f"batching off c{c}"),
              f"throughput ratio on/off: {on['throughput'] / off['throughput']:.2f}x (aim >= 4x); "
              f"p50 ratio off/on {off['p50_ms'] / on['p50_ms']:.2f}x; batching on ran "
              f"{report['mean_batch_rows_batching_on']:.1f} rows per batch on average", ""]
    embedded = r["embedded c1"]
    lines += ["gRPC overhead, concurrency 1",
              f"  in-process ONNX Runtime call  p50 {report['in_process_p50_ms']:.3f} ms",
              f"  through genserve (embedded)   p50 {embedded['p50_ms']:.3f} ms  "
              f"(+{embedded['p50_ms'] - report['in_process_p50_ms']:.3f} ms)", ""]
    if "triton c1" in r:
        lines += ["Runtimes side by side", header]
        for level in (1, c):
            keys = ["embedded c1" if level == 1 else f"batching on c{c}", f"forwarded c{level}", f"triton c{level}"]
            lines += [row(k) for k in keys]
        t1, f1 = r["triton c1"], r["forwarded c1"]
        lines += [f"p50 at concurrency 1: genserve→Triton / Triton direct {f1['p50_ms'] / t1['p50_ms']:.2f}x, "
                  f"genserve embedded / Triton direct {embedded['p50_ms'] / t1['p50_ms']:.2f}x"]
    return "\n".join(lines)
