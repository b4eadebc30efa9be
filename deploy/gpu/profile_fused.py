"""Where a fused row call's time goes on a CUDA device, per batch size and launch variant.

`python deploy/gpu/profile_fused.py [MODEL ...]` (after `genserve export`; check.sh runs it) times,
for each shipped sampler's fused operators and each launch variant (warps and slots per program),
one row call (refresh + `span` pixels) with every slot
at a row start, three ways:
- wall: the call as the engine makes it, synchronised, median over repeats;
- kernels: the GPU time of each kernel it launches (torch.profiler), per call;
- graph: the same call captured once in a CUDA graph and replayed (what graph capture would save).
Variants: warps and slots per program of the Triton kernels, the step on the resident kernels
(csrc/gated_resident.cuh, csrc/pixelcnn_resident.cuh) at a number of threads per block, the Gated refresh
split in two launches.
From these it derives ms per image (rows per image × row time ÷ batch) and images/s. Rows print
as they are measured, so a run cut short still reports what it finished.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from genserve.serving import fused
from genserve.serving.artifacts import load_manifest
from genserve.serving.engine import FusedStepRunner, load_step_runner
from genserve.serving.fused import triton_ops


def row_call_inputs(runner: FusedStepRunner, n: int, row: int, seed: int = 0):
    """Feeds and states of `n` slots all starting image row `row`, drawn at random."""
    spec, device = runner.spec, runner.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    width = spec.sample_shape[-1]
    feeds = {
        "pixels": torch.randint(0, spec.levels, (n, *spec.sample_shape), generator=g, dtype=torch.uint8),
        "positions": torch.full((n, 1), row * width, dtype=torch.int64),
        "labels": torch.randint(0, spec.num_classes, (n, 1), generator=g) if spec.num_classes else None,
        "noise": torch.rand(n, spec.span, spec.sample_shape[0], generator=g),
        "temperature": torch.ones(n, 1),
    }
    feeds = {k: v.to(device) if v is not None else None for k, v in feeds.items()}
    states = [torch.randn(n, *s.shape, generator=g).to(s.dtype.torch).to(device) for s in spec.states]
    return feeds, states


def wall_us(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def kernel_us(call, repeats: int) -> dict[str, float]:
    """GPU microseconds per call of each kernel the call launches."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            call()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name[:40]] += event.time_range.elapsed_us() / repeats
    return dict(per_kernel)


def graph_us(call, repeats: int) -> float:
    """Microseconds per replay of the call captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # allocations and compilation before capture
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats


DEFAULTS = dict(triton_ops.WARPS), triton_ops.SLOTS_PER_PROGRAM, triton_ops.RESIDENT_THREADS


def apply_variant(variant: str, slots: int) -> None:
    """Sets triton_ops' launch switches for a variant of calls of up to `slots` slots: parts joined by '+',
    each "default" (each kernel's own warps), WARPSxSLOTS (warps and slots per program of every Triton
    kernel), residentTHREADS (the step on the resident kernels, THREADS per block, default 256) or
    "split" (the Gated refresh in two launches, its cache part first, a program per layer)."""
    triton_ops.WARPS, triton_ops.SLOTS_PER_PROGRAM = dict(DEFAULTS[0]), DEFAULTS[1]
    triton_ops.RESIDENT_STEP_SLOTS, triton_ops.RESIDENT_THREADS, triton_ops.SPLIT_REFRESH_SLOTS = 0, DEFAULTS[2], 0
    for part in variant.split("+"):
        if part.startswith("resident"):
            triton_ops.RESIDENT_STEP_SLOTS = slots
            triton_ops.RESIDENT_THREADS = int(part.removeprefix("resident") or DEFAULTS[2])
        elif part == "split":
            triton_ops.SPLIT_REFRESH_SLOTS = slots
        elif part != "default":
            warps, per_program = (int(v) for v in part.split("x"))
            triton_ops.WARPS, triton_ops.SLOTS_PER_PROGRAM = dict.fromkeys(DEFAULTS[0], warps), per_program


RESIDENT_OPS = {"gated_step": "gated_step_resident", "pixelcnn_step": "pixelcnn_step_resident"}


def profile_model(name: str, repository: Path, batches: list[int], variants: list[str], report) -> None:
    runner = load_step_runner(load_manifest(repository / f"{name}_sample"), "torchscript", "cuda")
    if not isinstance(runner, FusedStepRunner):
        report(f"{name}: the fused operators do not run on cuda here")
        return
    spec = runner.spec
    rows_per_image = spec.length // spec.span
    report(f"\n{name}: {rows_per_image} row calls per image, {spec.span} pixels each ({torch.cuda.get_device_name()})")
    report(f"{'variant':>7} {'batch':>5} {'wall us':>9} {'graph us':>9} {'kernels us':>10}  "
           f"{'ms/image wall':>13} {'ms/image graph':>14} {'images/s graph':>14}  kernels (us per call)")
    resident_op = RESIDENT_OPS.get(runner.op.step)
    for variant in variants:
        if "split" in variant.split("+") and runner.op.step != "gated_step":
            continue  # only the Gated refresh splits: the same calls as without it
        apply_variant(variant, max(batches))
        if triton_ops.RESIDENT_STEP_SLOTS and not (resident_op and triton_ops.has_resident_step(resident_op,
                                                                                            runner.device)):
            report(f"{variant}: no resident step kernel loaded ({fused.load_ops().reason})")
            continue
        for n in batches:
            feeds, states = row_call_inputs(runner, n, row=14)

            call = functools.partial(runner.run_row, feeds, states)  # launched: graph_us captures it
            call()  # compiles this variant
            repeats = 50 if n <= 64 else 10
            wall = wall_us(call, repeats)
            kernels = kernel_us(call, repeats)
            try:
                graph = graph_us(call, repeats)
            except Exception as error:  # report and go on: the other figures stand without it
                report(f"  graph capture failed at batch {n}: {type(error).__name__}: {error}")
                graph = float("nan")
            per_image = rows_per_image / n / 1e3
            report(f"{variant:>7} {n:>5} {wall:>9.1f} {graph:>9.1f} {sum(kernels.values()):>10.1f}  "
                   f"{wall * per_image:>13.3f} {graph * per_image:>14.3f} {1e3 / (graph * per_image):>14.0f}  "
                   + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:4]))


def reporter(out: Path | None):
    """A function that prints a line as soon as it is measured and, with `out`, appends it there."""

    def report(line: str) -> None:
        print(line, flush=True)
        if out:
            with out.open("a") as f:
                f.write(line + "\n")

    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["gated_pixelcnn_mnist", "pixelcnn_mnist"])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--batch", type=int, action="append", help="default: 1, 16, 256, 1024, 4096, 16384")
    parser.add_argument("--variant", action="append",
                        help="'default' (triton_ops.WARPS), WARPSxSLOTS: warps and slots per program for "
                             "every Triton kernel, residentTHREADS: the step on the resident kernel "
                             "with THREADS per block, 'split': the Gated refresh's cache part in programs of "
                             "its own; joined by '+' (default: default, 8x16, 4x16)")
    parser.add_argument("--out", type=Path, help="also append the lines to this file")
    args = parser.parse_args()
    report = reporter(args.out)
    for name in args.models:
        profile_model(name, args.repository, args.batch or [1, 16, 256, 1024, 4096, 16384],
                      args.variant or ["default", "8x16", "4x16"], report)


if __name__ == "__main__":
    main()
