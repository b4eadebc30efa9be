"""The sampler benchmark: naive vs cached vs fused sampling, and continuous vs static batching.

Everything is measured side by side in one run on the same artifacts and runtime, because
these machines are noisy: ratios taken minutes apart mean little.
- naive: the exported full-network `logits` graph, one pass per pixel over the whole image
  (what `model.sample` does), timed over a prefix of `naive_steps` pixels and scaled to the
  whole image (each naive pass costs the same wherever it is in the image). One pass (naive
  ÷ pixels) is the yardstick: cached sampling does the arithmetic of about one full pass;
- step: the exported step graphs in the sampling engine, whole images (the median of repeated
  batches over at least a second: `time_cached`);
- fused: the fused operators (serving/fused) in the same engine, where built for the device;
- batching: requests of 1..max_request_size samples arriving as a Poisson process at a fixed
  rate (the same arrival schedule for both modes), served by an engine that admits at every
  step (continuous) or only into an empty engine (static), on the fused operators where they
  run (else the step graphs); per-request latency percentiles and throughput. Beside them, the
  same trace through the engine's schedulers in simulated time with every step call costing the
  full static batch's (batching_model): the most admission alone can gain on this trace.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts import load_manifest, sample_rate
from ..entry_runner import onnx_session
from ..kernels.sampling import choose_pixels
from .batching_model import ModelledBatching, modelled_batching
from .core import EngineConfig, SamplingEngine
from .program import StepRunner, fused_unavailable, load_step_runner


@dataclass(frozen=True)
class BenchConfig:
    model: str = "gated_pixelcnn_mnist"
    repository: str = "model_repository"
    runtime: str = "onnx"  # onnx or torchscript
    device: str = "cpu"  # torchscript only: cpu or cuda
    batches: tuple[int, ...] = (1, 16, 64)
    naive_steps: int = 28  # naive passes timed per batch size (one 28-pixel row by default)
    min_seconds: float = 1.0  # engine timings repeat whole batches for this long, at least once (median)
    slots: int = 16  # engine slots for the batching comparison
    requests: int = 40
    max_request_size: int = 4
    load: float = 0.5  # arrival rate as a fraction of the measured static-batch capacity
    seed: int = 0
    fused: bool = True  # also time the fused operators, and batch on them, where they run

    def __post_init__(self) -> None:
        bad = {k: v for k, v in (("naive_steps", self.naive_steps), ("slots", self.slots),
                                 ("requests", self.requests), ("max_request_size", self.max_request_size))
               if v < 1}
        if bad or not self.batches or min(self.batches) < 1:
            raise ValueError(f"counts must be >= 1, got {bad or {'batches': self.batches}}")
        if not self.min_seconds >= 0:
            raise ValueError(f"min_seconds must be >= 0, got {self.min_seconds}")
        if not 0 < self.load <= 1:
            raise ValueError(f"load must lie in (0, 1], got {self.load}")


@dataclass
class SpeedupRow:
    batch: int
    full_pass_ms_per_image: float  # one full-network pass: naive ÷ pixels
    naive_ms_per_image: float  # scaled from naive_steps passes
    step_ms_per_image: float  # the exported step graphs in the engine
    step_speedup: float  # naive ÷ step
    step_passes: float  # step ÷ one full pass
    fused_ms_per_image: float | None = None  # None where the fused operators do not run
    fused_vs_step: float | None = None  # step ÷ fused
    fused_passes: float | None = None  # fused ÷ one full pass
    fused_images_per_s: float | None = None
    real_time_factor: float | None = None  # audio: seconds of audio per second of compute, on the fastest runner


@dataclass
class BatchingRow:
    batching: str
    p50_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float
    requests: int


@dataclass
class BenchReport:
    config: dict
    machine: dict
    speedup: list[SpeedupRow] = field(default_factory=list)
    capacity_images_per_s: float = 0.0
    arrival_rate_requests_per_s: float = 0.0
    batching_runner: str = ""  # "fused operators" or "step graphs"
    batching: list[BatchingRow] = field(default_factory=list)
    # The same arrivals through the schedulers with every call at the full static batch's cost
    # (batching_model): what admission alone can gain, beside what was measured.
    modelled_call_ms: float = 0.0
    modelled_batching: list[ModelledBatching] = field(default_factory=list)
    out_of_memory_at: int | None = None  # the first batch size that did not fit; larger ones were not tried

    def to_dict(self) -> dict:
        return asdict(self)


class NaiveSampler:
    """The full-network graph of the same model in the same runtime, driven one pixel at a time.

    PixelCNNs and a PixelVAE's decoder: the `logits` graph, a pixel chosen from each pass. A MAF:
    its `encode` graph, one pass of every layer, which is what its naive inverse runs per pixel
    (each layer's MADE once); the values it computes are not used.
    """

    def __init__(self, folder: Path, runtime: str, device: str) -> None:
        manifest = load_manifest(folder)
        self.inputs = manifest.inputs
        self.chooses = manifest.outputs[0].name == "logits"
        self.num_classes = manifest.model_config.get("num_classes")
        self.device = torch.device(device)
        if runtime == "onnx":
            session = onnx_session(manifest.artifact("model.onnx"))
            def forward(feeds):
                return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])

            self.forward = forward
        else:
            module = torch.jit.load(str(manifest.artifact("model.pt")), map_location=device).eval()
            self.forward = lambda feeds: module(*feeds.values())

    @torch.inference_mode()
    def time_passes(self, noise: torch.Tensor, steps: int) -> float:
        """Seconds for the first `steps` pixels of naive sampling at batch len(noise).

        noise: (n, C, ...) in any layout of the sample's values (raster order when flattened).
        """
        n, channels = noise.shape[:2]
        x = torch.zeros((n, *self.inputs[0].shape), dtype=torch.uint8, device=self.device)  # (n, C, H, W) or (n, C, T)
        g = torch.Generator().manual_seed(n)
        feeds = {"images": x}
        for spec in self.inputs[1:]:  # in the graph's order, after the images
            if spec.name == "labels":
                feeds["labels"] = (torch.arange(n, device=self.device) % self.num_classes).view(n, 1)
            elif spec.name == "z":  # a PixelVAE's decoder: z ~ N(0, I), as Sample draws it
                feeds["z"] = torch.randn(n, *spec.shape, generator=g).to(self.device)
            else:  # a flow's dequantisation noise
                feeds[spec.name] = torch.rand(n, *spec.shape, generator=g).to(self.device)
        noise, values = noise.to(self.device).reshape(n, channels, -1), x.view(n, channels, -1)
        _sync(self.device)
        start = time.perf_counter()
        for position in range(steps):
            out = self.forward(feeds)
            if self.chooses:
                logits = out.reshape(n, out.shape[1], channels, -1)[..., position]  # (n, L, C)
                values[:, :, position] = choose_pixels(logits, noise[:, :, position], 1.0).to(torch.uint8)
        _sync(self.device)
        return time.perf_counter() - start


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _conditions(runner: StepRunner, seed: int, n: int) -> dict:
    """The labels and latents `n` samples of the runner's program need (none for most)."""
    classes, shape = runner.spec.num_classes, runner.spec.latent_shape
    latents = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).numpy() if shape else None
    return {"labels": [k % classes for k in range(n)] if classes else None, "latents": latents}


