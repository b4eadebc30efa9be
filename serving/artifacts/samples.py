"""A model's samples as its manifest's model_config describes them: shape, modality, the engine's layout.

Images are (C, H, W); audio (a config with a `length`) is (C, T) at `sample_rate` Hz. The
sampling engine works in rows: it lays audio out as (C, T / frame, frame), so a streamed sample
reports progress frame by frame, and the audio family reshapes the rows back to (C, T).
"""

from __future__ import annotations

from collections.abc import Mapping

IMAGE, AUDIO = "image", "audio"


def modality(model_config: Mapping) -> str:
    return AUDIO if "length" in model_config else IMAGE


def sample_shape(model_config: Mapping) -> tuple[int, ...]:
    """(C, H, W) of an image model, (C, T) of an audio model."""
    channels = int(model_config["channels"])
    if modality(model_config) == AUDIO:
        return (channels, int(model_config["length"]))
    size = int(model_config["image_size"])
    return (channels, size, size)


def engine_shape(model_config: Mapping) -> tuple[int, int, int]:
    """(C, rows, row width) as the sampling engine fills a sample, row by row."""
    if modality(model_config) == AUDIO:
        channels, length = sample_shape(model_config)
        frame = int(model_config["frame"])
        return (channels, length // frame, frame)
    return sample_shape(model_config)


def sample_rate(model_config: Mapping) -> int | None:
    """Samples per second of an audio model; None for images."""
    return int(model_config["sample_rate"]) if modality(model_config) == AUDIO else None
