"""Shared fixtures: tiny model factories and the shipped checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels (serving/fused/triton_gated.py) run in Triton's interpreter on CPU
# tensors: the mode is read when triton is first imported, so it is set before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# xdist workers share the cores: each takes its part for its own threads and for the servers it starts.
# With every worker's OpenMP pool as large as the machine, pools that wait spinning take the cores from
# each other's computations: on a 2-core machine, 2 workers of 2 threads each ran the engine and fused
# operator tests 16x slower than with a thread each (851 s against 54 s).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)

from genserve.export.checkpoint import SHIPPED_DIR, load_checkpoint
from genserve.export.models import build_model

# Tiny configurations: fast enough for CI, big enough to exercise every code path.
TINY = {
    "pixelcnn": dict(image_size=4, hidden_channels=8, num_residual_blocks=2, output_channels=8),
    "gated_pixelcnn": dict(image_size=4, hidden_channels=8, num_layers=3, kernel_size=3, first_kernel_size=3,
                           output_channels=8),
    "vae": dict(image_size=8, hidden_channels=4, hidden_units=16, latent_dim=3, score_samples=8),
    "iaf_vae": dict(image_size=8, hidden_channels=4, hidden_units=16, latent_dim=3, score_samples=8, flow_steps=2,
                    flow_hidden=8, context_dim=4),
    "vae_gan": dict(image_size=8, hidden_channels=4, hidden_units=16, latent_dim=3, score_samples=8,
                    discriminator_channels=4),
    "aae": dict(image_size=8, hidden_channels=4, hidden_units=16, latent_dim=3, discriminator_units=8),
    "pixel_vae": dict(image_size=8, hidden_channels=4, hidden_units=16, latent_dim=3, score_samples=8,
                      condition_channels=3, decoder_channels=6, decoder_layers=2, kernel_size=3, first_kernel_size=3,
                      output_channels=8),
    "dcgan": dict(image_size=8, latent_dim=4, generator_channels=4, discriminator_channels=4),
    "realnvp": dict(image_size=4, hidden_channels=4, num_checkerboard=2, num_channelwise=2),
    "maf": dict(image_size=4, num_layers=3, hidden_units=8),
    "pixelcnn_pp": dict(image_size=8, filters=4, mixtures=3, pixel_levels=5),
    "wavenet": dict(length=24, frame=8, pixel_levels=5, residual_channels=4, skip_channels=6, output_channels=8,
                    max_dilation=4, dilation_cycles=2),
    "flow_gan": dict(image_size=4, hidden_channels=4, num_checkerboard=2, num_channelwise=2, discriminator_channels=4),
}
SHIPPED = ("pixelcnn_mnist", "gated_pixelcnn_mnist", "vae_mnist", "iaf_vae_mnist", "vae_gan_mnist", "aae_mnist",
           "dcgan_mnist", "realnvp_mnist", "flow_gan_mnist", "pixel_vae_mnist", "maf_mnist", "pixelcnn_pp_mnist",
           "wavenet_speech")


def make_model(family: str, seed: int = 0, **overrides):
    """A tiny randomly initialised model in eval mode; every weight non-zero (no identity layers)."""
    torch.manual_seed(seed)
    model = build_model(family, {**TINY[family], **overrides})
    with torch.no_grad():  # the flow's couplings start as the identity: perturb them to test real maps
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def shipped():
    """Loads a shipped checkpoint by name (cached for the session)."""
    cache = {}

    def load(name: str):
        if not (SHIPPED_DIR / name / "config.json").exists():
            pytest.fail(f"shipped checkpoint {name} is missing from {SHIPPED_DIR}")
        if name not in cache:
            cache[name] = load_checkpoint(name)
        return cache[name]

    return load
