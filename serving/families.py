"""What each family does for Sample / Encode / Decode / Score, on top of a runtime's entry points.

Which capabilities each family has, and how each is computed. Randomness is drawn here, per
(seed, sample index), from `kernels.sampling` (the same functions the models' own
`sample`/`scores` use), and passed to deterministic exported graphs: so a served sample or
score equals the model's own, in every runtime. Inputs arrive validated (validation.py);
results leave as the small dataclasses below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .kernels.sampling import LATENT_STREAM, choose_pixels, gaussian_noise, uniform_noise
from .registry import ModelSpec
from .runtimes.base import ProgressCallback, Runtime, SampleBatch

EXACT, LOWER_BOUND, NOT_A_LIKELIHOOD = "exact", "lower_bound", "not_a_likelihood"


@dataclass(frozen=True)
class SampleParams:
    count: int
    seed: int
    start_index: int
    temperature: float
    labels: np.ndarray | None  # (count,) int64 for conditional models

    @property
    def indices(self) -> range:
        return range(self.start_index, self.start_index + self.count)


@dataclass(frozen=True)
class Encoded:
    latents: np.ndarray  # (N, *latent_shape) float32
    log_var: np.ndarray | None = None  # VAE
    log_det: np.ndarray | None = None  # flows, (N,)
    log_density: np.ndarray | None = None  # VAEs with a flow posterior: log q(z | x), (N,)


@dataclass(frozen=True)
class Decoded:
    images: np.ndarray  # (N, C, H, W) uint8
    probabilities: np.ndarray | None = None  # VAE Bernoulli means


@dataclass(frozen=True)
class ScoreSet:
    method: str
    kind: str  # EXACT, LOWER_BOUND or NOT_A_LIKELIHOOD
    values: np.ndarray  # (N,) float64: log p(x) in nats, or the method's own figure

    def bits_per_dim(self, dims: int) -> np.ndarray | None:
        return None if self.kind == NOT_A_LIKELIHOOD else -self.values / (math.log(2) * dims)


class Family:
    """One model's capabilities. Methods of capabilities the family lacks are never called
    (the service checks `ModelSpec.require` first)."""

    def __init__(self, spec: ModelSpec, runtime: Runtime) -> None:
        self.spec, self.runtime = spec, runtime

    async def _run(self, entry: str, deadline: float | None, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return await self.runtime.infer(self.spec.entry(entry), feeds, deadline)

    async def _discriminator(self, images: np.ndarray, labels: np.ndarray | None, deadline: float | None
                             ) -> ScoreSet:
        out = await self._run("discriminate", deadline, **self._with_labels({"images": images}, labels))
        return ScoreSet("discriminator", NOT_A_LIKELIHOOD, out["logit"][:, 0].astype(np.float64))

    def _with_labels(self, feeds: dict[str, np.ndarray], labels: np.ndarray | None) -> dict[str, np.ndarray]:
        if self.spec.num_classes:
            feeds["labels"] = labels.reshape(-1, 1).astype(np.int64)
        return feeds

    async def sample(self, p: SampleParams, deadline: float | None, on_progress: ProgressCallback | None
                     ) -> np.ndarray:
        raise NotImplementedError

    async def encode(self, images: np.ndarray, deadline: float | None) -> Encoded:
        raise NotImplementedError

    async def decode(self, latents: np.ndarray, labels: np.ndarray | None, seed: int, deadline: float | None
                     ) -> Decoded:
        """Images of latents (N, *latent_shape); `seed` keys the pixel noise of decoders that draw pixels."""
        raise NotImplementedError

    async def score(self, images: np.ndarray, labels: np.ndarray | None, seed: int, importance_samples: int | None,
                    deadline: float | None) -> list[ScoreSet]:
        raise NotImplementedError


def _gaussian(p: SampleParams, shape: tuple[int, ...]) -> np.ndarray:
    return gaussian_noise(p.seed, p.indices, shape).numpy()


class Autoregressive(Family):
    """PixelCNN, Gated PixelCNN, PixelCNN++, WaveNet: the cached sampling engine; exact log p(x) from one
    logits pass."""

    async def sample(self, p, deadline, on_progress):
        labels = None if p.labels is None else tuple(int(v) for v in p.labels)
        batch = SampleBatch(p.seed, tuple(p.indices), p.temperature, labels)
        images = await self.runtime.sample_sequential(self.spec.entry("sample"), batch, deadline, on_progress)
        return images.reshape(p.count, *self.spec.image_shape)  # the engine's rows: audio comes as frames

    async def score(self, images, labels, seed, importance_samples, deadline):
        logits = (await self._run("logits", deadline, **self._with_labels({"images": images}, labels)))["logits"]
        log_probs = torch.log_softmax(torch.from_numpy(logits).double(), dim=1)  # (N, L, C, H, W)
        picked = log_probs.gather(1, torch.from_numpy(images).long().unsqueeze(1)).squeeze(1)  # (N, C, H, W)
        return [ScoreSet("exact", EXACT, picked.flatten(1).sum(1).numpy())]


class VAE(Family):
    """z ~ N(0, I) → decoder → Bernoulli pixels; q(z|x) mean and log-variance; ELBO and IWAE-K bounds."""

    async def sample(self, p, deadline, on_progress):
        z = _gaussian(p, self.spec.latent_shape)
        probs = (await self._run("decode", deadline, z=z))["probs"]
        # Pixels by inverse CDF on stream-1 noise, from the two-class logits (0, logit p): VAE.sample's rule.
        logit = torch.logit(torch.from_numpy(probs)).clamp(-30.0, 30.0)  # saturated p = 1 would give inf
        two_class = torch.stack([torch.zeros_like(logit), logit], dim=1)  # (N, 2, C, H, W)
        noise = uniform_noise(p.seed, p.indices, self.spec.image_shape, stream=1)
        return choose_pixels(two_class, noise, p.temperature).to(torch.uint8).numpy()

    async def encode(self, images, deadline):
        out = await self._run("encode", deadline, images=images)
        return Encoded(out["mean"], log_var=out["log_var"])

    async def decode(self, latents, labels, seed, deadline):
        probs = (await self._run("decode", deadline, z=latents))["probs"]
        return Decoded((probs > 0.5).astype(np.uint8), probabilities=probs)  # the most likely image

    async def score(self, images, labels, seed, importance_samples, deadline):
        k = importance_samples or int(self.spec.model_config["score_samples"])
        # Image i's K draws are keyed by (seed, i): VAE.bounds' rule, so figures match the model's own.
        eps = gaussian_noise(seed, range(len(images)), (k, *self.spec.latent_shape)).numpy()  # (N, K, D)
        out = await self._run("score", deadline, images=images, eps=eps)
        return [
            ScoreSet("elbo", LOWER_BOUND, out["elbo"][:, 0].astype(np.float64)),
            ScoreSet(f"iwae-{k}", LOWER_BOUND, out["iwae"][:, 0].astype(np.float64)),
        ]


class IAFVAE(VAE):
    """The VAE's Sample, Decode and Score; Encode gives the flowed code of the posterior's mode and log q of it."""

    async def encode(self, images, deadline):
        out = await self._run("encode", deadline, images=images)
        return Encoded(out["z"], log_density=out["log_density"][:, 0])


class VAEGAN(VAE):
    """The VAE's capabilities; Score adds the pixel discriminator's logit, not a likelihood."""

    async def score(self, images, labels, seed, importance_samples, deadline):
        bounds = await super().score(images, labels, seed, importance_samples, deadline)
        return [*bounds, await self._discriminator(images, labels, deadline)]


class AAE(VAE):
    """The VAE's Sample and Decode; Encode gives the deterministic code; Score gives log p(x | E(x)) and
    the latent discriminator's logit, neither a likelihood."""

    async def encode(self, images, deadline):
        return Encoded((await self._run("encode", deadline, images=images))["z"])

    async def score(self, images, labels, seed, importance_samples, deadline):
        out = await self._run("score", deadline, images=images)
        return [
            ScoreSet("reconstruction", NOT_A_LIKELIHOOD, out["reconstruction"][:, 0].astype(np.float64)),
            ScoreSet("latent_discriminator", NOT_A_LIKELIHOOD, out["latent_logit"][:, 0].astype(np.float64)),
        ]