def time_cached(runner: StepRunner, batch: int, seed: int, min_seconds: float = 1.0) -> float:
    """Seconds to sample `batch` whole images with `batch` engine slots: the median over repeated
    batches, as many as run in `min_seconds` (at least one). One batch-1 image takes milliseconds
    on a CPU, where a single timing moved by a third between runs on these shared machines."""
    engine = SamplingEngine(runner, EngineConfig(num_slots=batch))
    engine.generate(seed, batch, **_conditions(runner, seed, batch))  # warm-up (allocations, graph optimisation)
    times: list[float] = []
    while not times or sum(times) < min_seconds:
        conditions = _conditions(runner, seed + 1 + len(times), batch)
        _sync(runner.device)
        start = time.perf_counter()
        engine.generate(seed + 1 + len(times), batch, **conditions)
        _sync(runner.device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def serve_poisson(runner: StepRunner, batching: str, slots: int, arrivals: list[tuple[float, int]]) -> BatchingRow:
    """Submits requests at the given (offset seconds, size) times to a running engine; waits for all."""
    engine = SamplingEngine(runner, EngineConfig(num_slots=slots, batching=batching))
    engine.start()
    jobs = []
    try:
        start = time.monotonic()
        for k, (offset, size) in enumerate(arrivals):
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            jobs.append(engine.submit(k, size, **_conditions(runner, k, size)))
        for job in jobs:
            job.wait()
    finally:
        engine.stop()
    ms = np.array([job.latency for job in jobs]) * 1e3
    elapsed = max(job.finished_at for job in jobs) - start
    return BatchingRow(batching, round(float(np.percentile(ms, 50)), 1), round(float(np.percentile(ms, 99)), 1),
                       round(float(ms.mean()), 1), round(sum(job.count for job in jobs) / elapsed, 2), len(jobs))


def run_benchmark(config: BenchConfig, progress=print) -> BenchReport:
    """Runs both comparisons; `progress` gets a line before each long measurement."""
    import platform

    repository = Path(config.repository)
    sampler = repository / f"{config.model}_sample"
    if not (sampler / "genserve.json").exists():
        raise FileNotFoundError(f"{sampler}: no sampling model there; export {config.model} into {repository} first")
    manifest = load_manifest(sampler)
    graphs = load_step_runner(manifest, config.runtime, config.device, fused=False)
    why_not_fused = fused_unavailable(manifest, config.device) if config.fused else "not asked for (--no-fused)"
    fused = None if why_not_fused else load_step_runner(manifest, config.runtime, config.device)
    runner = fused or graphs  # what the batching comparison runs on
    full_pass = repository / f"{config.model}_logits"
    naive = NaiveSampler(full_pass if full_pass.exists() else repository / f"{config.model}_encode", config.runtime,
                         config.device)
    report = BenchReport(config=asdict(config), machine={
        "cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "cpu": _cpu_name(),
        "device": torch.cuda.get_device_name() if graphs.device.type == "cuda" else "cpu",
        "fused": why_not_fused or "fused operators timed",
    })
    audio_rate = sample_rate(manifest.model_config)  # None: images
    for batch in config.batches:
        progress(f"naive vs step vs fused at batch {batch} ...")
        try:
            report.speedup.append(_speedup_row(config, naive, graphs, fused, batch, audio_rate))
        except torch.OutOfMemoryError:  # batch sizes go up: neither this one nor the larger ones fit
            progress(f"batch {batch}: out of {config.device} memory; larger batch sizes skipped")
            report.out_of_memory_at = batch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break

    report.batching_runner = "fused operators" if fused is not None else "step graphs"
    progress(f"static batch of {config.slots} on the {report.batching_runner}: capacity ...")
    static_batch_s = time_cached(runner, config.slots, config.seed, config.min_seconds)
    report.capacity_images_per_s = round(config.slots / static_batch_s, 2)
    rng = random.Random(config.seed)
    mean_size = (1 + config.max_request_size) / 2
    rate = config.load * report.capacity_images_per_s / mean_size  # requests per second
    report.arrival_rate_requests_per_s = round(rate, 3)
    arrivals, t = [], 0.0
    for _ in range(config.requests):
        t += rng.expovariate(rate)
        arrivals.append((t, rng.randint(1, config.max_request_size)))
    for batching in ("static", "continuous"):
        progress(f"{batching} batching: {config.requests} Poisson arrivals at {rate:.2f} requests/s ...")
        report.batching.append(serve_poisson(runner, batching, config.slots, arrivals))
    calls_per_sample = runner.spec.length // runner.spec.span
    call_s = static_batch_s / calls_per_sample
    report.modelled_call_ms = round(call_s * 1e3, 3)
    report.modelled_batching = modelled_batching(arrivals, config.slots, calls_per_sample, call_s)
    return report


def _speedup_row(config: BenchConfig, naive: NaiveSampler, graphs: StepRunner, fused: StepRunner | None,
                 batch: int, audio_rate: int | None) -> SpeedupRow:
    """Naive vs step graphs vs fused at one batch size."""
    length = graphs.spec.length
    steps = min(config.naive_steps, length)
    noise = torch.rand(batch, *graphs.spec.sample_shape, generator=torch.Generator().manual_seed(batch))
    # Warm-up over several passes: TorchScript specialises a graph over its first calls. After one
    # warm-up pass, an H200 timed 88.6 ms per pass at batch 1 against 5 ms per pass at batch 256.
    naive.time_passes(noise, 3)
    naive_ms = naive.time_passes(noise, steps) * (length / steps) / batch * 1e3
    pass_ms = naive_ms / length
    step_ms = time_cached(graphs, batch, config.seed, config.min_seconds) / batch * 1e3
    row = SpeedupRow(batch, round(pass_ms, 3), round(naive_ms, 1), round(step_ms, 2),
                     round(naive_ms / step_ms, 1), round(step_ms / pass_ms, 2))
    if fused is not None:
        fused_ms = time_cached(fused, batch, config.seed, config.min_seconds) / batch * 1e3
        row.fused_ms_per_image, row.fused_vs_step = round(fused_ms, 2), round(step_ms / fused_ms, 1)
        row.fused_passes, row.fused_images_per_s = round(fused_ms / pass_ms, 2), round(1e3 / fused_ms, 1)
    if audio_rate is not None:
        clip_seconds = length / audio_rate
        row.real_time_factor = round(clip_seconds / (min(step_ms, row.fused_ms_per_image or step_ms) / 1e3), 3)
    return row


def format_report(report: BenchReport) -> str:
    c = report.config
    m = report.machine
    lines = [
        f"model {c['model']} · runtime {c['runtime']} on {m['device']} ({m['cpu']}, "
        f"{m['cpu_threads']} CPU threads) · fused: {m['fused']}",
        f"naive = full-network pass per pixel, timed over the first {c['naive_steps']} pixels and scaled "
        "to the whole image; pass = one full pass (naive ÷ pixels); step = the exported step graphs in "
        "the engine; fused = the fused operators in the engine; whole images, ms per image",
        "",
        f"{'batch':>5}  {'pass':>7}  {'naive':>9}  {'step':>8}  {'naive/step':>10}  {'step/pass':>9}  "
        f"{'fused':>7}  {'step/fused':>10}  {'fused/pass':>10}  {'images/s':>8}",
    ]
    for r in report.speedup:
        line = (f"{r.batch:>5}  {r.full_pass_ms_per_image:>7.2f}  {r.naive_ms_per_image:>9.1f}  "
                f"{r.step_ms_per_image:>8.2f}  {r.step_speedup:>9.1f}x  {r.step_passes:>8.2f}x")
        if r.fused_ms_per_image is not None:
            line += (f"  {r.fused_ms_per_image:>7.2f}  {r.fused_vs_step:>9.1f}x  {r.fused_passes:>9.2f}x  "
                     f"{r.fused_images_per_s:>8.1f}")
        lines.append(line)
    if report.out_of_memory_at is not None:
        lines.append(f"batch {report.out_of_memory_at} ran out of {c['device']} memory: the largest that fits is "
                     "the last above")
    audio = [r for r in report.speedup if r.real_time_factor is not None]
    if audio:
        best = max(audio, key=lambda r: r.real_time_factor)
        lines += ["", "real-time factor (seconds of audio per second of compute): " + ", ".join(
            f"{r.real_time_factor:.3f} at batch {r.batch}" for r in audio) + f"; best at batch {best.batch}"]
    lines += [
        "",
        f"Poisson arrivals: {c['requests']} requests of 1..{c['max_request_size']} samples at "
        f"{report.arrival_rate_requests_per_s} requests/s ({c['load']:.0%} of the static capacity "
        f"{report.capacity_images_per_s} images/s), {c['slots']} slots, on the {report.batching_runner}",
        f"{'batching':>10}  {'p50 ms':>9}  {'p99 ms':>9}  {'mean ms':>9}  {'images/s':>8}",
    ]
    lines += [f"{r.batching:>10}  {r.p50_ms:>9.1f}  {r.p99_ms:>9.1f}  {r.mean_ms:>9.1f}  {r.images_per_s:>8.2f}"
              for r in report.batching]
    by_mode = {r.batching: r for r in report.batching}
    if {"static", "continuous"} <= set(by_mode):
        s, k = by_mode["static"], by_mode["continuous"]
        lines.append(f"continuous vs static: p50 {s.p50_ms / k.p50_ms:.2f}x lower, p99 {s.p99_ms / k.p99_ms:.2f}x "
                     f"lower, throughput {k.images_per_s / s.images_per_s:.2f}x")
    modelled = {r.batching: r for r in report.modelled_batching}
    if {"static", "continuous"} <= set(modelled):
        s, k = modelled["static"], modelled["continuous"]
        lines.append(f"the same arrivals modelled with every call at {report.modelled_call_ms:.3f} ms whatever the "
                     f"occupancy (a GPU's case): static p50 {s.p50_ms:.1f} / p99 {s.p99_ms:.1f} ms, continuous "
                     f"{k.p50_ms:.1f} / {k.p99_ms:.1f} ms: p50 {s.p50_ms / k.p50_ms:.2f}x lower, p99 "
                     f"{s.p99_ms / k.p99_ms:.2f}x (the most admission alone gains on this trace)")
    return "\n".join(lines)

