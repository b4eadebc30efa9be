"""validate → from_pb: every request field checked against the model before any work starts.

Each function takes a request message and the model's spec, and returns plain values (numpy
arrays, dataclasses) or raises `InvalidArgument` naming the field and what was expected, or
`ResourceExhausted` for counts over the server's limits. Protobuf types stop here and in
service.py.
"""

from __future__ import annotations

import secrets

import numpy as np

from genserve.v1 import generative_pb2 as pb

from .errors import InvalidArgument, ResourceExhausted
from .families import SampleParams
from .limits import MAX_IMPORTANCE_SAMPLES
from .registry import ModelSpec
from .sampling_args import MAX_SEED, check_labels, check_sampling
from .tensors import to_numpy


def check_count(field: str, count: int, limit: int) -> None:
    if count < 1:
        raise InvalidArgument(field, f"must be >= 1, got {count}")
    if count > limit:
        raise ResourceExhausted(f"{field}: {count} is over this server's limit of {limit} per request "
                                "(serve --max-samples-per-request); split it")


def labels_for(spec: ModelSpec, labels, count: int, field: str = "labels", default_cycle: bool = False
               ) -> np.ndarray | None:
    """One label per row: given once for all, once per row, or (sampling only) cycled through the classes."""
    labels = list(labels)
    if not spec.num_classes:
        if labels:
            raise InvalidArgument(field, f"model '{spec.name}' is unconditional; send no labels")
        return None
    if not labels:
        if default_cycle:
            return np.arange(count, dtype=np.int64) % spec.num_classes
        raise InvalidArgument(field, f"model '{spec.name}' is conditional: give one label for all rows or {count}")
    if len(labels) not in (1, count):
        raise InvalidArgument(field, f"give 1 label or {count} (one per row), got {len(labels)}")
    return check_labels(labels * count if len(labels) == 1 else labels, count, spec.num_classes, field)


def images_from(tensor: pb.Tensor, spec: ModelSpec, limit: int, field: str = "images") -> np.ndarray:
    images = to_numpy(tensor, field, pb.DATA_TYPE_UINT8, (None, *spec.image_shape))
    check_count(f"{field}.shape[0]", len(images), limit)
    if images.max() >= spec.pixel_levels:
        raise InvalidArgument(f"{field}.data", f"pixel values must lie in [0, {spec.pixel_levels}), "
                              f"got a maximum of {int(images.max())}")
    return images


def latents_from(tensor: pb.Tensor, spec: ModelSpec, limit: int, field: str = "latents") -> np.ndarray:
    latents = to_numpy(tensor, field, pb.DATA_TYPE_FLOAT32, (None, *spec.latent_shape))
    check_count(f"{field}.shape[0]", len(latents), limit)
    if not np.all(np.isfinite(latents)):
        raise InvalidArgument(f"{field}.data", f"latents must be finite, got {int((~np.isfinite(latents)).sum())} "
                              "NaN or infinite values")
    return latents


def sample_params(request: pb.SampleRequest, spec: ModelSpec, limit: int) -> SampleParams:
    check_count("num_samples", request.num_samples, limit)
    seed = request.seed if request.HasField("seed") else secrets.randbelow(MAX_SEED)
    temperature = request.temperature if request.HasField("temperature") else 1.0
    labels = labels_for(spec, request.labels, request.num_samples, default_cycle=True)
    indices = range(request.start_index, request.start_index + request.num_samples)
    check_sampling(seed, indices, temperature, labels, spec.num_classes, index_field="start_index")
    return SampleParams(request.num_samples, seed, request.start_index, float(temperature), labels)


def checked_seed(seed: int) -> int:
    """A request's explicit seed (uint64 on the wire), refused at 2**63 and above (it travels as int64)."""
    if seed >= MAX_SEED:
        raise InvalidArgument("seed", f"must be < 2**63, got {seed}")
    return seed


def score_options(request: pb.ScoreRequest, spec: ModelSpec, rows: int, max_work: int) -> tuple[int, int | None]:
    """(seed, importance_samples) of a Score request of `rows` images; rows × K is bounded by `max_work`."""
    seed = checked_seed(request.seed if request.HasField("seed") else 0)
    if not request.HasField("importance_samples"):
        return seed, None
    k = request.importance_samples
    if not spec.takes_importance_samples:
        raise InvalidArgument("importance_samples", f"only VAE bounds take K; model '{spec.name}' is {spec.family}")
    if not 1 <= k <= MAX_IMPORTANCE_SAMPLES:
        raise InvalidArgument("importance_samples", f"must lie in [1, {MAX_IMPORTANCE_SAMPLES}], got {k}")
    if rows * k > max_work:
        raise ResourceExhausted(f"importance_samples: {rows} images x {k} samples = {rows * k} decoder passes is over "
                                f"this server's limit of {max_work} (serve --max-importance-work); ask for fewer")
    return seed, k
