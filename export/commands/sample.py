"""`genserve sample-local MODEL -n 16 --seed 7 -o samples.png`: sample a checkpoint in-process (no server)."""

from __future__ import annotations

import argparse
import secrets

from genserve.clients.verbs import CommandError, Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="shipped checkpoint name (e.g. gated_pixelcnn_mnist) or checkpoint folder")
    parser.add_argument("-n", "--num", type=int, default=16, help="number of samples")
    parser.add_argument("--seed", type=int, help="seed (default: a random one, printed so it can be reused)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 gives the most likely pixel values")
    parser.add_argument("--label", type=int, action="append", help="class label(s) for conditional models; "
                        "one for all samples or one per sample (default: cycle through the classes)")
    parser.add_argument("-o", "--output", default="samples.png",
                        help="a .png grid or a .npz of uint8 arrays; audio: OUT.png, the waveforms, with OUT-K.wav "
                        "beside it for sample K, or a .npz of the mu-law codes")
    parser.add_argument("--naive", action="store_true",
                        help="PixelCNNs: recompute the whole network per pixel (the slow reference; same images)")


def run(args: argparse.Namespace) -> int:
    import time
    from functools import partial

    import torch

    from genserve.clients.audio import write_audio
    from genserve.export.checkpoint import load_checkpoint
    from genserve.export.images import save_samples
    from genserve.export.steps import sample_images

    if args.num < 1:
        raise CommandError(f"-n must be >= 1, got {args.num}")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    model = load_checkpoint(args.model).model
    labels = None
    if model.config.num_classes:
        if args.label is None:
            labels = torch.arange(args.num) % model.config.num_classes
        elif len(args.label) in (1, args.num):
            labels = torch.tensor(args.label).expand(args.num).clone()
        else:
            raise CommandError(f"give one --label or {args.num} of them, got {len(args.label)}")
    elif args.label is not None:
        raise CommandError(f"{args.model} is unconditional; drop --label")
    start = time.perf_counter()
    sample = model.sample if args.naive else partial(sample_images, model)
    pixels = sample(args.num, seed, args.temperature, labels)
    elapsed = time.perf_counter() - start
    c = model.config
    if c.modality == "audio":
        written = write_audio(args.output, pixels.to(torch.uint8).numpy(), c.pixel_levels, c.sample_rate)
        path = written[-1] if len(written) == 1 else f"{written[-1]} and {len(written) - 1} WAV files beside it"
    else:
        path = save_samples(pixels, c.pixel_levels, args.output, labels)
    print(f"{args.num} samples of {args.model} (seed {seed}, temperature {args.temperature}) "
          f"in {elapsed:.2f} s → {path}")
    return 0


VERB = Verb(
    help="draw samples from a checkpoint in-process (PNG grid or NPZ)",
    description="Sample a model locally, without a server. Sample i of a given --seed is the same "
    "image whatever -n is.",
    add_arguments=add_arguments,
    run=run,
)
