"""The spoken-digit corpus: the ten English digits synthesised offline by espeak-ng, at 8 kHz mu-law.

Each clip is one word ("zero" .. "nine", label = the digit) in one voice, speed and pitch
(`CorpusSpec`): espeak-ng's 22,050 Hz 16-bit output is resampled to 8 kHz (polyphase,
float64), trimmed of leading and trailing silence, peak-normalised, placed `lead` samples
into a clip of `length` samples of silence and mu-law encoded to 256 codes. espeak-ng is
deterministic, so `genserve make-speech` rebuilds the committed arrays bit for bit; their
digest is checked on load. The split is the one every dataset gets (data.py: shuffled with
SPLIT_SEED), holding out `held_out` clips.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import shutil
import subprocess
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

from genserve.clients.audio import mu_law_encode, read_wav

CORPUS_FILE = Path(__file__).parent / "datasets" / "spoken_digits.npz"
CORPUS_DIGEST = "9740596b135d03329d52c2903b7c98001c1fef470efac1c44fdd35e3083e2f33"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class CorpusSpec:
    voices: tuple[str, ...] = ("en-us+m1", "en-us+m3", "en-us+f2", "en-us+f4", "en-gb+m2", "en-gb+f1")
    speeds: tuple[int, ...] = (150, 175, 200)  # words per minute
    pitches: tuple[int, ...] = (30, 50, 70)  # espeak-ng's 0-99 scale
    sample_rate: int = 8000
    length: int = 6400  # 0.8 s
    lead: int = 320  # silence before the word
    silence: float = 0.02  # of the peak: quieter ends are trimmed
    peak: float = 0.9
    held_out: int = 54

    def takes(self) -> list[tuple[int, str, int, int]]:
        """(digit, voice, speed, pitch) of every clip, in file order."""
        return [(d, v, s, p) for d, (v, s, p) in itertools.product(
            range(10), itertools.product(self.voices, self.speeds, self.pitches))]


def synthesise(word: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """espeak-ng's waveform of `word`: (floats in [-1, 1], its sample rate)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        check=True, capture_output=True,
    ).stdout
    # espeak-ng streams its WAV with a placeholder length in the header: read the frames that are there.
    header = bytearray(wav[:44])
    header[40:44] = (len(wav) - 44).to_bytes(4, "little")
    return read_wav(io.BytesIO(bytes(header) + wav[44:]))


def to_clip(audio: np.ndarray, rate: int, spec: CorpusSpec) -> np.ndarray:
    """A waveform at any rate → (length,) mu-law codes: resampled, trimmed, normalised, placed."""
    from scipy.signal import resample_poly

    g = gcd(spec.sample_rate, rate)
    audio = resample_poly(audio, spec.sample_rate // g, rate // g)
    loud = np.flatnonzero(np.abs(audio) >= spec.silence * np.abs(audio).max())
    audio = audio[loud[0] : loud[-1] + 1] * (spec.peak / np.abs(audio).max())
    clip = np.zeros(spec.length)
    take = audio[: spec.length - spec.lead]
    clip[spec.lead : spec.lead + len(take)] = take
    return mu_law_encode(clip).astype(np.uint8)


def build_corpus(spec: CorpusSpec = CorpusSpec(), progress: bool = True) -> dict[str, np.ndarray]:
    """Every clip of `spec`: audio (N, 1, length) uint8 codes, labels (N,), and each clip's take."""
    from tqdm import tqdm

    takes = spec.takes()
    clips = [to_clip(*synthesise(WORDS[d], v, s, p), spec) for d, v, s, p in tqdm(takes, disable=not progress)]
    return {
        "audio": np.stack(clips)[:, None],
        "labels": np.array([t[0] for t in takes], dtype=np.int64),
        "voices": np.array([t[1] for t in takes]),
        "speeds": np.array([t[2] for t in takes], dtype=np.int64),
        "pitches": np.array([t[3] for t in takes], dtype=np.int64),
        "sample_rate": np.array(spec.sample_rate),
    }


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the arrays' names, dtypes, shapes and bytes (a zip file's own bytes carry timestamps)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def write_corpus(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes the arrays as a compressed .npz (check them with `digest`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def load_corpus(path: Path = CORPUS_FILE, expected: str | None = CORPUS_DIGEST) -> dict[str, np.ndarray]:
    """The corpus at `path` (default the committed one), checked against `expected` (None: unchecked)."""
    if not path.is_file():
        raise FileNotFoundError(f"no spoken-digit corpus at {path}; `genserve make-speech` builds it")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    if expected is not None and digest(arrays) != expected:
        raise ValueError(f"{path} does not hold the recorded corpus; rebuild it with `genserve make-speech`")
    return arrays
