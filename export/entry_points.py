"""The exportable entry points of each family: pure tensor-in, tensor-out modules.

Each entry point wraps one capability of a trained model as an `nn.Module` whose forward
takes and returns tensors only, with every random draw (VAE eps, flow dequantisation noise,
latents) as an *input*: an exported graph is a deterministic function in every runtime.

Tensor conventions (what the Triton configs and manifests declare):
- every tensor has a leading batch axis and at least one more axis, so per-image scalars
  are (N, 1) and class labels are (N, 1) int64;
- images are uint8 pixel values (N, C, H, W) in [0, pixel_levels); audio is (N, C, T) mu-law codes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from genserve.serving.artifacts import FP32, INT64, UINT8, TensorSpec

from .models import AAE, DCGAN, IAFVAE, MAF, VAE, VAEGAN, FlowGAN, GenerativeModel, PixelVAE
from .models.autoencoder import ConvAutoencoder
from .models.autoregressive import AutoregressiveModel
from .models.logit_flow import LogitFlow
from .models.vae import bounds_from_log_weights


@dataclass(frozen=True)
class EntryPoint:
    """A capability ready to export: the module, its signature, and example inputs."""

    name: str
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example: Callable[[int], tuple[torch.Tensor, ...]]  # batch size → example inputs
    # Output name → how it reduces over the inputs' free axis (the manifest's `free_axis`); empty where it
    # does not: then a row's free axis always runs whole.
    free_axis: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Exporters restore the wrapper's own train/eval flag to every child afterwards: a
        # wrapper left in (default) training mode would flip batch norm to batch statistics.
        self.module.eval()

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        return self.example(batch)


def _image_spec(model: GenerativeModel, name: str = "images") -> TensorSpec:
    return TensorSpec(name, UINT8, model.config.sample_shape)


def _label_specs(model: GenerativeModel) -> tuple[TensorSpec, ...]:
    return (TensorSpec("labels", INT64, (1,)),) if model.config.num_classes else ()


def _example_images(model: GenerativeModel, n: int) -> torch.Tensor:
    c = model.config
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, c.pixel_levels, (n, *c.sample_shape), generator=g).to(torch.uint8)


def _example_labels(model: GenerativeModel, n: int) -> tuple[torch.Tensor, ...]:
    return ((torch.arange(n) % model.config.num_classes).view(n, 1),) if model.config.num_classes else ()


# ---- wrappers: one small module per entry point ---------------------------------------------
class ARLogits(nn.Module):
    """images (N, C, *S) uint8 [, labels (N, 1)] → logits (N, L, C, *S): one parallel pass."""

    def __init__(self, model: AutoregressiveModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.logits(images, None if labels is None else labels[:, 0])


class PixelVAELogits(nn.Module):
    """images (N, C, H, W) uint8, z (N, D) → the decoder's logits (N, L, C, H, W) of p(x_i | x_<i, z): one pass."""

    def __init__(self, model: PixelVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.model.pixel_logits(images, z)


class VAEEncode(nn.Module):
    """images → posterior mean (N, D) and log-variance (N, D)."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.encoder = model.encoder  # the encoder alone: a traced module keeps every submodule it holds

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.encoder(images.float()).chunk(2, dim=1)
        return mean, log_var


class IAFVAEEncode(nn.Module):
    """images → the flowed code of the posterior's mode, z_T at eps = 0 (N, D), and log q(z_T | x) (N, 1)."""

    def __init__(self, model: IAFVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_q = self.model.posterior(images, torch.zeros(()))
        return z, log_q.unsqueeze(1)


class AAEEncode(nn.Module):
    """images → the code z = E(x) (N, D)."""

    def __init__(self, model: AAE) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images.float())


class AAEScore(nn.Module):
    """images → log p(x | E(x)) (N, 1) nats and the latent discriminator's logit D(E(x)) (N, 1); neither is log p(x)."""

    def __init__(self, model: AAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction, logit = self.model.code_scores(images)
        return reconstruction.unsqueeze(1), logit.unsqueeze(1)


class VAEDecode(nn.Module):
    """z (N, D) → Bernoulli probabilities (N, C, H, W)."""

    def __init__(self, model: ConvAutoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model.decoder_logits(z))


class VAEScore(nn.Module):
    """images, eps (N, K, D) → ELBO (N, 1) and IWAE-K (N, 1) from the same K samples."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_w = self.model.importance_log_weights(images, eps.transpose(0, 1))  # (K, N)
        elbo, iwae = bounds_from_log_weights(log_w)
        return elbo.unsqueeze(1), iwae.unsqueeze(1)


class PixelDiscriminate(nn.Module):
    """images → the pixel discriminator's logit (N, 1) of a VAE/GAN or FlowGAN. Not a likelihood."""

    def __init__(self, model: VAEGAN | FlowGAN) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.discriminate(images).unsqueeze(1)


class DCGANGenerate(nn.Module):
    """z (N, D) [, labels (N, 1)] → images (N, C, H, W) uint8."""

    def __init__(self, model: DCGAN) -> None:
        super().__init__()
        self.generator = model.generator

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.generator(z, None if labels is None else labels[:, 0])
        return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class DCGANDiscriminate(nn.Module):
    """images [, labels (N, 1)] → the discriminator's logit (N, 1). Not a likelihood."""

    def __init__(self, model: DCGAN) -> None:
        super().__init__()
        self.discriminator = model.discriminator

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        return self.discriminator(x, None if labels is None else labels[:, 0]).unsqueeze(1)


class FlowEncode(nn.Module):
    """images, noise (N, C, H, W) in [0, 1) → z (N, C, H, W) and log|det dz/d(x + u)| (N, 1)."""

    def __init__(self, model: LogitFlow) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, log_det_pre = self.model.dequantise(images, noise)
        z, log_det_flow = self.model.flow_forward(y)
        return z, (log_det_pre + log_det_flow).float().unsqueeze(1)


class FlowDecode(nn.Module):
    """z (N, C, H, W) → images (N, C, H, W) uint8."""

    def __init__(self, model: LogitFlow) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.to_pixels(self.model.flow_inverse(z)).to(torch.uint8)


class FlowScore(nn.Module):
    """images, noise → log p(x + u) in nats (N, 1)."""

    def __init__(self, model: LogitFlow) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model.log_density(images, noise).unsqueeze(1)


# ---- the table: family → entry points -------------------------------------------------------
def _pixel_discriminate(model: VAEGAN | FlowGAN) -> list[EntryPoint]:
    return [EntryPoint("discriminate", PixelDiscriminate(model), (_image_spec(model),),
                       (TensorSpec("logit", FP32, (1,)),), lambda n: (_example_images(model, n),))]



def entry_points(model: GenerativeModel) -> list[EntryPoint]:
    """Every exportable entry point of a trained model (eval mode), in a fixed order."""
    model = model.eval()
    c = model.config
    image, labels = _image_spec(model), _label_specs(model)
    f32 = FP32

    def images_and_labels(n):
        return (_example_images(model, n), *_example_labels(model, n))

    if isinstance(model, AutoregressiveModel):
        logits = TensorSpec("logits", f32, (c.pixel_levels, *c.sample_shape))
        return [EntryPoint("logits", ARLogits(model), (image, *labels), (logits,), images_and_labels)]
    if isinstance(model, VAE):
        d = c.latent_dim
        z = TensorSpec("z", f32, (d,))
        eps = TensorSpec("eps", f32, (-1, d))
        probs = TensorSpec("probs", f32, image.shape)
        per_image = (TensorSpec("elbo", f32, (1,)), TensorSpec("iwae", f32, (1,)))
        if isinstance(model, IAFVAE):
            encoder, codes = IAFVAEEncode(model), (z, TensorSpec("log_density", f32, (1,)))
        else:
            encoder, codes = VAEEncode(model), (TensorSpec("mean", f32, (d,)), TensorSpec("log_var", f32, (d,)))
        encode = EntryPoint("encode", encoder, (image,), codes, lambda n: (_example_images(model, n),))
        score = EntryPoint("score", VAEScore(model), (image, eps), per_image,
                           lambda n: (_example_images(model, n), torch.randn(n, 3, d)),
                           free_axis={"elbo": "mean", "iwae": "log_mean_exp"})
        if isinstance(model, PixelVAE):  # decoding is sequential: the sampler's step program (export/steps.py)
            logits = TensorSpec("logits", f32, (c.pixel_levels, c.channels, c.image_size, c.image_size))
            decoder = EntryPoint("logits", PixelVAELogits(model), (image, z), (logits,),
                                 lambda n: (_example_images(model, n), torch.randn(n, d)))
            return [encode, score, decoder]
        decode = EntryPoint("decode", VAEDecode(model), (z,), (probs,), lambda n: (torch.randn(n, d),))
        return [encode, decode, score] + (_pixel_discriminate(model) if isinstance(model, VAEGAN) else [])
    if isinstance(model, AAE):
        z = TensorSpec("z", f32, (c.latent_dim,))
        per_image = (TensorSpec("reconstruction", f32, (1,)), TensorSpec("latent_logit", f32, (1,)))
        return [
            EntryPoint("encode", AAEEncode(model), (image,), (z,), lambda n: (_example_images(model, n),)),
            EntryPoint("decode", VAEDecode(model), (z,), (TensorSpec("probs", f32, image.shape),),
                       lambda n: (torch.randn(n, c.latent_dim),)),
            EntryPoint("score", AAEScore(model), (image,), per_image, lambda n: (_example_images(model, n),)),
        ]
    if isinstance(model, DCGAN):
        z = TensorSpec("z", f32, (c.latent_dim,))
        return [
            EntryPoint(
                "generate", DCGANGenerate(model), (z, *labels), (image,),
                lambda n: (torch.randn(n, c.latent_dim), *_example_labels(model, n)),
            ),
            EntryPoint(
                "discriminate", DCGANDiscriminate(model), (image, *labels), (TensorSpec("logit", f32, (1,)),),
                images_and_labels,
            ),
        ]
    if isinstance(model, LogitFlow):
        z = TensorSpec("z", f32, image.shape)
        noise = TensorSpec("noise", f32, image.shape)

        def images_and_noise(n):
            return _example_images(model, n), torch.rand(n, *image.shape)

        encode = EntryPoint("encode", FlowEncode(model), (image, noise), (z, TensorSpec("log_det", f32, (1,))),
                            images_and_noise)
        score = EntryPoint("score", FlowScore(model), (image, noise), (TensorSpec("log_prob", f32, (1,)),),
                           images_and_noise)
        if isinstance(model, MAF):  # its inverse is sequential: the sampler's step program (export/steps.py)
            return [encode, score]
        decode = EntryPoint("decode", FlowDecode(model), (z,), (image,), lambda n: (torch.randn(n, *image.shape),))
        return [encode, decode, score] + (_pixel_discriminate(model) if isinstance(model, FlowGAN) else [])
    raise ValueError(f"no entry points defined for family {model.family!r}")