async def _engine_draw(family: Family, seed: int, indices, temperature: float, latents: np.ndarray,
                       deadline: float | None, on_progress: ProgressCallback | None) -> np.ndarray:
    """Images from the sampling engine over `family`'s step program, each sample bringing its own z."""
    batch = SampleBatch(seed, tuple(indices), temperature, None, latents=np.ascontiguousarray(latents, np.float32))
    return await family.runtime.sample_sequential(family.spec.entry("sample"), batch, deadline, on_progress)


class PixelVAE(VAE):
    """The VAE's Encode and Score (bounds whose log p(x|z) is the PixelCNN decoder's); Sample and Decode run
    the sampling engine over the decoder's step program with z per sample: prior draws, or the given latents."""

    async def sample(self, p, deadline, on_progress):
        z = gaussian_noise(p.seed, p.indices, self.spec.latent_shape, stream=LATENT_STREAM).numpy()
        return await _engine_draw(self, p.seed, p.indices, p.temperature, z, deadline, on_progress)

    async def decode(self, latents, labels, seed, deadline):
        return Decoded(await _engine_draw(self, seed, range(len(latents)), 1.0, latents, deadline, None))


class DCGAN(Family):
    """G(z) for z ~ N(0, T² I); Decode is G on given z; Score is D(x), not a likelihood."""

    async def sample(self, p, deadline, on_progress):
        z = _gaussian(p, self.spec.latent_shape) * np.float32(p.temperature)
        return (await self._run("generate", deadline, **self._with_labels({"z": z}, p.labels)))["images"]

    async def decode(self, latents, labels, seed, deadline):
        return Decoded((await self._run("generate", deadline, **self._with_labels({"z": latents}, labels)))["images"])

    async def score(self, images, labels, seed, importance_samples, deadline):
        return [await self._discriminator(images, labels, deadline)]


