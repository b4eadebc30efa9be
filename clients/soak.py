"""`genserve soak`: mixed valid and invalid traffic at a concurrency for a duration.

Workers draw requests from a fixed mix (valid calls of every capability each served model has,
and client mistakes of every kind), send them, and record the status and latency. Meanwhile the
resident memory of the given processes is sampled. The report says how many requests ended in
which status, the latency of the valid ones, and the memory at start, peak and end; a soak
fails if any request ended INTERNAL or UNKNOWN, or a valid request was refused as a mistake; valid
requests that meet DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED (more load than the server can take)
are counted and reported.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from genserve.v1 import generative_pb2 as pb
from genserve.v1 import generative_pb2_grpc as pb_grpc

from .wire import to_tensor

SERVER_FAULTS = ("INTERNAL", "UNKNOWN")
OVERLOAD = ("DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")  # a valid request may meet these when the load is too high


@dataclass(frozen=True)
class SoakConfig:
    server: str
    duration_s: float = 300.0
    concurrency: int = 64
    invalid_fraction: float = 0.3  # share of requests that are client mistakes
    timeout_s: float = 60.0  # per request
    pids: tuple[int, ...] = ()  # processes whose resident memory is sampled (the server, Triton, ...)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.concurrency < 1 or self.timeout_s <= 0:
            raise ValueError(f"need duration_s > 0, concurrency >= 1, timeout_s > 0; got {self.duration_s}, "
                             f"{self.concurrency}, {self.timeout_s}")
        if not 0 <= self.invalid_fraction <= 1:
            raise ValueError(f"invalid_fraction must lie in [0, 1], got {self.invalid_fraction}")


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix: which RPC, whether it is valid, and how to make one."""

    name: str
    method: str
    valid: bool
    make: Callable[[random.Random], object]  # a request message, or raw bytes that parse as none


@dataclass
class SoakReport:
    requests: int = 0
    seconds: float = 0.0
    codes: dict[str, int] = field(default_factory=dict)  # every request, by status code
    valid_codes: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    valid_p50_ms: float = float("nan")
    valid_p99_ms: float = float("nan")
    rss_mb: dict[str, dict[str, float]] = field(default_factory=dict)  # pid → start, peak, end

    @property
    def passed(self) -> bool:
        """No server fault, and no valid request refused as a mistake (overload codes are reported, not failed)."""
        faults = sum(self.codes.get(c, 0) for c in SERVER_FAULTS)
        return faults == 0 and set(self.valid_codes) <= {"OK", *OVERLOAD}

    def table(self) -> str:
        lines = [f"{self.requests} requests in {self.seconds:.0f} s ({self.requests / max(self.seconds, 1e-9):.1f}/s); "
                 f"valid p50 {self.valid_p50_ms:.1f} ms, p99 {self.valid_p99_ms:.1f} ms",
                 "codes: " + ", ".join(f"{c} {n}" for c, n in sorted(self.codes.items())),
                 "valid requests: " + ", ".join(f"{c} {n}" for c, n in sorted(self.valid_codes.items()))]
        lines += [f"  {kind:<34} " + ", ".join(f"{c} {n}" for c, n in sorted(codes.items()))
                  for kind, codes in sorted(self.by_kind.items())]
        lines += [f"RSS of pid {pid}: start {m['start']:.0f} MB, peak {m['peak']:.0f} MB, end {m['end']:.0f} MB"
                  for pid, m in self.rss_mb.items()]
        lines.append("PASS" if self.passed else "FAIL: server faults, or valid requests refused as mistakes, above")
        return "\n".join(lines)

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps({**asdict(self), "passed": self.passed}, indent=2) + "\n")


