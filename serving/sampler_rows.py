"""A sampler entry point's rows as engine work, and the progress responses of one request.

The `<model>_sample` entry point takes one row per sample: (seed, index, temperature[, label][, latents]).
`sample_batches` groups a request's rows into `SampleBatch`es (rows sharing a seed and a
temperature draw together); `RequestProgress` gathers the batches' progress back into the
request's row order and says when a response is due: each time every row has one more image row
done. A request for H-row images therefore gets at most H responses, each with `images` (rows not
yet done are zeros) and `rows_done`, and the last one holds the finished images. A request whose
parameter `progress` is false gets that last response only: no partial images to copy and send.
Triton's decoupled sampler model and genserve's KServe v2 front end both answer this way.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgument
from .runtimes.base import SampleBatch
from .sampling_args import check_sampling

PROGRESS_OUTPUT = "rows_done"  # (N, 1) int64: image rows completed per sample
PROGRESS_PARAMETER = "progress"  # request parameter, bool, default true: false sends the final response only


def wants_progress(value: object) -> bool:
    """A request's `progress` parameter (None when absent), checked."""
    if value is None:
        return True
    if not isinstance(value, bool):
        raise InvalidArgument(f"parameter {PROGRESS_PARAMETER}", f"must be a bool, got {value!r}")
    return value


def check_sampler_feeds(feeds: dict[str, np.ndarray], num_classes: int | None) -> None:
    """The sampling arguments of every row, checked as every sampling path checks them (InvalidArgument)."""
    check_sampling(feeds["seed"], feeds["index"], feeds["temperature"], feeds.get("labels"), num_classes,
                   index_field="index")
    if "latents" in feeds and not np.isfinite(feeds["latents"]).all():
        raise InvalidArgument("latents", "must be finite")


def sample_batches(feeds: dict[str, np.ndarray]) -> list[tuple[np.ndarray, SampleBatch]]:
    """(row positions, batch) per (seed, temperature) in the request, in order of first appearance."""
    seeds, indices = feeds["seed"][:, 0].tolist(), feeds["index"][:, 0].tolist()
    temperatures = feeds["temperature"][:, 0].tolist()
    labels = feeds["labels"][:, 0].tolist() if "labels" in feeds else None
    latents = feeds.get("latents")
    groups: dict[tuple[int, float], list[int]] = {}
    for row, key in enumerate(zip(seeds, temperatures)):
        groups.setdefault(key, []).append(row)
    return [
        (np.asarray(rows), SampleBatch(seed=seed, indices=tuple(indices[r] for r in rows), temperature=temperature,
                                       labels=None if labels is None else tuple(labels[r] for r in rows),
                                       latents=None if latents is None else latents[rows]))
        for (seed, temperature), rows in groups.items()
    ]


class RequestProgress:
    """One request's images and rows done, filled in batch by batch (see the module docstring)."""

    def __init__(self, rows: int, sample_shape: tuple[int, ...]) -> None:
        self.images = np.zeros((rows, *sample_shape), dtype=np.uint8)
        self.rows_done = np.zeros(rows, dtype=np.int64)
        self.height = sample_shape[1]
        self.reported = 0  # rows every sample had done at the last response

    def update(self, positions: np.ndarray, rows_done: np.ndarray, images: np.ndarray) -> bool:
        """Takes one batch's progress; True when a response is due (every row has a new row done)."""
        self.images[positions] = images
        self.rows_done[positions] = rows_done
        low = int(self.rows_done.min())
        if low <= self.reported:
            return False
        self.reported = low
        return True

    @property
    def complete(self) -> bool:
        return self.reported == self.height

    def outputs(self) -> dict[str, np.ndarray]:
        """The response's tensors (copies: the batches keep filling the arrays)."""
        return {"images": self.images.copy(), PROGRESS_OUTPUT: self.rows_done.reshape(-1, 1).copy()}
