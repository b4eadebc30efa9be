"""Audio on the client side: mu-law codes, WAV files and a picture of waveforms.

An audio model's samples are (N, 1, T) mu-law codes in [0, levels) (ITU-T G.711's continuous
form, mu = levels - 1): `genserve sample` writes them as 16-bit PCM WAV files, one per sample,
plus a PNG of the waveforms; `genserve score` reads WAV (any rate is refused but the model's)
or NPZ files back into codes.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw


def mu_law_encode(audio: np.ndarray, levels: int = 256) -> np.ndarray:
    """Floats in [-1, 1] → integer codes in [0, levels), rounding to the nearest code."""
    mu = levels - 1
    x = np.clip(np.asarray(audio, dtype=np.float64), -1.0, 1.0)
    compressed = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)  # in [-1, 1]
    return np.floor((compressed + 1.0) / 2.0 * mu + 0.5).astype(np.int64)


def mu_law_decode(codes: np.ndarray, levels: int = 256) -> np.ndarray:
    """Codes in [0, levels) → floats in [-1, 1]: the inverse of `mu_law_encode` at the code centres."""
    mu = levels - 1
    compressed = 2.0 * np.asarray(codes, dtype=np.float64) / mu - 1.0
    return np.sign(compressed) * np.expm1(np.abs(compressed) * np.log1p(mu)) / mu


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Mono floats in [-1, 1] → a 16-bit PCM WAV file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return path


def read_wav(path: str | Path | BinaryIO) -> tuple[np.ndarray, int]:
    """A mono 8- or 16-bit PCM WAV file (a path or an open binary file) → (floats in [-1, 1], sample rate)."""
    with wave.open(path if hasattr(path, "read") else str(path), "rb") as source:
        channels, width, rate = source.getnchannels(), source.getsampwidth(), source.getframerate()
        raw = source.readframes(source.getnframes())
    if channels != 1:
        raise ValueError(f"{path}: only mono WAV files are read, this one has {channels} channels")
    if width == 2:  # full scale is 32767, as `write_wav` writes it; -32768 clips to -1
        return np.maximum(np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32767.0, -1.0), rate
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0, rate
    raise ValueError(f"{path}: only 8- or 16-bit PCM WAV files are read, this one has {8 * width}-bit samples")


def waveforms_png(codes: np.ndarray, levels: int, height: int = 64, width: int = 640) -> Image.Image:
    """(N, 1, T) codes → one strip per sample, min/max of the decoded waveform per pixel column."""
    n, length = codes.shape[0], codes.shape[-1]
    picture = Image.new("L", (width, n * (height + 4) + 4), 255)
    draw = ImageDraw.Draw(picture)
    for k in range(n):
        audio = mu_law_decode(codes[k].reshape(-1), levels)
        top = 4 + k * (height + 4)
        draw.line([(0, top + height // 2), (width - 1, top + height // 2)], fill=200)
        for column, chunk in enumerate(np.array_split(audio, min(width, length))):
            low, high = (top + (1 - v) * (height - 1) / 2 for v in (chunk.max(), chunk.min()))
            draw.line([(column, low), (column, high)], fill=0)
    return picture


def write_audio(path: str | Path, codes: np.ndarray, levels: int, sample_rate: int) -> list[Path]:
    """Samples (N, 1, T) as `stem-K.wav` files beside `path` plus `path` itself, a PNG of the waveforms
    (or `path` alone: an .npz of the codes). Returns the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez_compressed(path, audio=codes, levels=np.array(levels), sample_rate=np.array(sample_rate))
        return [path]
    if path.suffix not in (".png", ".wav"):
        raise ValueError(f"output must end in .wav, .png or .npz, got {path.name!r}")
    written = [
        write_wav(path.with_name(f"{path.stem}-{k}.wav"), mu_law_decode(codes[k].reshape(-1), levels), sample_rate)
        for k in range(len(codes))
    ]
    picture = path.with_suffix(".png")
    waveforms_png(codes, levels).save(picture)
    return [*written, picture]


def read_audio(paths: list[str], levels: int, sample_rate: int, length: int) -> np.ndarray:
    """Codes (N, 1, length) uint8 from WAV files (at `sample_rate`, mu-law encoded here) and/or NPZ files
    (an `audio` array of codes, what `genserve sample` writes)."""
    batches = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no such audio file: {path}")
        if path.suffix == ".npz":
            with np.load(path) as data:
                if "audio" not in data:
                    raise ValueError(f"{path} has no 'audio' array (it has {', '.join(data.files)})")
                codes = data["audio"]
            batches.append(codes.reshape(len(codes), 1, -1))
            continue
        audio, rate = read_wav(path)
        if rate != sample_rate:
            raise ValueError(f"{path}: recorded at {rate} Hz; the model takes {sample_rate} Hz audio")
        batches.append(mu_law_encode(audio, levels).reshape(1, 1, -1))
    for path, batch in zip(paths, batches):
        if batch.shape[-1] != length:
            raise ValueError(f"{path}: {batch.shape[-1]} samples; the model scores clips of exactly {length}")
    return np.concatenate(batches).astype(np.uint8)
