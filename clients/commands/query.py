"""`genserve models | sample | score | encode | decode`: one request to a genserve server each."""

from __future__ import annotations

import argparse

from genserve.clients.verbs import CommandError, Verb

from .connection import add_server_arguments, connect, reports_server_errors


# ---- models ------------------------------------------------------------------------------------
def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@reports_server_errors
def run_models(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    with connect(args) as client:
        models = client.models()
    if args.json:
        print(json.dumps([asdict(m) for m in models], indent=2))
        return 0
    print(f"{'model':24} {'family':16} {'capabilities':30} {'sample':18} {'levels':>6} {'classes':>7} ready")
    for m in models:
        shape = "x".join(map(str, m.image_shape)) + (f" @ {m.sample_rate} Hz" if m.modality == "audio" else "")
        print(f"{m.name:24} {m.family:16} {','.join(m.capabilities):30} {shape:18} {m.pixel_levels:>6} "
              f"{m.num_classes or '-':>7} {'yes' if m.ready else 'no'}")
    return 0


# ---- sample ------------------------------------------------------------------------------------
def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a served model (genserve models lists them)")
    parser.add_argument("-n", "--num", type=int, default=16, help="number of samples")
    parser.add_argument("--seed", type=int, help="seed (default: the server draws one and it is printed)")
    parser.add_argument("--start-index", type=int, default=0, help="sample k is sample START+k of the seed")
    parser.add_argument("--temperature", type=float, help="0 gives the most likely values (server default 1)")
    parser.add_argument("--label", type=int, action="append",
                        help="class label(s) of a conditional model: once for all or once per sample "
                        "(default: k mod classes)")
    parser.add_argument("-o", "--output", default="samples.png",
                        help="images: a .png grid or a .npz of uint8 arrays; audio: OUT.png, a picture of the "
                        "waveforms, with OUT-K.wav beside it for sample K, or a .npz of the mu-law codes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar for sequential models")
    add_server_arguments(parser)


@reports_server_errors
def run_sample(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from genserve.clients import Samples
    from genserve.clients.audio import write_audio
    from genserve.clients.images import write_images

    if args.num < 1:
        raise CommandError(f"-n must be >= 1, got {args.num}")
    began = time.perf_counter()
    with connect(args) as client:
        info = client.model(args.model)
        audio = info.modality == "audio"
        bar, result = None, None
        for event in client.sample_stream(args.model, args.num, seed=args.seed, temperature=args.temperature,
                                          labels=args.label, start_index=args.start_index):
            if isinstance(event, Samples):
                result = event
            elif not args.no_progress:  # rows (audio: frames) of a sequential model, as they finish
                unit = "frame" if audio else "row"
                bar = bar or tqdm(total=event.rows_total, unit=unit, desc=args.model, leave=False)
                bar.update(int(event.rows_done.min()) - bar.n)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - began
    if audio:
        written = write_audio(args.output, result.images, info.pixel_levels, info.sample_rate)
        path = written[-1] if len(written) == 1 else f"{written[-1]} and {len(written) - 1} WAV files beside it"
        clip_seconds = result.images.shape[-1] / info.sample_rate
        rate = f" ({args.num * clip_seconds / seconds:.3f} s of audio per second)"
    else:
        path = write_images(args.output, result.images, info.pixel_levels, labels=result.labels, seed=result.seed)
        rate = ""
    print(f"{args.num} samples of {args.model} (seed {result.seed}, temperature {result.temperature:g}) in "
          f"{seconds:.2f} s{rate} → {path}")
    return 0


# ---- score -------------------------------------------------------------------------------------
def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a served model with the score capability")
    parser.add_argument("images", nargs="+", help="PNG files (one image each, 8-bit) and/or NPZ files ('images'); for "
                        "an audio model, mono WAV files at its rate and/or NPZ files ('audio' codes)")
    parser.add_argument("--label", type=int, action="append", help="class label(s) for a conditional model")
    parser.add_argument("--seed", type=int, help="seeds stochastic bounds (VAE) and dequantisation (flows)")
    parser.add_argument("--importance-samples", type=int, help="K of a VAE's IWAE bound")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_server_arguments(parser)


@reports_server_errors
def run_score(args: argparse.Namespace) -> int:
    import json

    from genserve.clients.audio import read_audio
    from genserve.clients.images import read_images

    with connect(args) as client:
        info = client.model(args.model)
        if info.modality == "audio":
            images = read_audio(args.images, info.pixel_levels, info.sample_rate, info.image_shape[-1])
        else:
            images = read_images(args.images, info.pixel_levels)
        scores = client.score(args.model, images, labels=args.label, seed=args.seed,
                              importance_samples=args.importance_samples)
    if args.json:
        print(json.dumps([{"method": s.method, "kind": s.kind, "values": s.values.tolist(),
                           "bits_per_dim": None if s.bits_per_dim is None else s.bits_per_dim.tolist()}
                          for s in scores], indent=2))
        return 0
    meaning = {"exact": "the exact log p(x)", "lower bound": "a lower bound on log p(x)",
               "not a likelihood": "not a likelihood"}
    print(f"{len(images)} images scored by {args.model}: " +
          "; ".join(f"{s.method} is {meaning.get(s.kind, s.kind)}" for s in scores))
    header = ["image"]
    for s in scores:
        value = f"{s.method} log p nats" if s.bits_per_dim is not None else f"{s.method} value"
        header += [value] + ([f"{s.method} bits/dim"] if s.bits_per_dim is not None else [])
    rows = []
    for k in range(len(images)):
        row = [str(k)]
        for s in scores:
            row += [f"{s.values[k]:.3f}"] + ([f"{s.bits_per_dim[k]:.4f}"] if s.bits_per_dim is not None else [])
        rows.append(row)
    mean = ["mean"]
    for s in scores:
        mean += [f"{s.values.mean():.3f}"] + ([f"{s.bits_per_dim.mean():.4f}"] if s.bits_per_dim is not None else [])
    widths = [max(len(r[i]) for r in [header, *rows, mean]) for i in range(len(header))]
    for row in [header, *rows, mean]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    return 0


# ---- encode / decode ---------------------------------------------------------------------------
def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a served model with the encode capability (vae, iaf_vae, realnvp)")
    parser.add_argument("images", nargs="+", help="PNG files and/or NPZ files ('images')")
    parser.add_argument("-o", "--output", default="latents.npz",
                        help="NPZ of 'latents' (+ 'log_var', 'log_det' or 'log_density')")
    add_server_arguments(parser)


@reports_server_errors
def run_encode(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from genserve.clients.images import read_images

    with connect(args) as client:
        images = read_images(args.images, client.model(args.model).pixel_levels)
        encoding = client.encode(args.model, images)
    extra = {k: getattr(encoding, k) for k in ("log_var", "log_det", "log_density") if getattr(encoding, k) is not None}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.output, latents=encoding.latents, **extra)
    print(f"{len(images)} images → latents {encoding.latents.shape} → {args.output}")
    return 0


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a served model with the decode capability (vae, iaf_vae, pixel_vae, dcgan, "
                        "realnvp, ...)")
    parser.add_argument("latents", help="an NPZ with 'latents' (what genserve encode writes)")
    parser.add_argument("--label", type=int, action="append", help="class label(s) for a conditional model")
    parser.add_argument("--seed", type=int, default=0, help="pixel noise of a PixelVAE's decoder (others ignore it)")
    parser.add_argument("-o", "--output", default="decoded.png", help="a .png grid or a .npz")
    add_server_arguments(parser)


@reports_server_errors
def run_decode(args: argparse.Namespace) -> int:
    import numpy as np

    from genserve.clients.images import write_images

    with np.load(args.latents) as data:
        if "latents" not in data:
            raise CommandError(f"{args.latents} has no 'latents' array (it has {', '.join(data.files)})")
        latents = data["latents"]
    with connect(args) as client:
        levels = client.model(args.model).pixel_levels
        decoded = client.decode(args.model, latents, labels=args.label, seed=args.seed)
    path = write_images(args.output, decoded.images, levels, probabilities=decoded.probabilities)
    print(f"{len(latents)} latents → images {decoded.images.shape} → {path}")
    return 0


MODELS = Verb(help="list the models a genserve server serves", add_arguments=add_models_arguments, run=run_models)
SAMPLE = Verb(
    help="draw samples from a served model (PNG grid or NPZ)",
    description="Sample a model on a genserve server (--server). Sample i of a --seed is the same image whatever "
    "-n is; without --seed the server draws one and it is printed. Sequential models show a progress bar.",
    add_arguments=add_sample_arguments, run=run_sample,
)
SCORE = Verb(
    help="log p(x) in nats and bits/dim of images (PNG or NPZ) under a served model",
    description="Score images with a served model; prints a table per image and the mean, each figure labelled "
    "exact, lower bound, or not a likelihood.",
    add_arguments=add_score_arguments, run=run_score,
)
ENCODE = Verb(help="images (PNG or NPZ) → latents (NPZ) with a served model", add_arguments=add_encode_arguments,
              run=run_encode)
DECODE = Verb(help="latents (NPZ) → images (PNG grid or NPZ) with a served model", add_arguments=add_decode_arguments,
              run=run_decode)
