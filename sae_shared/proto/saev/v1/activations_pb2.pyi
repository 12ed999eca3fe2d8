from sae_shared.proto.saev.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BackboneInfo(_message.Message):
    __slots__ = ("backbone_id", "family", "checkpoint", "n_layers", "d_model", "image_size", "layout")
    BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    backbone_id: str
    family: str
    checkpoint: str
    n_layers: int
    d_model: int
    image_size: int
    layout: _common_pb2.TokenLayout
    def __init__(self, backbone_id: _Optional[str] = ..., family: _Optional[str] = ..., checkpoint: _Optional[str] = ..., n_layers: _Optional[int] = ..., d_model: _Optional[int] = ..., image_size: _Optional[int] = ..., layout: _Optional[_Union[_common_pb2.TokenLayout, _Mapping]] = ...) -> None: ...

class GetActivationsRequest(_message.Message):
    __slots__ = ("backbone_id", "images", "layers", "tokens", "dtype")
    BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    backbone_id: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    layers: _containers.RepeatedScalarFieldContainer[int]
    tokens: _common_pb2.TokenSelection
    dtype: _common_pb2.DType
    def __init__(self, backbone_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., layers: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Union[_common_pb2.TokenSelection, str]] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ...) -> None: ...

class LayerActivations(_message.Message):
    __slots__ = ("layer", "activations")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    activations: _common_pb2.Tensor
    def __init__(self, layer: _Optional[int] = ..., activations: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GetActivationsResponse(_message.Message):
    __slots__ = ("backbone_id", "layers", "layout")
    BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    backbone_id: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerActivations]
    layout: _common_pb2.TokenLayout
    def __init__(self, backbone_id: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerActivations, _Mapping]]] = ..., layout: _Optional[_Union[_common_pb2.TokenLayout, _Mapping]] = ...) -> None: ...

class ForwardFromRequest(_message.Message):
    __slots__ = ("backbone_id", "layer", "residual", "tokens")
    BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    backbone_id: str
    layer: int
    residual: _common_pb2.Tensor
    tokens: _common_pb2.TokenSelection
    def __init__(self, backbone_id: _Optional[str] = ..., layer: _Optional[int] = ..., residual: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., tokens: _Optional[_Union[_common_pb2.TokenSelection, str]] = ...) -> None: ...

class ForwardFromResponse(_message.Message):
    __slots__ = ("tokens", "layout")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    tokens: _common_pb2.Tensor
    layout: _common_pb2.TokenLayout
    def __init__(self, tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., layout: _Optional[_Union[_common_pb2.TokenLayout, _Mapping]] = ...) -> None: ...

class ListBackbonesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBackbonesResponse(_message.Message):
    __slots__ = ("backbones", "default_backbone_id")
    BACKBONES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    backbones: _containers.RepeatedCompositeFieldContainer[BackboneInfo]
    default_backbone_id: str
    def __init__(self, backbones: _Optional[_Iterable[_Union[BackboneInfo, _Mapping]]] = ..., default_backbone_id: _Optional[str] = ...) -> None: ...
