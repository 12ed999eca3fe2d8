from sae_shared.proto.saev.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LatentOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LATENT_ORDER_UNSPECIFIED: _ClassVar[LatentOrder]
    LATENT_ORDER_INDEX: _ClassVar[LatentOrder]
    LATENT_ORDER_FREQUENCY: _ClassVar[LatentOrder]
    LATENT_ORDER_MAX_ACTIVATION: _ClassVar[LatentOrder]
LATENT_ORDER_UNSPECIFIED: LatentOrder
LATENT_ORDER_INDEX: LatentOrder
LATENT_ORDER_FREQUENCY: LatentOrder
LATENT_ORDER_MAX_ACTIVATION: LatentOrder

class LatentStats(_message.Message):
    __slots__ = ("latent", "frequency", "image_frequency", "max_activation", "mean_activation", "dead", "dense", "label")
    LATENT_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    latent: int
    frequency: float
    image_frequency: float
    max_activation: float
    mean_activation: float
    dead: bool
    dense: bool
    label: str
    def __init__(self, latent: _Optional[int] = ..., frequency: _Optional[float] = ..., image_frequency: _Optional[float] = ..., max_activation: _Optional[float] = ..., mean_activation: _Optional[float] = ..., dead: _Optional[bool] = ..., dense: _Optional[bool] = ..., label: _Optional[str] = ...) -> None: ...

class GetLatentRequest(_message.Message):
    __slots__ = ("sae_id", "latent")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    latent: int
    def __init__(self, sae_id: _Optional[str] = ..., latent: _Optional[int] = ...) -> None: ...

class GetLatentResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: LatentStats
    def __init__(self, stats: _Optional[_Union[LatentStats, _Mapping]] = ...) -> None: ...

