"""Held-out evaluation: NLL in nats and bits/dim, sample grids, model cards.

Figures are means over the held-out split of the checkpoint's dataset, with the fixed
evaluation binarisation for binary models (`data.fixed_held_out`), so they can be compared
run to run and (allowing for the smaller training set) with the literature.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from genserve.clients.audio import write_audio

from .checkpoint import Checkpoint, save_checkpoint
from .data import fixed_held_out, load_dataset
from .images import save_samples
from .quality.classifier import RECORD_FILE, SHIPPED_CLASSIFIER
from .steps import sample_images

# What the papers report on binarised MNIST (60k training images) or dequantised MNIST.
LITERATURE = {
    "pixelcnn": "81.30 nats (van den Oord et al. 2016, binarised MNIST)",
    "gated_pixelcnn": "81.5 nats (binarised MNIST, as cited for Gated PixelCNN)",
    "pixelcnn_pp": "2.92 bits/dim on CIFAR-10 (Salimans et al. 2017; the paper reports no MNIST figure); on these "
    "8-bit digits compare with realnvp_mnist and maf_mnist, whose bits/dim are of the same pixels dequantised",
    "vae": "VAE ≈ 86.8 nats and IWAE ≈ 86.8–87.1 nats (bounds, binarised MNIST)",
    "iaf_vae": "VAE with an IAF posterior ≈ 79–80 nats (Kingma et al. 2016, deep ResNet VAEs, bounds, "
    "binarised MNIST)",
    "pixel_vae": "PixelVAE ≤ 79.66 nats (Gulrajani et al. 2017, a bound, binarised MNIST; beside the plain "
    "VAE's bounds of vae_mnist on the same held-out images)",
    "vae_gan": "no likelihood figure in the paper (Larsen et al. 2016 report samples and attribute edits)",
    "aae": "no likelihood; the paper reports a Parzen-window estimate (340 ± 2 on MNIST), not comparable",
    "realnvp": "1.06 bits/dim (Dinh et al. 2017, dequantised MNIST)",
    "flow_gan": "Grover et al. 2018 report the hybrid's NLL on MNIST in nats of the continuous model; "
    "compare with realnvp_mnist here (same flow, maximum likelihood only)",
    "maf": "Papamakarios et al. 2017 report -1300.5 nats for MAF (5) on MNIST in logit space, a density over "
    "other coordinates: not comparable with bits/dim of pixels; compare with realnvp_mnist here. Unlike the "
    "paper's, this MAF keeps one raster order in every layer (what lets the engine invert it pixel by pixel) "
    "and bounds each layer's log-scale to ±0.6; trained for 100 epochs it fit the training digits better "
    "(2.91 bits/dim) and held-out ones worse (5.19), so it ships at 20",
    "dcgan": "no likelihood (implicit model)",
    "wavenet": "no likelihood figure in the paper (van den Oord et al. 2016 report listening tests: MOS 4.21 for "
    "US English TTS at 16 kHz); the figures here are bits per 8 kHz mu-law sample of synthetic speech, half of "
    "every clip silence, so they are not comparable with natural-speech figures",
}


AUDIO_CARD_SAMPLES = 10  # one clip per label of the spoken digits


def _sample_labels(checkpoint: Checkpoint, n: int) -> torch.Tensor | None:
    classes = checkpoint.model.config.num_classes
    return torch.arange(n) % classes if classes else None


@torch.inference_mode()
def evaluate(
    checkpoint: Checkpoint, data: str | None = None, batch_size: int = 100, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Scores the held-out split; returns {method: {nll_nats, bits_per_dim, is_bound}} per method.

    For figures that are not likelihoods (discriminator logits, reconstructions) it reports their mean and unit.
    """
    model = checkpoint.model.eval()
    dataset = load_dataset(data or checkpoint.training.get("data", "mnist5k"))
    held_out = fixed_held_out(dataset, model.config.pixel_levels)
    sums: dict[str, float] = {}
    kinds = {}
    for start in tqdm(range(0, len(held_out), batch_size), desc="evaluate", disable=not progress, unit="batch"):
        x = held_out.images[start : start + batch_size]
        labels = held_out.labels[start : start + batch_size] if model.config.num_classes else None
        # seed + start: each image's noise is keyed by its position in the split, not the batch.
        for score in model.scores(x, labels, seed=seed + start):
            sums[score.method] = sums.get(score.method, 0.0) + float(score.values.sum())
            kinds[score.method] = score
    n = len(held_out)
    metrics: dict[str, Any] = {"dataset": dataset.describe(), "held_out_images": n}
    for method, total in sums.items():
        score = kinds[method]
        if score.is_likelihood:
            nll = -total / n
            metrics[method] = {
                "nll_nats": round(nll, 3),
                "bits_per_dim": round(nll / (math.log(2) * model.config.dims), 4),
                "is_bound": score.is_bound,
            }
        else:
            metrics[method] = {"mean": round(total / n, 4), "unit": score.unit, "note": "not a likelihood"}
    return metrics


