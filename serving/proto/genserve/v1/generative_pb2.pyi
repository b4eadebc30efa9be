from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]

class Capability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPABILITY_UNSPECIFIED: _ClassVar[Capability]
    CAPABILITY_SAMPLE: _ClassVar[Capability]
    CAPABILITY_ENCODE: _ClassVar[Capability]
    CAPABILITY_DECODE: _ClassVar[Capability]
    CAPABILITY_SCORE: _ClassVar[Capability]

class ScoreKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_KIND_UNSPECIFIED: _ClassVar[ScoreKind]
    SCORE_KIND_EXACT: _ClassVar[ScoreKind]
    SCORE_KIND_LOWER_BOUND: _ClassVar[ScoreKind]
    SCORE_KIND_NOT_A_LIKELIHOOD: _ClassVar[ScoreKind]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_FLOAT32: DataType
CAPABILITY_UNSPECIFIED: Capability
CAPABILITY_SAMPLE: Capability
CAPABILITY_ENCODE: Capability
CAPABILITY_DECODE: Capability
CAPABILITY_SCORE: Capability
SCORE_KIND_UNSPECIFIED: ScoreKind
SCORE_KIND_EXACT: ScoreKind
SCORE_KIND_LOWER_BOUND: ScoreKind
SCORE_KIND_NOT_A_LIKELIHOOD: ScoreKind

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DataType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DataType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "capabilities", "image_shape", "pixel_levels", "num_classes", "latent_shape", "max_batch_size", "ready", "metrics_json", "modality", "sample_rate")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PIXEL_LEVELS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    capabilities: _containers.RepeatedScalarFieldContainer[Capability]
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    pixel_levels: int
    num_classes: int
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    max_batch_size: int
    ready: bool
    metrics_json: str
    modality: str
    sample_rate: int
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., capabilities: _Optional[_Iterable[_Union[Capability, str]]] = ..., image_shape: _Optional[_Iterable[int]] = ..., pixel_levels: _Optional[int] = ..., num_classes: _Optional[int] = ..., latent_shape: _Optional[_Iterable[int]] = ..., max_batch_size: _Optional[int] = ..., ready: _Optional[bool] = ..., metrics_json: _Optional[str] = ..., modality: _Optional[str] = ..., sample_rate: _Optional[int] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("model", "num_samples", "seed", "start_index", "temperature", "labels", "return_png")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PNG_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_samples: int
    seed: int
    start_index: int
    temperature: float
    labels: _containers.RepeatedScalarFieldContainer[int]
    return_png: bool
    def __init__(self, model: _Optional[str] = ..., num_samples: _Optional[int] = ..., seed: _Optional[int] = ..., start_index: _Optional[int] = ..., temperature: _Optional[float] = ..., labels: _Optional[_Iterable[int]] = ..., return_png: _Optional[bool] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("model", "seed", "start_index", "temperature", "images", "labels", "png")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    model: str
    seed: int
    start_index: int
    temperature: float
    images: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    png: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, model: _Optional[str] = ..., seed: _Optional[int] = ..., start_index: _Optional[int] = ..., temperature: _Optional[float] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., png: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SampleProgress(_message.Message):
    __slots__ = ("rows_done", "rows_total", "partial_images")
    ROWS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROWS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    rows_done: _containers.RepeatedScalarFieldContainer[int]
    rows_total: int
    partial_images: Tensor
    def __init__(self, rows_done: _Optional[_Iterable[int]] = ..., rows_total: _Optional[int] = ..., partial_images: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SampleStreamResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: SampleProgress
    result: SampleResponse
    def __init__(self, progress: _Optional[_Union[SampleProgress, _Mapping]] = ..., result: _Optional[_Union[SampleResponse, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: Tensor
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("model", "latents", "log_var", "log_det", "log_density")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    LOG_VAR_FIELD_NUMBER: _ClassVar[int]
    LOG_DET_FIELD_NUMBER: _ClassVar[int]
    LOG_DENSITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    latents: Tensor
    log_var: Tensor
    log_det: Tensor
    log_density: Tensor
    def __init__(self, model: _Optional[str] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., log_var: _Optional[_Union[Tensor, _Mapping]] = ..., log_det: _Optional[_Union[Tensor, _Mapping]] = ..., log_density: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "latents", "labels", "return_png", "seed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PNG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model: str
    latents: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    return_png: bool
    seed: int
    def __init__(self, model: _Optional[str] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., return_png: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("model", "images", "probabilities", "png")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: Tensor
    probabilities: Tensor
    png: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., png: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "images", "labels", "seed", "importance_samples")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    importance_samples: int
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., importance_samples: _Optional[int] = ...) -> None: ...

class Score(_message.Message):
    __slots__ = ("method", "kind", "values", "bits_per_dim")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_DIM_FIELD_NUMBER: _ClassVar[int]
    method: str
    kind: ScoreKind
    values: _containers.RepeatedScalarFieldContainer[float]
    bits_per_dim: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, method: _Optional[str] = ..., kind: _Optional[_Union[ScoreKind, str]] = ..., values: _Optional[_Iterable[float]] = ..., bits_per_dim: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model", "scores")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    model: str
    scores: _containers.RepeatedCompositeFieldContainer[Score]
    def __init__(self, model: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[Score, _Mapping]]] = ...) -> None: ...
