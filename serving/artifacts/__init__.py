"""The repository format export writes and serving reads: manifests, tensors, dtypes, step programs.

export writes only through `write_manifest`; the server, the engine and Triton's Python
models read only through `load_manifest`.
"""

from .dtypes import DTYPES, FP32, FP64, INT64, UINT8, DType, dtype_named, dtype_of
from .fields import ManifestError
from .manifest import (
    FLAVOURS,
    MANIFEST,
    MANIFEST_FORMAT,
    ArtifactIntegrityError,
    Batching,
    Manifest,
    Training,
    load_manifest,
    sha256,
    write_manifest,
)
from .samples import AUDIO, IMAGE, engine_shape, modality, sample_rate, sample_shape
from .specs import TensorSpec
from .step import (
    CONTROLS,
    GRAPH_NAMES,
    NEXT,
    PIXEL,
    REFRESH,
    START,
    STEP_KINDS,
    FusedSection,
    GraphSignature,
    StepSection,
)

__all__ = [
    "AUDIO", "IMAGE", "engine_shape", "modality", "sample_rate", "sample_shape",
    "CONTROLS", "DTYPES", "FLAVOURS", "FP32", "FP64", "GRAPH_NAMES", "INT64", "MANIFEST", "MANIFEST_FORMAT", "NEXT",
    "PIXEL", "REFRESH", "START", "STEP_KINDS", "UINT8", "ArtifactIntegrityError", "Batching", "DType", "FusedSection",
    "GraphSignature", "Manifest", "ManifestError", "StepSection", "TensorSpec", "Training", "dtype_named", "dtype_of",
    "load_manifest", "sha256", "write_manifest",
]
