"""The one check of sampling arguments, shared by every path that samples.

The gRPC handlers (serving/validation.py), the sampling engine's `submit`, Triton's sampler
models and the models' own `sample` all call `check_sampling`, so a seed, sample index,
temperature or label is accepted or refused the same way, with the same message, wherever it
arrives. Errors are `InvalidArgument` (a ValueError too) naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidArgument

MAX_SEED = 2**63  # seeds and sample indices travel as int64 (the wire, Triton, the noise generator)


def _values(values) -> list:
    """Python numbers (no int64 overflow) from a scalar, a sequence or an array."""
    if isinstance(values, np.ndarray):
        return values.ravel().tolist()
    if isinstance(values, (int, float, np.number)):
        return [values]
    return list(values)


def check_labels(labels: Sequence[int] | np.ndarray | None, count: int, num_classes: int | None,
                 field: str = "labels") -> np.ndarray | None:
    """Class labels, one per sample: required and in [0, num_classes) for a conditional model, else absent.

    Returns them as an (count,) int64 array, or None for an unconditional model.
    """
    given = labels is not None and len(labels) > 0
    if not num_classes:
        if given:
            raise InvalidArgument(field, "this model is unconditional; labels must be omitted")
        return None
    if not given:
        raise InvalidArgument(field, f"this model is conditional on {num_classes} classes; labels are required, "
                              f"one per sample ({count})")
    values = _values(labels)
    if len(values) != count:
        raise InvalidArgument(field, f"give one label per sample ({count}), got {len(values)}")
    if not all(isinstance(v, int) for v in values):
        raise InvalidArgument(field, f"labels must be integers, got {values[:8]}")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise InvalidArgument(field, f"labels must lie in [0, {num_classes}), got {bad[:8]}")
    return np.asarray(values, dtype=np.int64)


def check_sampling(seeds, indices, temperatures, labels, num_classes: int | None, *, seed_field: str = "seed",
                   index_field: str = "indices", temperature_field: str = "temperature",
                   label_field: str = "labels") -> None:
    """Refuses what no sampler can draw: seeds or sample indices outside [0, 2**63), a temperature
    that is not finite and >= 0, labels missing, extra or out of range (`check_labels`).

    Each argument is a scalar or one value per sample; the field names are the caller's own.
    """
    for field, values in ((seed_field, seeds), (index_field, indices)):
        values = _values(values)
        if not values:
            raise InvalidArgument(field, "must name at least one sample")
        low, high = min(values), max(values)
        if low < 0:
            raise InvalidArgument(field, f"must be >= 0, got {low}")
        if high >= MAX_SEED:
            raise InvalidArgument(field, f"must be < 2**63, got {high}")
    temperatures = np.asarray(temperatures, dtype=np.float64)
    if not np.all(np.isfinite(temperatures)) or np.any(temperatures < 0):
        shown = temperatures.ravel().tolist()
        shown = shown[0] if len(shown) == 1 else shown[:8]
        raise InvalidArgument(temperature_field, f"must be finite and >= 0, got {shown}")
    check_labels(labels, len(_values(indices)), num_classes, label_field)
