from sae_shared.proto.saev.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenAggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_AGGREGATION_UNSPECIFIED: _ClassVar[TokenAggregation]
    TOKEN_AGGREGATION_MAX: _ClassVar[TokenAggregation]
    TOKEN_AGGREGATION_MEAN: _ClassVar[TokenAggregation]
    TOKEN_AGGREGATION_SUM: _ClassVar[TokenAggregation]
TOKEN_AGGREGATION_UNSPECIFIED: TokenAggregation
TOKEN_AGGREGATION_MAX: TokenAggregation
TOKEN_AGGREGATION_MEAN: TokenAggregation
TOKEN_AGGREGATION_SUM: TokenAggregation

class SAEInfo(_message.Message):
    __slots__ = ("sae_id", "backbone_id", "layer", "d_model", "d_sae", "architecture", "tokens", "analyzed", "has_statistics")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ANALYZED_FIELD_NUMBER: _ClassVar[int]
    HAS_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    backbone_id: str
    layer: int
    d_model: int
    d_sae: int
    architecture: str
    tokens: _common_pb2.TokenSelection
    analyzed: bool
    has_statistics: bool
    def __init__(self, sae_id: _Optional[str] = ..., backbone_id: _Optional[str] = ..., layer: _Optional[int] = ..., d_model: _Optional[int] = ..., d_sae: _Optional[int] = ..., architecture: _Optional[str] = ..., tokens: _Optional[_Union[_common_pb2.TokenSelection, str]] = ..., analyzed: _Optional[bool] = ..., has_statistics: _Optional[bool] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("sae_id", "activations", "dense")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    activations: _common_pb2.Tensor
    dense: bool
    def __init__(self, sae_id: _Optional[str] = ..., activations: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., dense: _Optional[bool] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("sparse", "dense")
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    sparse: _common_pb2.SparseCodes
    dense: _common_pb2.Tensor
    def __init__(self, sparse: _Optional[_Union[_common_pb2.SparseCodes, _Mapping]] = ..., dense: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("sae_id", "sparse", "dense")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    sparse: _common_pb2.SparseCodes
    dense: _common_pb2.Tensor
    def __init__(self, sae_id: _Optional[str] = ..., sparse: _Optional[_Union[_common_pb2.SparseCodes, _Mapping]] = ..., dense: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("reconstruction",)
    RECONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    reconstruction: _common_pb2.Tensor
    def __init__(self, reconstruction: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("sae_id", "activations", "layout", "edits", "return_codes", "return_drift")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    RETURN_CODES_FIELD_NUMBER: _ClassVar[int]
    RETURN_DRIFT_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    activations: _common_pb2.Tensor
    layout: _common_pb2.TokenLayout
    edits: _containers.RepeatedCompositeFieldContainer[_common_pb2.LatentEdit]
    return_codes: bool
    return_drift: bool
    def __init__(self, sae_id: _Optional[str] = ..., activations: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., layout: _Optional[_Union[_common_pb2.TokenLayout, _Mapping]] = ..., edits: _Optional[_Iterable[_Union[_common_pb2.LatentEdit, _Mapping]]] = ..., return_codes: _Optional[bool] = ..., return_drift: _Optional[bool] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("edited_activations", "codes_before", "codes_after", "drift")
    EDITED_ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    CODES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    CODES_AFTER_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    edited_activations: _common_pb2.Tensor
    codes_before: _common_pb2.SparseCodes
    codes_after: _common_pb2.SparseCodes
    drift: _containers.RepeatedCompositeFieldContainer[_common_pb2.OffTargetDrift]
    def __init__(self, edited_activations: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., codes_before: _Optional[_Union[_common_pb2.SparseCodes, _Mapping]] = ..., codes_after: _Optional[_Union[_common_pb2.SparseCodes, _Mapping]] = ..., drift: _Optional[_Iterable[_Union[_common_pb2.OffTargetDrift, _Mapping]]] = ...) -> None: ...

class TopFeaturesRequest(_message.Message):
    __slots__ = ("sae_id", "activations", "layout", "k", "aggregation", "patches")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    activations: _common_pb2.Tensor
    layout: _common_pb2.TokenLayout
    k: int
    aggregation: TokenAggregation
    patches: _common_pb2.PatchSelection
    def __init__(self, sae_id: _Optional[str] = ..., activations: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., layout: _Optional[_Union[_common_pb2.TokenLayout, _Mapping]] = ..., k: _Optional[int] = ..., aggregation: _Optional[_Union[TokenAggregation, str]] = ..., patches: _Optional[_Union[_common_pb2.PatchSelection, _Mapping]] = ...) -> None: ...

class ImageTopFeatures(_message.Message):
    __slots__ = ("latents",)
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    latents: _containers.RepeatedCompositeFieldContainer[_common_pb2.LatentScore]
    def __init__(self, latents: _Optional[_Iterable[_Union[_common_pb2.LatentScore, _Mapping]]] = ...) -> None: ...

class TopFeaturesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageTopFeatures]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageTopFeatures, _Mapping]]] = ...) -> None: ...

class ListSAEsRequest(_message.Message):
    __slots__ = ("backbone_id", "layer")
    BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    backbone_id: str
    layer: int
    def __init__(self, backbone_id: _Optional[str] = ..., layer: _Optional[int] = ...) -> None: ...

class ListSAEsResponse(_message.Message):
    __slots__ = ("saes",)
    SAES_FIELD_NUMBER: _ClassVar[int]
    saes: _containers.RepeatedCompositeFieldContainer[SAEInfo]
    def __init__(self, saes: _Optional[_Iterable[_Union[SAEInfo, _Mapping]]] = ...) -> None: ...
