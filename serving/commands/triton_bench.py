"""`genserve triton-bench MODEL --batch 1 --batch 64`: Triton round-trip latency, side by side.

Sequential requests over tritonclient gRPC against a real tritonserver (started here over
--repository unless --url names a running one), after a warm-up, for each batch size in the
same run, so the figures are comparable on a noisy machine. A sampler (decoupled) is called
over the stream API and timed to its final response. Inputs are random tensors of the
shapes and dtypes the model's manifest declares.
"""

from __future__ import annotations

import argparse
import json

from genserve.clients.verbs import CommandError, Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Triton model name, e.g. vae_mnist_decode")
    parser.add_argument("--batch", type=int, action="append", help="batch size(s) (default: 1 and 64)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per batch size")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repository", default="model_repository", help="where the model's manifest is")
    parser.add_argument("--url", help="a running Triton's gRPC HOST:PORT (default: start one over --repository)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def random_inputs(manifest, batch: int, rng):
    import numpy as np

    arrays = {}
    for spec in manifest.inputs:
        shape = (batch, *(3 if s == -1 else s for s in spec.shape))
        if spec.dtype.name == "FP32":
            arrays[spec.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            high = manifest.model_config.get("pixel_levels", 2) if spec.name == "images" else 1
            arrays[spec.name] = rng.integers(0, high, shape).astype(spec.dtype.numpy)
    return arrays


def streamed_call(client, name: str, inputs: list):
    """A call to a decoupled model (a sampler) on the client's stream, returning at its final response."""
    import queue

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))

    def call() -> None:
        client.async_stream_infer(name, inputs)
        while True:
            result, error = answers.get(timeout=600)
            if error is not None:
                raise error
            if result.get_response().parameters["triton_final_response"].bool_param:
                return

    return call


def measure(client, manifest, batch: int, requests: int, warmup: int) -> dict:
    import time

    import numpy as np
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    dtypes = {spec.name: spec.dtype.name for spec in manifest.inputs}
    inputs = []
    for name, array in random_inputs(manifest, batch, rng).items():
        tensor = grpcclient.InferInput(name, list(array.shape), dtypes[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    call = streamed_call(client, manifest.triton_name, inputs) if manifest.step is not None else \
        (lambda: client.infer(manifest.triton_name, inputs))
    for _ in range(warmup):
        call()
    latencies = []
    start = time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {
        "batch": batch, "requests": requests,
        "p50_ms": round(float(np.percentile(ms, 50)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(ms.mean()), 3),
        "images_per_s": round(batch * requests / elapsed, 1),
    }


def run(args: argparse.Namespace) -> int:
    import contextlib
    import platform
    from pathlib import Path

    import tritonclient.grpc as grpcclient

    from genserve.serving.artifacts import load_manifest
    from genserve.serving.tritonserver import TritonServer, TritonServerConfig

    folder = Path(args.repository) / args.model
    if not (folder / "genserve.json").exists():
        raise CommandError(f"no model {args.model!r} in {args.repository} (no {folder / 'genserve.json'})")
    manifest = load_manifest(folder)
    batches = args.batch or [1, 64]
    if args.requests < 1 or args.warmup < 0 or min(batches) < 1:
        raise CommandError("--requests and --batch must be >= 1 and --warmup >= 0")
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            config = TritonServerConfig(Path(args.repository), 0, 0, 0)
            url = stack.enter_context(TritonServer(config)).config.grpc_url  # ports chosen at start
        client = stack.enter_context(grpcclient.InferenceServerClient(url))
        rows = [measure(client, manifest, b, args.requests, args.warmup) for b in batches]
    report = {"model": args.model, "url": url, "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Triton gRPC round trips, {args.model}, {args.requests} sequential requests per batch size")
    print(f"{'batch':>6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'images/s':>10}")
    for r in rows:
        print(f"{r['batch']:>6} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['images_per_s']:>10.1f}")
    return 0


VERB = Verb(
    help="measure Triton round-trip latency of one model at several batch sizes",
    description=__doc__,
    add_arguments=add_arguments,
    run=run,
)
