"""Batch generation jobs: many samples as sharded NPZ files, resumable and verifiable.

A job is a folder: `job.json` (the manifest) and one `shard-NNNNN.npz` per shard. Shard k holds
samples `k * shard_size ...` of the job's seed (the server's `start_index`), so every image can be
regenerated alone from (model, seed, index, temperature, label). The manifest records each
finished shard's sha256; a rerun of the same command skips shards whose file still matches,
and redoes the rest (never started, interrupted mid-write, or damaged). Files are written to a
temporary name and renamed, and the manifest is rewritten atomically after every shard, so a
kill at any moment leaves a resumable folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .audio import mu_law_decode, write_wav
from .client import AsyncClient, ModelInfo
from .errors import GenserveError
from .images import display_uint8

MANIFEST = "job.json"
FORMAT = "genserve-batch/1"


@dataclass(frozen=True)
class BatchJob:
    """What to generate; fixed for the life of a job folder."""

    model: str
    num: int
    shard_size: int
    seed: int
    temperature: float = 1.0
    label: int | None = None  # one label for all; None: image i gets i mod classes (conditional models)
    png: bool = False  # also write every image as a PNG (audio: every clip as a WAV) under shard-NNNNN/

    def __post_init__(self) -> None:
        if self.num < 1 or self.shard_size < 1:
            raise ValueError(f"--num and --shard-size must be >= 1, got {self.num}, {self.shard_size}")
        if self.seed < 0 or self.temperature < 0:
            raise ValueError(f"seed and temperature must be >= 0, got {self.seed}, {self.temperature}")

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min(self.num, (k + 1) * self.shard_size))


@dataclass
class Manifest:
    job: BatchJob
    shards: dict[str, dict] = field(default_factory=dict)  # "k" → {"file", "start_index", "count", "sha256"}
    failed: dict[str, str] = field(default_factory=dict)  # "k" → last error

    def write(self, folder: Path) -> None:
        tmp = folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"format": FORMAT, "job": asdict(self.job), "shards": self.shards,
                                   "failed": self.failed}, indent=1, sort_keys=True))
        os.replace(tmp, folder / MANIFEST)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        raw = json.loads((folder / MANIFEST).read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{folder / MANIFEST} is not a {FORMAT} manifest")
        return cls(BatchJob(**raw["job"]), raw["shards"], raw.get("failed", {}))


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_job(folder: Path, job: BatchJob | None, resume_seed: bool) -> tuple[Manifest, list[int]]:
    """The job's manifest (new or resumed) and the shards still to do.

    Args:
        folder: the job folder.
        job: what the command asks for; on resume it must equal the recorded job.
        resume_seed: the command gave no seed, so a resumed job keeps its recorded one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / MANIFEST).exists():
        manifest = Manifest.read(folder)
        asked = BatchJob(**{**asdict(job), "seed": manifest.job.seed}) if resume_seed else job
        if asked != manifest.job:
            raise ValueError(f"{folder} holds a different job ({manifest.job}); use a new --out to start another")
    else:
        manifest = Manifest(job)
    verified = {k for k, s in manifest.shards.items()
                if (folder / s["file"]).is_file() and sha256(folder / s["file"]) == s["sha256"]}
    manifest.shards = {k: manifest.shards[k] for k in verified}
    for stale in folder.glob(".shard-*.tmp"):  # a write cut short by a kill
        stale.unlink()
    manifest.write(folder)
    return manifest, [k for k in range(manifest.job.num_shards) if str(k) not in verified]


async def _generate_shard(client: AsyncClient, folder: Path, job: BatchJob, k: int, info: ModelInfo) -> dict:
    num_classes, levels = info.num_classes, info.pixel_levels
    indices = job.shard_range(k)
    labels = None
    if num_classes:
        labels = [job.label] * len(indices) if job.label is not None else [i % num_classes for i in indices]
    samples = await client.sample(job.model, len(indices), seed=job.seed, temperature=job.temperature,
                                  labels=labels, start_index=indices.start)
    name = shard_name(k)
    tmp, path = folder / f".{name}.tmp", folder / f"{name}.npz"
    with open(tmp, "wb") as out:
        np.savez(out, images=samples.images, indices=np.asarray(indices, dtype=np.int64),
                 labels=np.asarray(labels if labels is not None else [], dtype=np.int64),
                 seed=np.int64(job.seed), temperature=np.float32(job.temperature), levels=np.int64(levels))
    os.replace(tmp, path)
    if job.png and info.modality == "audio":  # a WAV file per clip instead
        pngs = folder / name
        for i, clip in zip(indices, samples.images):
            write_wav(pngs / f"{i:08d}.wav", mu_law_decode(clip.reshape(-1), levels), info.sample_rate)
    elif job.png:
        from PIL import Image

        pngs = folder / name
        pngs.mkdir(exist_ok=True)
        for i, image in zip(indices, display_uint8(samples.images, levels)):
            Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(pngs / f"{i:08d}.png")
    return {"file": path.name, "start_index": indices.start, "count": len(indices), "sha256": sha256(path)}


async def run_job(client: AsyncClient, folder: Path, manifest: Manifest, todo: list[int], concurrency: int,
                  attempts: int, on_shard: Callable[[int], None] = lambda n: None) -> dict[str, str]:
    """Generates shards `todo`, `concurrency` requests at a time, each tried up to `attempts` times.

    Returns:
        shard → error for the shards that failed every attempt (also recorded in the manifest).
    """
    job = manifest.job
    info = await client.model(job.model)
    if "sample" not in info.capabilities:
        raise ValueError(f"model {job.model} cannot sample (it offers {', '.join(info.capabilities)})")
    if job.label is not None and not info.num_classes:
        raise ValueError(f"model {job.model} is unconditional; drop --label")
    gate = asyncio.Semaphore(concurrency)
    failed: dict[str, str] = {}

    async def one(k: int) -> None:
        async with gate:
            for attempt in range(attempts):
                try:
                    record = await _generate_shard(client, folder, job, k, info)
                    break
                except GenserveError as error:
                    failed[str(k)] = str(error)
                    if attempt + 1 < attempts:
                        await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
            else:
                manifest.failed = {**manifest.failed, str(k): failed[str(k)]}
                manifest.write(folder)
                return
            failed.pop(str(k), None)
            manifest.shards[str(k)] = record
            manifest.failed.pop(str(k), None)
            manifest.write(folder)
            on_shard(record["count"])

    await asyncio.gather(*(one(k) for k in todo))
    return failed


def new_seed() -> int:
    return secrets.randbelow(2**63)