class Flow(Family):
    """RealNVP: the inverse flow on z ~ N(0, T² I); x ↔ z; log p(x + u) with uniform dequantisation."""

    async def sample(self, p, deadline, on_progress):
        z = _gaussian(p, self.spec.image_shape) * np.float32(p.temperature)
        return (await self._run("decode", deadline, z=z))["images"]

    async def encode(self, images, deadline):
        centres = np.full(images.shape, 0.5, dtype=np.float32)  # pixels at their bin centres, as RealNVP.encode
        out = await self._run("encode", deadline, images=images, noise=centres)
        return Encoded(out["z"], log_det=out["log_det"][:, 0])

    async def decode(self, latents, labels, seed, deadline):
        return Decoded((await self._run("decode", deadline, z=latents))["images"])

    async def score(self, images, labels, seed, importance_samples, deadline):
        noise = uniform_noise(seed, range(len(images)), self.spec.image_shape).numpy()  # RealNVP.log_prob's rule
        log_prob = (await self._run("score", deadline, images=images, noise=noise))["log_prob"]
        return [ScoreSet("dequantised", LOWER_BOUND, log_prob[:, 0].astype(np.float64))]


class FlowGAN(Flow):
    """RealNVP's capabilities; Score adds the discriminator's logit, not a likelihood."""

    async def score(self, images, labels, seed, importance_samples, deadline):
        likelihood = await super().score(images, labels, seed, importance_samples, deadline)
        return [*likelihood, await self._discriminator(images, labels, deadline)]


class MAF(Flow):
    """The flow's Encode and Score (one parallel pass); Sample (z ~ N(0, T² I)) and Decode invert the stack one
    pixel per step in the sampling engine, z given per sample."""

    async def sample(self, p, deadline, on_progress):
        z = _gaussian(p, self.spec.image_shape) * np.float32(p.temperature)
        return await _engine_draw(self, p.seed, p.indices, p.temperature, z, deadline, on_progress)

    async def decode(self, latents, labels, seed, deadline):
        return Decoded(await _engine_draw(self, seed, range(len(latents)), 1.0, latents, deadline, None))


FAMILIES: dict[str, type[Family]] = {
    "pixelcnn": Autoregressive,
    "gated_pixelcnn": Autoregressive,
    "pixelcnn_pp": Autoregressive,
    "wavenet": Autoregressive,
    "vae": VAE,
    "iaf_vae": IAFVAE,
    "vae_gan": VAEGAN,
    "aae": AAE,
    "pixel_vae": PixelVAE,
    "dcgan": DCGAN,
    "realnvp": Flow,
    "flow_gan": FlowGAN,
    "maf": MAF,
}
