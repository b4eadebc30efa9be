"""Bounds on a request's work that hold on every path: genserve's gRPC APIs and Triton's own models."""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgument

MAX_IMPORTANCE_SAMPLES = 1000  # K of a VAE bound: the size of the score entry point's free axis

# Rows × the sizes of free axes (a VAE score's importance samples) in one run of an artifact: the
# work, and so the memory, of a run grows with it (the shipped VAE's score holds ~70 KB of
# activations per importance sample: ~300 MB at this bound), so larger merged batches run in pieces.
MAX_WORK_PER_RUN = 4096

# The bytes of every tensor one run makes, summed, beyond which a merged batch runs in more pieces
# (measured per entry point: entry_runner.intermediate_bytes). Work alone misjudges heavy entry points:
# a PixelVAE score's importance sample is a whole PixelCNN pass over the image (~10 MB of tensors, 50x
# the VAE's), and 4096 of them in one run took the embedded server from 1.6 to 12.9 GB resident, which
# ONNX Runtime's arena then kept for the process's life. The sum overstates the peak (the buffers of
# dead tensors are reused): under concurrent scores of every shipped model, each entry point's arena
# grew by at most 0.5 GB at this bound. A single row over it (one PixelVAE image's K importance samples)
# runs its free axis in pieces where the manifest says how the outputs reduce over it (the VAE scores'):
# one image at K = 1000 took 2.2 GB resident in one run, 0.2 GB in pieces.
MAX_RUN_BYTES = 1 << 28


def check_free_axes(inputs, feeds: dict[str, np.ndarray]) -> None:
    """Refuses a free (-1) axis longer than MAX_IMPORTANCE_SAMPLES: rows are bounded by max_batch_size, a
    free axis only here, so a client calling an entry point directly cannot ask for unbounded work."""
    for spec in inputs:
        for axis, (size, declared) in enumerate(zip(feeds[spec.name].shape[1:], spec.shape), start=1):
            if declared == -1 and size > MAX_IMPORTANCE_SAMPLES:
                raise InvalidArgument(spec.name, f"has {size} entries on axis {axis}, over the limit of "
                                      f"{MAX_IMPORTANCE_SAMPLES}")
