from sae_shared.proto.saev.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InterveneRequest(_message.Message):
    __slots__ = ("sae_id", "head_id", "images", "edits", "top_k", "return_activations")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    head_id: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    edits: _containers.RepeatedCompositeFieldContainer[_common_pb2.LatentEdit]
    top_k: int
    return_activations: bool
    def __init__(self, sae_id: _Optional[str] = ..., head_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., edits: _Optional[_Iterable[_Union[_common_pb2.LatentEdit, _Mapping]]] = ..., top_k: _Optional[int] = ..., return_activations: _Optional[bool] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("logits", "labels", "top")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    logits: _common_pb2.Tensor
    labels: _common_pb2.Tensor
    top: _common_pb2.ClassScores
    def __init__(self, logits: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., labels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., top: _Optional[_Union[_common_pb2.ClassScores, _Mapping]] = ...) -> None: ...

class InterventionResult(_message.Message):
    __slots__ = ("image_id", "before", "after", "change_rate", "activations_before", "activations_after", "drift")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    CHANGE_RATE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_AFTER_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    before: Prediction
    after: Prediction
    change_rate: float
    activations_before: _common_pb2.Tensor
    activations_after: _common_pb2.Tensor
    drift: _common_pb2.OffTargetDrift
    def __init__(self, image_id: _Optional[str] = ..., before: _Optional[_Union[Prediction, _Mapping]] = ..., after: _Optional[_Union[Prediction, _Mapping]] = ..., change_rate: _Optional[float] = ..., activations_before: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., activations_after: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., drift: _Optional[_Union[_common_pb2.OffTargetDrift, _Mapping]] = ...) -> None: ...

class InterveneResponse(_message.Message):
    __slots__ = ("results", "layout")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[InterventionResult]
    layout: _common_pb2.TokenLayout
    def __init__(self, results: _Optional[_Iterable[_Union[InterventionResult, _Mapping]]] = ..., layout: _Optional[_Union[_common_pb2.TokenLayout, _Mapping]] = ...) -> None: ...

class PreviewInterventionRequest(_message.Message):
    __slots__ = ("sae_id", "images", "edits")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    edits: _containers.RepeatedCompositeFieldContainer[_common_pb2.LatentEdit]
    def __init__(self, sae_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., edits: _Optional[_Iterable[_Union[_common_pb2.LatentEdit, _Mapping]]] = ...) -> None: ...

class LatentPreview(_message.Message):
    __slots__ = ("image_index", "latent", "codes_before", "codes_after")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    CODES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    CODES_AFTER_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    latent: int
    codes_before: _common_pb2.Tensor
    codes_after: _common_pb2.Tensor
    def __init__(self, image_index: _Optional[int] = ..., latent: _Optional[int] = ..., codes_before: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., codes_after: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PreviewInterventionResponse(_message.Message):
    __slots__ = ("previews", "layout")
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    previews: _containers.RepeatedCompositeFieldContainer[LatentPreview]
    layout: _common_pb2.TokenLayout
    def __init__(self, previews: _Optional[_Iterable[_Union[LatentPreview, _Mapping]]] = ..., layout: _Optional[_Union[_common_pb2.TokenLayout, _Mapping]] = ...) -> None: ...
