from sae_shared.proto.saev.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEAD_KIND_UNSPECIFIED: _ClassVar[HeadKind]
    HEAD_KIND_CLASSIFIER: _ClassVar[HeadKind]
    HEAD_KIND_SEGMENTER: _ClassVar[HeadKind]
HEAD_KIND_UNSPECIFIED: HeadKind
HEAD_KIND_CLASSIFIER: HeadKind
HEAD_KIND_SEGMENTER: HeadKind

class HeadInfo(_message.Message):
    __slots__ = ("head_id", "kind", "backbone_id", "d_model", "n_classes", "class_names")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    N_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    kind: HeadKind
    backbone_id: str
    d_model: int
    n_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, head_id: _Optional[str] = ..., kind: _Optional[_Union[HeadKind, str]] = ..., backbone_id: _Optional[str] = ..., d_model: _Optional[int] = ..., n_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("head_id", "tokens", "layout", "top_k", "patch_logits")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PATCH_LOGITS_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    tokens: _common_pb2.Tensor
    layout: _common_pb2.TokenLayout
    top_k: int
    patch_logits: bool
    def __init__(self, head_id: _Optional[str] = ..., tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., layout: _Optional[_Union[_common_pb2.TokenLayout, _Mapping]] = ..., top_k: _Optional[int] = ..., patch_logits: _Optional[bool] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("kind", "logits", "labels", "top", "patch_logits")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    PATCH_LOGITS_FIELD_NUMBER: _ClassVar[int]
    kind: HeadKind
    logits: _common_pb2.Tensor
    labels: _common_pb2.Tensor
    top: _containers.RepeatedCompositeFieldContainer[_common_pb2.ClassScores]
    patch_logits: _common_pb2.Tensor
    def __init__(self, kind: _Optional[_Union[HeadKind, str]] = ..., logits: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., labels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., top: _Optional[_Iterable[_Union[_common_pb2.ClassScores, _Mapping]]] = ..., patch_logits: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ListHeadsRequest(_message.Message):
    __slots__ = ("backbone_id",)
    BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    backbone_id: str
    def __init__(self, backbone_id: _Optional[str] = ...) -> None: ...

class ListHeadsResponse(_message.Message):
    __slots__ = ("heads",)
    HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[HeadInfo]
    def __init__(self, heads: _Optional[_Iterable[_Union[HeadInfo, _Mapping]]] = ...) -> None: ...
