"""`genserve evaluate CHECKPOINT`: held-out NLL in nats and bits/dim, and a sample grid."""

from __future__ import annotations

import argparse
import json

from genserve.clients.verbs import CommandError, Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder or shipped name (e.g. gated_pixelcnn_mnist)")
    parser.add_argument("--data", help="dataset to score (default: the one the checkpoint was trained on)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scoring noise (VAE eps, dequantisation)")
    parser.add_argument("--samples", default="samples.png",
                        help="where to write a grid of samples ('' to skip); for audio, a picture of the waveforms "
                        "with a WAV file per sample beside it")
    parser.add_argument("--num-samples", type=int, default=64, help="how many samples the grid shows")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--fid", action="store_true",
        help="also the Fréchet distance between the digit classifier's features on the held-out images "
        "and on --fid-samples seeded samples (28x28 digit models; skipped for audio)",
    )
    parser.add_argument("--fid-samples", type=int, default=1000, help="samples FID draws (seed: --seed)")
    parser.add_argument(
        "--card", action="store_true",
        help="store the figures in the checkpoint and write MODEL_CARD.md and samples.png beside it",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from genserve.export.checkpoint import load_checkpoint
    from genserve.export.evaluation import evaluate, write_card, write_samples
    from genserve.export.quality.fid import FIDConfig, sample_fid

    checkpoint = load_checkpoint(args.checkpoint)
    metrics = evaluate(checkpoint, data=args.data, seed=args.seed)
    if args.fid and checkpoint.model.config.modality == "audio":
        print("FID compares digit images; skipped for this audio model")
    elif args.fid:
        try:
            metrics["fid"] = sample_fid(checkpoint, FIDConfig(samples=args.fid_samples, seed=args.seed), args.data)
        except ValueError as error:
            raise CommandError(str(error)) from None
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{checkpoint.name} ({checkpoint.model.family}) on {metrics['dataset']}")
        for method, figures in metrics.items():
            if isinstance(figures, dict) and "nll_nats" in figures:
                kind = "bound" if figures["is_bound"] else "exact"
                nats, bpd = figures["nll_nats"], figures["bits_per_dim"]
                print(f"  {method:>14}: {nats:8.2f} nats  {bpd:.4f} bits/dim  ({kind})")
            elif isinstance(figures, dict) and "note" in figures:
                print(f"  {method:>14}: mean {figures['mean']:.3f} {figures['unit']} ({figures['note']})")
        if "fid" in metrics:
            fid = metrics["fid"]
            print(f"  {'FID':>14}: {fid['fid']:.2f} ({fid['samples']} samples, seed {fid['seed']}, "
                  f"against {fid['reference']})")
    if args.card:
        write_card(checkpoint, metrics)
        print(f"wrote {checkpoint.path / 'MODEL_CARD.md'} and samples.png")
    elif args.samples:
        print(f"samples: {write_samples(checkpoint, Path(args.samples), n=args.num_samples, seed=args.seed)}")
    return 0


VERB = Verb(
    help="held-out NLL (nats, bits/dim) of a checkpoint, and a sample grid",
    description="Score the held-out split of the checkpoint's dataset: exact NLL for PixelCNNs and WaveNet, "
    "ELBO and IWAE-K bounds for the VAE, dequantised NLL for the flow, and the (non-likelihood) "
    "discriminator logit for the DCGAN; with --fid, the sample-quality figure.",
    add_arguments=add_arguments,
    run=run,
)
