"""Bounds on a request's work that hold on every path: genserve's gRPC APIs and Triton's own models."""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgument

MAX_IMPORTANCE_SAMPLES = 1000  # K of a VAE bound: the size of the score entry point's free axis

# Rows × the sizes of free axes (a VAE score's importance samples) in one run of an artifact: the
# work, and so the memory, of a run grows with it (the shipped VAE's score holds ~70 KB of
# activations per importance sample: ~300 MB at this bound), so larger merged batches run in pieces.
MAX_WORK_PER_RUN = 4096


def check_free_axes(inputs, feeds: dict[str, np.ndarray]) -> None:
    """Refuses a free (-1) axis longer than MAX_IMPORTANCE_SAMPLES: rows are bounded by max_batch_size, a
    free axis only here, so a client calling an entry point directly cannot ask for unbounded work."""
    for spec in inputs:
        for axis, (size, declared) in enumerate(zip(feeds[spec.name].shape[1:], spec.shape), start=1):
            if declared == -1 and size > MAX_IMPORTANCE_SAMPLES:
                raise InvalidArgument(spec.name, f"has {size} entries on axis {axis}, over the limit of "
                                      f"{MAX_IMPORTANCE_SAMPLES}")