def resident_mb(pid: int) -> float:
    """VmRSS of a process on this machine, in MB (NaN once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _images(info: pb.ModelInfo, n: int, rng: random.Random) -> pb.Tensor:
    gen = np.random.default_rng(rng.getrandbits(32))
    return to_tensor(gen.integers(0, info.pixel_levels, (n, *info.image_shape)), np.uint8)


def _latents(info: pb.ModelInfo, n: int, rng: random.Random) -> pb.Tensor:
    gen = np.random.default_rng(rng.getrandbits(32))
    return to_tensor(gen.standard_normal((n, *info.latent_shape)), np.float32)


def _labels(info: pb.ModelInfo, n: int) -> list[int]:
    return list(range(n)) if info.HasField("num_classes") and info.num_classes else []


def traffic(models: list[pb.ModelInfo]) -> list[Kind]:
    """The mix: a valid call of every capability of every model, and every kind of client mistake."""
    kinds = []
    for info in models:
        m = info.name
        caps = {pb.Capability.Name(c) for c in info.capabilities}
        # one sample is hundreds of steps (a WaveNet clip thousands)
        sequential = info.family in ("pixelcnn", "gated_pixelcnn", "wavenet")
        if "CAPABILITY_SAMPLE" in caps:
            kinds.append(Kind(f"{m} sample", "Sample", True, lambda r, m=m, info=info, s=sequential: pb.SampleRequest(
                model=m, num_samples=1 if s else r.randint(1, 4), seed=r.getrandbits(32),
                labels=_labels(info, 1)[:1])))
        if "CAPABILITY_ENCODE" in caps:
            kinds.append(Kind(f"{m} encode", "Encode", True, lambda r, m=m, info=info: pb.EncodeRequest(
                model=m, images=_images(info, r.randint(1, 8), r))))
        if "CAPABILITY_DECODE" in caps:
            kinds.append(Kind(f"{m} decode", "Decode", True, lambda r, m=m, info=info: pb.DecodeRequest(
                model=m, latents=_latents(info, 2, r), labels=_labels(info, 2))))
        if "CAPABILITY_SCORE" in caps:
            kinds.append(Kind(f"{m} score", "Score", True, lambda r, m=m, info=info: pb.ScoreRequest(
                model=m, images=_images(info, r.randint(1, 8), r), labels=_labels(info, 1)[:1],
                seed=r.getrandbits(32))))
        if info.family == "vae":  # the heaviest valid request: 4 images x 1000 importance samples
            kinds.append(Kind(f"{m} score K=1000", "Score", True, lambda r, m=m, info=info: pb.ScoreRequest(
                model=m, images=_images(info, 4, r), importance_samples=1000)))
            kinds.append(Kind(f"{m} score over the K budget", "Score", False, lambda r, m=m, info=info: pb.ScoreRequest(
                model=m, images=_images(info, 100, r), importance_samples=1000)))
    sampler = next(i.name for i in models if pb.CAPABILITY_SAMPLE in i.capabilities)
    scorer = next(i.name for i in models if pb.CAPABILITY_SCORE in i.capabilities)
    kinds += [
        Kind("unknown model", "Sample", False, lambda r: pb.SampleRequest(model="no-such-model", num_samples=1)),
        Kind("too many samples", "Sample", False, lambda r: pb.SampleRequest(model=sampler, num_samples=10**6)),
        Kind("NaN temperature", "Sample", False, lambda r: pb.SampleRequest(model=sampler, num_samples=1,
                                                                            temperature=float("nan"))),
        Kind("wrong image shape", "Score", False, lambda r: pb.ScoreRequest(
            model=scorer, images=to_tensor(np.zeros((1, 1, 5, 5)), np.uint8))),
        Kind("shape overflowing 64 bits", "Score", False, lambda r: pb.ScoreRequest(
            model=scorer, images=pb.Tensor(shape=[2**60, 1, 28, 28], dtype=pb.DATA_TYPE_UINT8))),
        Kind("wrong byte length", "Score", False, lambda r: pb.ScoreRequest(
            model=scorer, images=pb.Tensor(shape=[1, 1, 28, 28], dtype=pb.DATA_TYPE_UINT8, data=b"\0" * 7))),
        Kind("bytes that are no message", "Score", False, lambda r: b"\xff"),
    ]
    return kinds


class _Recorder:
    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self.valid_codes: Counter[str] = Counter()
        self.by_kind: dict[str, Counter[str]] = {}
        self.valid_latencies: list[float] = []

    def add(self, kind: Kind, code: str, seconds: float) -> None:
        self.codes[code] += 1
        self.by_kind.setdefault(kind.name, Counter())[code] += 1
        if kind.valid:
            self.valid_codes[code] += 1
            self.valid_latencies.append(seconds)


async def _send(channel: grpc.aio.Channel, stub, kind: Kind, request, timeout: float) -> str:
    try:
        if isinstance(request, bytes):  # raw bytes on the method's path: no serializer can make them
            call = channel.unary_unary(f"/genserve.v1.Generative/{kind.method}")
            await call(request, timeout=timeout)
        else:
            await getattr(stub, kind.method)(request, timeout=timeout)
        return "OK"
    except grpc.aio.AioRpcError as error:
        return error.code().name


async def run_soak(config: SoakConfig, progress: Callable[[str], None] = print) -> SoakReport:
    """Runs the soak against `config.server` and returns its report."""
    async with grpc.aio.insecure_channel(config.server, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)]) as channel:
        stub = pb_grpc.GenerativeStub(channel)
        models = list((await stub.ListModels(pb.ListModelsRequest(), timeout=config.timeout_s)).models)
        kinds = traffic(models)
        valid, invalid = [k for k in kinds if k.valid], [k for k in kinds if not k.valid]
        recorder = _Recorder()
        rss = {pid: [resident_mb(pid)] for pid in config.pids}
        start = time.monotonic()
        end = start + config.duration_s

        async def worker(index: int) -> None:
            rng = random.Random(config.seed * 1_000_003 + index)
            while time.monotonic() < end:
                kind = rng.choice(invalid if rng.random() < config.invalid_fraction else valid)
                sent = time.perf_counter()
                code = await _send(channel, stub, kind, kind.make(rng), config.timeout_s)
                recorder.add(kind, code, time.perf_counter() - sent)

        async def sample_memory() -> None:
            next_report = start + 30
            while time.monotonic() < end:
                await asyncio.sleep(0.5)
                for pid in config.pids:
                    rss[pid].append(resident_mb(pid))
                if time.monotonic() >= next_report:
                    next_report += 30
                    faults = sum(recorder.codes.get(c, 0) for c in SERVER_FAULTS)
                    progress(f"{time.monotonic() - start:5.0f} s: {sum(recorder.codes.values())} requests, "
                             f"{faults} server faults" + "".join(f", pid {p} {rss[p][-1]:.0f} MB" for p in rss))

        await asyncio.gather(sample_memory(), *(worker(i) for i in range(config.concurrency)))
        seconds = time.monotonic() - start
    for pid in config.pids:
        rss[pid].append(resident_mb(pid))
    latencies = np.asarray(recorder.valid_latencies) * 1000
    return SoakReport(
        requests=sum(recorder.codes.values()), seconds=seconds, codes=dict(recorder.codes),
        valid_codes=dict(recorder.valid_codes), by_kind={k: dict(v) for k, v in recorder.by_kind.items()},
        valid_p50_ms=float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        valid_p99_ms=float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
        rss_mb={str(pid): {"start": v[0], "peak": float(np.nanmax(v)), "end": v[-1]} for pid, v in rss.items()},
    )
