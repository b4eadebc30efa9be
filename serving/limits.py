"""Bounds on a request's work that hold on every path: genserve's gRPC API and Triton's own models."""

MAX_IMPORTANCE_SAMPLES = 1000  # K of a VAE bound: the size of the score entry point's free axis

# Rows × the sizes of free axes (a VAE score's importance samples) in one run of an artifact: the
# work, and so the memory, of a run grows with it (the shipped VAE's score holds ~70 KB of
# activations per importance sample: ~300 MB at this bound), so larger merged batches run in pieces.
MAX_WORK_PER_RUN = 4096
