"""The model zoo: one module per family, looked up by family name."""

from __future__ import annotations

from typing import Any

from .aae import AAE, AAEConfig
from .base import AudioConfig, GenerativeModel, ImageConfig, SampleConfig, Score, UnsupportedCapability
from .dcgan import DCGAN, DCGANConfig
from .flow_gan import FlowGAN, FlowGANConfig
from .gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from .iaf_vae import IAFVAE, IAFVAEConfig
from .maf import MAF, MAFConfig
from .pixel_vae import PixelVAE, PixelVAEConfig
from .pixelcnn import PixelCNN, PixelCNNConfig
from .pixelcnn_pp import PixelCNNPP, PixelCNNPPConfig
from .realnvp import RealNVP, RealNVPConfig
from .vae import VAE, VAEConfig
from .vae_gan import VAEGAN, VAEGANConfig
from .wavenet import WaveNet, WaveNetConfig

FAMILIES: dict[str, type[GenerativeModel]] = {
    cls.family: cls for cls in (
        PixelCNN, GatedPixelCNN, PixelCNNPP, WaveNet, VAE, IAFVAE, VAEGAN, AAE, PixelVAE, DCGAN, RealNVP, FlowGAN, MAF
    )
}


def model_class(family: str) -> type[GenerativeModel]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}") from None


def build_model(family: str, config: dict[str, Any] | SampleConfig | None = None) -> GenerativeModel:
    """Builds an untrained model of `family` from a config (dataclass, dict, or defaults)."""
    cls = model_class(family)
    if config is None:
        config = cls.config_class()
    elif isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    return cls(config)


__all__ = [
    "FAMILIES", "AudioConfig", "GenerativeModel", "ImageConfig", "SampleConfig", "Score", "UnsupportedCapability",
    "build_model", "model_class",
    "PixelCNN", "PixelCNNConfig", "GatedPixelCNN", "GatedPixelCNNConfig", "PixelCNNPP", "PixelCNNPPConfig",
    "WaveNet", "WaveNetConfig",
    "VAE", "VAEConfig", "IAFVAE", "IAFVAEConfig", "VAEGAN", "VAEGANConfig", "AAE", "AAEConfig",
    "PixelVAE", "PixelVAEConfig", "MAF", "MAFConfig",
    "DCGAN", "DCGANConfig", "RealNVP", "RealNVPConfig", "FlowGAN", "FlowGANConfig",
]
