"""The latency benchmark: a concurrency sweep or Poisson request rates against genserve or Triton.

Modelled on Triton's perf_analyzer: for each load level, a warm-up, then measurement windows
repeated until the last three agree within `stability` on throughput and p50 latency (or
`max_windows` run out: the level is then reported unstable). Figures come from the requests
completed in those last three windows. Against Triton the same model's entry point is called
over the KServe v2 protocol, so both servers can be compared side by side.
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

METHODS = ("sample", "decode", "encode", "score")
# Triton model per method: the first `<model>_<entry>` that exists (genserve export's naming).
TRITON_ENTRIES = {"sample": ("sample", "generate", "decode"), "decode": ("decode", "generate"),
                  "encode": ("encode",), "score": ("score", "logits", "discriminate")}
STABLE_WINDOWS = 3


@dataclass(frozen=True)
class BenchConfig:
    model: str
    method: str = "decode"
    batch: int = 1  # images (or latents) per request
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    request_rates: tuple[float, ...] = ()  # requests/s with Poisson arrivals; replaces the concurrency sweep
    warmup_s: float = 2.0
    window_s: float = 2.0
    stability: float = 0.1
    max_windows: int = 10

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.batch < 1 or any(c < 1 for c in self.concurrency) or any(r <= 0 for r in self.request_rates):
            raise ValueError("--batch and every concurrency must be >= 1, every request rate > 0")
        if self.window_s <= 0 or self.warmup_s < 0 or self.max_windows < STABLE_WINDOWS or self.stability <= 0:
            raise ValueError(f"need --window > 0, --warmup >= 0, --max-windows >= {STABLE_WINDOWS}, --stability > 0")

    @property
    def mode(self) -> str:
        return "request_rate" if self.request_rates else "concurrency"

    @property
    def levels(self) -> tuple[float, ...]:
        return self.request_rates or self.concurrency


@dataclass
class LevelResult:
    level: float  # concurrency, or requests/s offered
    requests_per_s: float
    inferences_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    errors: int
    windows: int
    stable: bool
    first_error: str = ""


@dataclass
class _Record:
    finished: list[float] = field(default_factory=list)  # completion times
    latency: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # completion times of failed requests
    first_error: str = ""

    def add(self, began: float, ok: bool, error: str = "") -> None:
        now = time.perf_counter()
        if ok:
            self.finished.append(now)
            self.latency.append(now - began)
        else:
            self.errors.append(now)
            self.first_error = self.first_error or error


def _stats(record: _Record, start: float, end: float) -> tuple[float, np.ndarray, int]:
    """(requests/s, latencies in ms, errors) of the requests completed in [start, end)."""
    done = np.asarray(record.finished)
    latency = np.asarray(record.latency)[(done >= start) & (done < end)] * 1e3
    errors = int(sum(start <= t < end for t in record.errors))
    return len(latency) / (end - start), latency, errors


def _agree(values: list[float], tolerance: float) -> bool:
    mean = float(np.mean(values))
    return mean > 0 and all(abs(v - mean) <= tolerance * mean for v in values)


async def measure_level(call: Callable[[], Awaitable], config: BenchConfig, level: float) -> LevelResult:
    """Drives load at `level` until the windows are stable (module docstring)."""
    record, stop, tasks = _Record(), asyncio.Event(), []

    async def timed() -> None:
        began = time.perf_counter()
        try:
            await call()
            record.add(began, True)
        except Exception as error:  # noqa: BLE001 - counted, reported with the first message
            record.add(began, False, str(error))

    async def closed_loop_worker() -> None:
        while not stop.is_set():
            await timed()

    async def poisson_arrivals() -> None:
        rng = random.Random(0)
        next_at = time.perf_counter()
        while not stop.is_set():
            next_at += rng.expovariate(level)
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.ensure_future(timed()))

    drivers = ([asyncio.ensure_future(poisson_arrivals())] if config.mode == "request_rate"
               else [asyncio.ensure_future(closed_loop_worker()) for _ in range(int(level))])
    await asyncio.sleep(config.warmup_s)
    bounds = [time.perf_counter()]
    windows: list[tuple[float, np.ndarray, int]] = []
    stable = False
    while not stable and len(windows) < config.max_windows:
        await asyncio.sleep(config.window_s)
        bounds.append(time.perf_counter())
        windows.append(_stats(record, bounds[-2], bounds[-1]))
        last = windows[-STABLE_WINDOWS:]
        stable = (len(last) == STABLE_WINDOWS and all(len(w[1]) for w in last)
                  and _agree([w[0] for w in last], config.stability)
                  and _agree([float(np.percentile(w[1], 50)) for w in last], config.stability))
    stop.set()
    await asyncio.gather(*drivers, *tasks, return_exceptions=True)
    requests_per_s, latency, errors = _stats(record, bounds[-STABLE_WINDOWS - 1], bounds[-1])
    pct = (lambda q: float(np.percentile(latency, q))) if len(latency) else (lambda q: float("nan"))
    return LevelResult(level, requests_per_s, requests_per_s * config.batch, pct(50), pct(90), pct(95), pct(99),
                       float(latency.mean()) if len(latency) else float("nan"), errors, len(windows), stable,
                       record.first_error)


# ---- targets -----------------------------------------------------------------------------------
class GenserveTarget:
    """Requests through the genserve client; inputs drawn once per level, valid for the model."""

    def __init__(self, server: str, **client_options) -> None:
        from .client import AsyncClient

        self.client = AsyncClient(server, **client_options)

    async def prepare(self, config: BenchConfig) -> Callable[[], Awaitable]:
        info = await self.client.model(config.model)
        if config.method not in info.capabilities:
            raise ValueError(f"{config.model} has no {config.method} capability (it offers "
                             f"{', '.join(info.capabilities)})")
        rng = np.random.default_rng(0)
        n, c = config.batch, self.client
        labels = [0] * n if info.num_classes else None
        images = rng.integers(0, info.pixel_levels, (n, *info.image_shape), dtype=np.uint8)
        latents = rng.standard_normal((n, *info.latent_shape)).astype(np.float32)
        seeds = iter(range(1, 2**62))
        return {
            "sample": lambda: c.sample(config.model, n, seed=next(seeds)),
            "decode": lambda: c.decode(config.model, latents, labels=labels),
            "encode": lambda: c.encode(config.model, images),
            "score": lambda: c.score(config.model, images, labels=labels),
        }[config.method]

    async def close(self) -> None:
        await self.client.close()


class TritonTarget:
    """The same model's entry point on a Triton server, over KServe v2 (tritonclient.grpc.aio).

    A decoupled model (the streaming samplers) is called over ModelStreamInfer and timed to its
    final response. Inputs come from the Triton model's metadata: pixel values 0/1 (valid at any pixel depth),
    seeds and indices counting up, temperature 1, uniform `noise`, standard normal otherwise;
    free axes other than the batch get extent 1.
    """

    def __init__(self, url: str) -> None:
        import tritonclient.grpc.aio as triton

        self.triton = triton
        self.client = triton.InferenceServerClient(url)

    async def prepare(self, config: BenchConfig) -> Callable[[], Awaitable]:
        index = await self.client.get_model_repository_index(as_json=True)
        names = {m["name"] for m in index.get("models", [])}
        candidates = [f"{config.model}_{entry}" for entry in TRITON_ENTRIES[config.method]]
        name = next((c for c in candidates if c in names), None)
        if name is None:
            raise ValueError(f"Triton serves none of {', '.join(candidates)}")
        metadata = await self.client.get_model_metadata(name, as_json=True)
        rng, n = np.random.default_rng(0), config.batch
        inputs = []
        for spec in metadata["inputs"]:
            shape = [n] + [1 if d == -1 else int(d) for d in spec["shape"][1:]]
            if spec["datatype"] == "UINT8":
                value = rng.integers(0, 2, shape, dtype=np.uint8)
            elif spec["datatype"] == "INT64":
                value = np.zeros(shape, np.int64) if spec["name"] == "labels" else \
                    np.arange(n, dtype=np.int64).reshape(shape)
            elif spec["name"] == "temperature":
                value = np.ones(shape, np.float32)
            elif spec["name"] == "noise":
                value = rng.random(shape, dtype=np.float32)
            else:
                value = rng.standard_normal(shape).astype(np.float32)
            tensor = self.triton.InferInput(spec["name"], shape, spec["datatype"])
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        config_ = await self.client.get_model_config(name)
        if config_.config.model_transaction_policy.decoupled:  # a streaming sampler: one stream per call
            return lambda: self._stream_once(name, inputs)
        return lambda: self.client.infer(name, inputs)

    async def _stream_once(self, name: str, inputs: list) -> None:
        """One request on its own stream, read to its final response (the latency a caller sees)."""
        answered = asyncio.Event()

        async def requests():
            yield {"model_name": name, "inputs": inputs}
            await answered.wait()

        stream = self.client.stream_infer(requests())
        try:
            async for result, error in stream:
                if error is not None:
                    raise error
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return
        finally:
            answered.set()
            stream.cancel()

    async def close(self) -> None:
        await self.client.close()


async def run_bench(config: BenchConfig, target, progress: Callable[[str], None] = print) -> list[LevelResult]:
    try:
        call = await target.prepare(config)
        results = []
        for level in config.levels:
            progress(f"{config.mode.replace('_', ' ')} {level:g} ...")
            results.append(await measure_level(call, config, level))
        return results
    finally:
        await target.close()


# ---- output ------------------------------------------------------------------------------------
CSV_LEVEL = {"concurrency": "Concurrency", "request_rate": "Request Rate"}


def format_table(config: BenchConfig, results: list[LevelResult]) -> str:
    head = f"{CSV_LEVEL[config.mode]:>12} {'req/s':>9} {'infer/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p95 ms':>8} " \
           f"{'p99 ms':>8} {'errors':>6} stable"
    lines = [f"{config.model} {config.method}, batch {config.batch}", head]
    for r in results:
        lines.append(f"{r.level:>12g} {r.requests_per_s:>9.1f} {r.inferences_per_s:>9.1f} {r.p50_ms:>8.2f} "
                     f"{r.p90_ms:>8.2f} {r.p95_ms:>8.2f} {r.p99_ms:>8.2f} {r.errors:>6} "
                     f"{'yes' if r.stable else 'no'}")
    errors = [r for r in results if r.first_error]
    if errors:
        lines.append(f"first error: {errors[0].first_error}")
    return "\n".join(lines)


def write_csv(path: Path, config: BenchConfig, results: list[LevelResult]) -> None:
    """perf_analyzer's column names where they mean the same; latencies in microseconds, as it writes them."""
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([CSV_LEVEL[config.mode], "Inferences/Second", "Requests/Second", "p50 latency",
                         "p90 latency", "p95 latency", "p99 latency", "Avg latency", "Errors", "Stable"])
        for r in results:
            writer.writerow([f"{r.level:g}", f"{r.inferences_per_s:.2f}", f"{r.requests_per_s:.2f}",
                             *(round(v * 1e3) if np.isfinite(v) else "" for v in
                               (r.p50_ms, r.p90_ms, r.p95_ms, r.p99_ms, r.avg_ms)), r.errors, int(r.stable)])


def write_json(path: Path, config: BenchConfig, results: list[LevelResult], target: str) -> None:
    path.write_text(json.dumps({"config": {**asdict(config), "mode": config.mode, "target": target},
                                "results": [asdict(r) for r in results]}, indent=2))


def write_plot(path: Path, config: BenchConfig, results: list[LevelResult], target: str) -> None:
    """p50 and p99 latency against throughput, each point labelled with its load level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    throughput = [r.inferences_per_s for r in results]
    for name, values, style in (("p50", [r.p50_ms for r in results], "o-"), ("p99", [r.p99_ms for r in results],
                                                                            "s--")):
        axes.plot(throughput, values, style, label=name)
    for r in results:
        axes.annotate(f"{r.level:g}", (r.inferences_per_s, r.p50_ms), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
    axes.set_xlabel("throughput (inferences/s)")
    axes.set_ylabel("latency (ms)")
    axes.set_title(f"{config.model} {config.method} via {target}\nbatch {config.batch}, "
                   f"points labelled with their {CSV_LEVEL[config.mode].lower()}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
