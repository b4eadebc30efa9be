"""PixelVAE: a VAE whose decoder p(x | z) is a shallow Gated PixelCNN conditioned on z.

Gulrajani, Kumar, Ahmed, Taiga, Visin, Vazquez & Courville, "PixelVAE: A Latent Variable Model
for Natural Images", ICLR 2017. The encoder and the Gaussian posterior q(z|x) are the VAE's
(vae.py). The decoder maps z through the VAE decoder's dense and transposed-convolution layers
to a conditioning feature map m(z) of shape (condition_channels, H, W); every layer of a few-layer
Gated PixelCNN adds a 1x1 convolution of m(z) to the pre-activations of both its stacks (the
paper's upsampled-latent conditioning). The PixelCNN's small receptive field models local
texture, so the global shape of the digit has to travel through z.

Like the VAE's, the figures it reports are lower bounds on log p(x) (ELBO and IWAE-K from the
same K posterior samples), but log p(x | z) is now the PixelCNN's exact autoregressive
likelihood. Sampling draws z ~ N(0, I) from noise stream 1 of (seed, index) and the pixels by
inverse CDF on stream 0, the stream the sampling engine gives every autoregressive sample; the
engine runs the decoder's cached step program with z as the slot's `latents`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genserve.serving.kernels.sampling import LATENT_STREAM, gaussian_noise, naive_sample, uniform_noise

from .base import DECODE, ENCODE, SAMPLE, SCORE
from .gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from .vae import VAE, VAEConfig


@dataclass(frozen=True)
class PixelVAEConfig(VAEConfig):
    condition_channels: int = 8  # channels of m(z), the map every PixelCNN layer is conditioned on
    decoder_channels: int = 32  # the PixelCNN's hidden channels
    decoder_layers: int = 3  # few layers of small kernels: a small receptive field keeps z in use
    kernel_size: int = 3  # (with 5x5 kernels the decoder learned to ignore z: KL 0.04 nats after 2 epochs)
    first_kernel_size: int = 3
    output_channels: int = 32
    # Training only: the KL term of each latent dimension is not penalised below this many nats
    # (batch-averaged "free bits", Kingma et al. 2016), against the decoder learning to ignore z.
    free_bits: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.condition_channels, self.decoder_channels, self.output_channels) < 1:
            raise ValueError(
                f"sizes must be >= 1: condition_channels={self.condition_channels} "
                f"decoder_channels={self.decoder_channels} output_channels={self.output_channels}"
            )
        if self.free_bits < 0:
            raise ValueError(f"free_bits must be >= 0, got {self.free_bits}")
        if self.decoder_layers < 2:  # the cached step program needs a layer after the first
            raise ValueError(f"decoder_layers must be >= 2, got {self.decoder_layers}")
        self.pixelcnn_config()  # kernel sizes checked where the PixelCNN checks them

    def pixelcnn_config(self) -> GatedPixelCNNConfig:
        return GatedPixelCNNConfig(
            channels=self.channels, image_size=self.image_size, pixel_levels=self.pixel_levels,
            hidden_channels=self.decoder_channels, num_layers=self.decoder_layers, kernel_size=self.kernel_size,
            first_kernel_size=self.first_kernel_size, output_channels=self.output_channels,
        )


class PixelVAE(VAE):
    family = "pixel_vae"
    config_class = PixelVAEConfig
    capabilities = frozenset({SAMPLE, ENCODE, DECODE, SCORE})

    def __init__(self, config: PixelVAEConfig) -> None:
        super().__init__(config, decoder_outputs=config.condition_channels)
        self.pixelcnn = GatedPixelCNN(config.pixelcnn_config(), condition_channels=config.condition_channels)

    def condition_map(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, D) → m(z), (N, condition_channels, H, W)."""
        return self.decoder_maps(z)

    def decoder_logits(self, z: torch.Tensor) -> torch.Tensor:
        raise TypeError("a PixelVAE's decoder is autoregressive: use pixel_logits(x, z)")

    def pixel_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Pixel values (N, C, H, W) and latents (N, D) → logits (N, L, C, H, W) of p(x_i | x_<i, z)."""
        return self.pixelcnn.logits(x, condition=self.condition_map(z))

    def reconstruction_log_likelihood(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z_k), exact under the PixelCNN: z (K, N, D), x (N, C, H, W) → (K, N)."""
        k, n, d = z.shape
        repeated = x.unsqueeze(0).expand(k, *x.shape).reshape(k * n, *x.shape[1:])
        logits = self.pixel_logits(repeated, z.reshape(k * n, d))  # (K*N, L, C, H, W)
        log_probs = torch.log_softmax(logits, dim=1).gather(1, repeated.long().unsqueeze(1))
        return log_probs.view(k, n, -1).sum(-1)

    def training_loss(self, x, labels):
        x = self.check_pixels(x)
        mean, log_var = self.encode(x)
        z = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
        recon = -self.reconstruction_log_likelihood(z.unsqueeze(0), x)[0]
        kl_per_dim = 0.5 * (mean**2 + log_var.exp() - 1 - log_var)  # (N, D)
        penalised = kl_per_dim.mean(0).clamp(min=self.config.free_bits).sum()
        loss = recon.mean() + penalised
        kl = kl_per_dim.sum(1).mean()
        return loss, {"neg_elbo": (recon.mean() + kl).item(), "kl": kl.item()}

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0, temperature: float = 1.0,
               indices: range | None = None) -> torch.Tensor:
        """Images drawn from p(x | z) by naive sequential sampling (the engine's reference): (N, C, H, W) int64.

        Pixel noise is stream 0 of (seed, index), index 0..N-1 unless `indices` says otherwise.
        """
        self.check_labels(labels, z.shape[0])
        c = self.config
        if z.dim() != 2 or z.shape[1] != c.latent_dim:
            raise ValueError(f"z must have shape (N, {c.latent_dim}), got {tuple(z.shape)}")
        indices = range(z.shape[0]) if indices is None else indices
        self.check_sample_args(len(indices), seed, temperature, None)
        condition = self.condition_map(z.to(self.pixelcnn.output_logits.weight.dtype))
        noise = uniform_noise(seed, indices, (c.channels, c.image_size, c.image_size))
        return naive_sample(lambda x: self.pixelcnn.logits(x, condition=condition), noise, temperature,
                            c.pixel_levels)

    @torch.inference_mode()
    def sample(self, n: int, seed: int, temperature: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z ~ N(0, I) (stream 1), then p(x | z) pixel by pixel (stream 0); naive: one full pass per pixel."""
        self.check_sample_args(n, seed, temperature, labels)
        return self.decode(prior_latents(self, seed, range(n)), seed=seed, temperature=temperature)


def prior_latents(model: PixelVAE, seed: int, indices) -> torch.Tensor:
    """z ~ N(0, I) of samples `indices` of `seed`: the draws Sample makes in every path, (N, D)."""
    return gaussian_noise(seed, indices, (model.config.latent_dim,), stream=LATENT_STREAM)