def write_samples(checkpoint: Checkpoint, path: Path, n: int = 64, seed: int = 0) -> Path:
    """A grid of n samples; for an audio model, a picture of n waveforms with n WAV files beside it."""
    model = checkpoint.model
    labels = _sample_labels(checkpoint, n)
    samples = sample_images(model, n, seed, labels=labels)
    c = model.config
    if c.modality == "audio":
        return write_audio(path, samples.to(torch.uint8).numpy(), c.pixel_levels, c.sample_rate)[-1]
    return save_samples(samples, c.pixel_levels, path, labels)


def model_card(checkpoint: Checkpoint, metrics: dict[str, Any]) -> str:
    """A Markdown model card: architecture, training command and seed, held-out figures."""
    model = checkpoint.model
    training = checkpoint.training
    params = sum(p.numel() for p in model.parameters())
    doc = (sys.modules[type(model).__module__].__doc__ or "").strip()
    rows = [
        f"| {method} | {m['nll_nats']} | {m['bits_per_dim']} | {'yes' if m['is_bound'] else 'no'} |"
        for method, m in metrics.items()
        if isinstance(m, dict) and "nll_nats" in m
    ]
    other = [
        f"- {method}: mean {m['mean']} ({m['unit']}) on held-out images ({m['note']})"
        for method, m in metrics.items()
        if isinstance(m, dict) and "note" in m
    ]
    lines = [
        f"# {checkpoint.name}",
        "",
        f"Family `{model.family}`, {params:,} parameters.",
        "",
        doc.split("\n\n")[0],
        "",
        "## Architecture",
        "```json",
        model.config.to_json(),
        "```",
        "## Training",
        f"- command: `{training.get('command') or 'n/a'}`",
        f"- seed: {training.get('seed')}, epochs: {training.get('epochs_done')}, batch size: "
        f"{training.get('batch_size')}, learning rate: {training.get('learning_rate')} "
        f"(x{training.get('lr_decay')} per epoch)",
        f"- data: {training.get('dataset')}",
        f"- final-epoch training figures: {json.dumps(training.get('last_epoch_metrics', {}))}",
        "",
        "## Held-out evaluation",
        f"{metrics['held_out_images']} held-out samples ({metrics['dataset']}); binary models use the "
        "fixed evaluation binarisation (seed 1234). Command: "
        f"`genserve evaluate {checkpoint.name} --card`.",
        "",
    ]
    if rows:
        lines += ["| method | NLL (nats) | bits/dim | bound |", "|---|---|---|---|", *rows, ""]
    lines += other
    if "fid" in metrics:
        fid = metrics["fid"]
        lines += [
            "",
            f"Sample quality: FID {fid['fid']} between the digit classifier's features on {fid['reference']} "
            f"and on {fid['samples']} samples (seed {fid['seed']}); real training images score "
            f"{_fid_floor(model.config.pixel_levels)} (the classifier's card). Command: "
            f"`genserve evaluate {checkpoint.name} --card --fid`.",
        ]
    if model.config.modality == "audio":
        lines += [f"Literature: {LITERATURE.get(model.family, 'n/a')}.", "", "## Samples", "![waveforms](samples.png)",
                  "", *[f"- [samples-{k}.wav](samples-{k}.wav): label {k}" for k in range(AUDIO_CARD_SAMPLES)], ""]
        return "\n".join(lines)
    lines += [
        f"Literature: {LITERATURE.get(model.family, 'n/a')}. Trained on 4,500 images rather than 60,000, "
        "so figures are not directly comparable.",
        "",
        "## Samples",
        "![samples](samples.png)",
        "",
    ]
    return "\n".join(lines)


def _fid_floor(levels: int) -> str:
    reference = json.loads((SHIPPED_CLASSIFIER / RECORD_FILE).read_text())["figures"]["reference_fid"]
    return str(reference["train_vs_held_out_" + ("binarised" if levels == 2 else "8bit")])


def write_card(checkpoint: Checkpoint, metrics: dict[str, Any]) -> None:
    """Stores metrics in the checkpoint, writes samples.png (and an audio model's WAV files) and MODEL_CARD.md."""
    assert checkpoint.path is not None
    save_checkpoint(checkpoint.path, checkpoint.model, training=checkpoint.training, metrics=metrics)
    audio = checkpoint.model.config.modality == "audio"
    write_samples(checkpoint, checkpoint.path / "samples.png", n=AUDIO_CARD_SAMPLES if audio else 64)
    (checkpoint.path / "MODEL_CARD.md").write_text(model_card(checkpoint, metrics))
