"""Where the sampling engine's time goes on a CUDA device, for whole batches of a shipped sampler.

`python deploy/gpu/profile_engine.py [MODEL] --batch N ...` (after `genserve export`; check.sh runs
it) samples warm batches through the engine on its fused operators and reports, per batch size:
- wall: one batch, ms per image and images/s;
- GPU: the time of every kernel the next batch launched (torch.profiler), and so the share of the
  wall time in which the GPU had nothing to run (the host's share);
- the host functions that took the most time in one more batch (cProfile, by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch
from profile_fused import reporter  # this folder's: the scripts run as files

from genserve.serving.artifacts import load_manifest
from genserve.serving.engine import EngineConfig, FusedStepRunner, SamplingEngine, load_step_runner


def gpu_ms(call) -> float:
    """Milliseconds of GPU kernel and copy time that `call` causes."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(event.time_range.elapsed_us() for event in prof.events()
               if event.device_type == torch.autograd.DeviceType.CUDA) / 1e3


def profile_batch(runner, n: int, top: int, report) -> None:
    engine = SamplingEngine(runner, EngineConfig(num_slots=n))
    engine.generate(0, n)  # compiles kernels, captures graphs
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(1, n)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1e3
    gpu = gpu_ms(lambda: engine.generate(2, n))
    report(f"batch {n}: {wall:.1f} ms per batch, {wall / n:.3f} ms per image, {n / wall * 1e3:.0f} images/s; "
           f"GPU busy {gpu:.1f} ms, idle {max(0.0, 1 - gpu / wall):.0%} of the wall time")
    profiler = cProfile.Profile()
    profiler.runcall(engine.generate, 3, n)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    report("\n".join(line for line in text.getvalue().splitlines()[4:] if line.strip()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="gated_pixelcnn_mnist")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--batch", type=int, action="append", help="default: 1, 4096")
    parser.add_argument("--top", type=int, default=12, help="host functions listed per batch size")
    parser.add_argument("--out", type=Path, help="also append the lines to this file")
    args = parser.parse_args()
    report = reporter(args.out)
    runner = load_step_runner(load_manifest(args.repository / f"{args.model}_sample"), "torchscript", "cuda")
    if not isinstance(runner, FusedStepRunner):
        raise SystemExit(f"{args.model}: the fused operators do not run on cuda here")
    report(f"{args.model} on {torch.cuda.get_device_name()}, fused operators in the engine")
    for n in args.batch or [1, 4096]:
        profile_batch(runner, n, args.top, report)


if __name__ == "__main__":
    main()
