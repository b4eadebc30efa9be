"""The seam between the API's model layer and where tensors are computed.

A runtime runs a model's exported entry points (one Triton model each) on named numpy
tensors, and runs sequential sampling for autoregressive models. `embedded` does both in this
process; `triton` forwards them to a Triton server. Everything above this seam (validation,
noise, the family logic in `families.py`) is shared, which is what lets one conformance suite
hold both runtimes to the same answers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..artifacts import Manifest
from ..registry import ModelRegistry


@dataclass(frozen=True)
class SampleBatch:
    """Sequential samples to draw: sample k is sample `indices[k]` of `seed`."""

    seed: int
    indices: tuple[int, ...]
    temperature: float
    labels: tuple[int, ...] | None
    latents: np.ndarray | None = None  # (N, *latent shape) float32: each sample's z, for samplers that take them


@dataclass(frozen=True)
class Progress:
    """A snapshot of a sequential sampling request: rows completed per sample, and the images so far."""

    rows_done: np.ndarray  # (N,) int
    images: np.ndarray  # (N, C, H, W) uint8; rows not yet done are zeros


ProgressCallback = Callable[[Progress], None]


class Runtime(ABC):
    """Runs entry points; see the module docstring. Coroutines are called from the server's event loop."""

    @abstractmethod
    async def start(self, registry: ModelRegistry) -> None:
        """Loads (or checks) every model's entry points."""

    @abstractmethod
    async def infer(
        self, entry: Manifest, feeds: dict[str, np.ndarray], deadline: float | None
    ) -> dict[str, np.ndarray]:
        """Runs one entry point on a request's feeds (batch axis first); returns its outputs.

        Args:
            entry: the entry point's manifest (its Triton name, signature, batching).
            feeds: every input the manifest declares.
            deadline: `time.monotonic()` time after which the work is dropped (DeadlineExceeded).
        """

    @abstractmethod
    async def sample_sequential(
        self, sampler: Manifest, batch: SampleBatch, deadline: float | None, on_progress: ProgressCallback | None
    ) -> np.ndarray:
        """Draws autoregressive samples with the model's step program; (N, C, H, W) uint8.

        Cancelling the awaiting task stops the samples' compute at the next step boundary.
        """

    @abstractmethod
    def ready(self, entry: Manifest) -> bool:
        """Whether `entry` is loaded and answering."""

    async def refresh(self) -> None:  # noqa: B027 - optional: in-process runtimes know their state already
        """Re-reads what `ready` reports from wherever the models run (the server calls it periodically)."""

    @abstractmethod
    async def close(self) -> None:
        """Stops background work and releases connections."""