class ListLatentsRequest(_message.Message):
    __slots__ = ("sae_id", "order_by", "descending", "min_frequency", "max_frequency", "include_dead", "page_size", "page_token")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    DESCENDING_FIELD_NUMBER: _ClassVar[int]
    MIN_FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DEAD_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    order_by: LatentOrder
    descending: bool
    min_frequency: float
    max_frequency: float
    include_dead: bool
    page_size: int
    page_token: str
    def __init__(self, sae_id: _Optional[str] = ..., order_by: _Optional[_Union[LatentOrder, str]] = ..., descending: _Optional[bool] = ..., min_frequency: _Optional[float] = ..., max_frequency: _Optional[float] = ..., include_dead: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListLatentsResponse(_message.Message):
    __slots__ = ("latents", "next_page_token", "total")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    latents: _containers.RepeatedCompositeFieldContainer[LatentStats]
    next_page_token: str
    total: int
    def __init__(self, latents: _Optional[_Iterable[_Union[LatentStats, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class Exemplar(_message.Message):
    __slots__ = ("image_id", "max_activation", "image", "heatmap", "augmentation_json", "rank", "image_index", "label")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    AUGMENTATION_JSON_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    max_activation: float
    image: _common_pb2.Image
    heatmap: _common_pb2.Tensor
    augmentation_json: str
    rank: int
    image_index: int
    label: int
    def __init__(self, image_id: _Optional[str] = ..., max_activation: _Optional[float] = ..., image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., heatmap: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., augmentation_json: _Optional[str] = ..., rank: _Optional[int] = ..., image_index: _Optional[int] = ..., label: _Optional[int] = ...) -> None: ...

class GetLatentExemplarsRequest(_message.Message):
    __slots__ = ("sae_id", "latent", "limit", "include_images", "include_heatmaps", "kind")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    latent: int
    limit: int
    include_images: bool
    include_heatmaps: bool
    kind: str
    def __init__(self, sae_id: _Optional[str] = ..., latent: _Optional[int] = ..., limit: _Optional[int] = ..., include_images: _Optional[bool] = ..., include_heatmaps: _Optional[bool] = ..., kind: _Optional[str] = ...) -> None: ...

class GetLatentExemplarsResponse(_message.Message):
    __slots__ = ("latent", "exemplars", "layout", "kind", "scale", "analysis_id", "tiles_unavailable")
    LATENT_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_ID_FIELD_NUMBER: _ClassVar[int]
    TILES_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    latent: int
    exemplars: _containers.RepeatedCompositeFieldContainer[Exemplar]
    layout: _common_pb2.TokenLayout
    kind: str
    scale: float
    analysis_id: str
    tiles_unavailable: str
    def __init__(self, latent: _Optional[int] = ..., exemplars: _Optional[_Iterable[_Union[Exemplar, _Mapping]]] = ..., layout: _Optional[_Union[_common_pb2.TokenLayout, _Mapping]] = ..., kind: _Optional[str] = ..., scale: _Optional[float] = ..., analysis_id: _Optional[str] = ..., tiles_unavailable: _Optional[str] = ...) -> None: ...

class GetLatentHistogramRequest(_message.Message):
    __slots__ = ("sae_id", "latent", "bins")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    latent: int
    bins: int
    def __init__(self, sae_id: _Optional[str] = ..., latent: _Optional[int] = ..., bins: _Optional[int] = ...) -> None: ...

class GetLatentHistogramResponse(_message.Message):
    __slots__ = ("latent", "source", "edges", "counts", "zeros", "n_values", "frequency", "view_frequency", "max_activation")
    LATENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    ZEROS_FIELD_NUMBER: _ClassVar[int]
    N_VALUES_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    VIEW_FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    latent: int
    source: str
    edges: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    zeros: int
    n_values: int
    frequency: float
    view_frequency: float
    max_activation: float
    def __init__(self, latent: _Optional[int] = ..., source: _Optional[str] = ..., edges: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., zeros: _Optional[int] = ..., n_values: _Optional[int] = ..., frequency: _Optional[float] = ..., view_frequency: _Optional[float] = ..., max_activation: _Optional[float] = ...) -> None: ...

class ListAnalysedImagesRequest(_message.Message):
    __slots__ = ("sae_id", "offset", "limit")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    offset: int
    limit: int
    def __init__(self, sae_id: _Optional[str] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class AnalysedImage(_message.Message):
    __slots__ = ("image_index", "image_id", "label")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    image_id: str
    label: int
    def __init__(self, image_index: _Optional[int] = ..., image_id: _Optional[str] = ..., label: _Optional[int] = ...) -> None: ...

class ListAnalysedImagesResponse(_message.Message):
    __slots__ = ("images", "total")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[AnalysedImage]
    total: int
    def __init__(self, images: _Optional[_Iterable[_Union[AnalysedImage, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class GetAnalysedImageLatentsRequest(_message.Message):
    __slots__ = ("sae_id", "image_index", "k")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    image_index: int
    k: int
    def __init__(self, sae_id: _Optional[str] = ..., image_index: _Optional[int] = ..., k: _Optional[int] = ...) -> None: ...

class GetAnalysedImageLatentsResponse(_message.Message):
    __slots__ = ("image", "latents")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    image: AnalysedImage
    latents: _containers.RepeatedCompositeFieldContainer[ImageLatent]
    def __init__(self, image: _Optional[_Union[AnalysedImage, _Mapping]] = ..., latents: _Optional[_Iterable[_Union[ImageLatent, _Mapping]]] = ...) -> None: ...

class ImageLatent(_message.Message):
    __slots__ = ("latent", "value", "heatmap", "stats")
    LATENT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    latent: int
    value: float
    heatmap: _common_pb2.Tensor
    stats: LatentStats
    def __init__(self, latent: _Optional[int] = ..., value: _Optional[float] = ..., heatmap: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., stats: _Optional[_Union[LatentStats, _Mapping]] = ...) -> None: ...

class GetImageLatentsRequest(_message.Message):
    __slots__ = ("sae_id", "image", "k", "patches", "include_heatmaps")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    image: _common_pb2.Image
    k: int
    patches: _common_pb2.PatchSelection
    include_heatmaps: bool
    def __init__(self, sae_id: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., k: _Optional[int] = ..., patches: _Optional[_Union[_common_pb2.PatchSelection, _Mapping]] = ..., include_heatmaps: _Optional[bool] = ...) -> None: ...

class GetImageLatentsResponse(_message.Message):
    __slots__ = ("latents", "layout")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    latents: _containers.RepeatedCompositeFieldContainer[ImageLatent]
    layout: _common_pb2.TokenLayout
    def __init__(self, latents: _Optional[_Iterable[_Union[ImageLatent, _Mapping]]] = ..., layout: _Optional[_Union[_common_pb2.TokenLayout, _Mapping]] = ...) -> None: ...
