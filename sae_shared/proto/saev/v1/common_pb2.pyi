from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class TokenSelection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_SELECTION_UNSPECIFIED: _ClassVar[TokenSelection]
    TOKEN_SELECTION_ALL: _ClassVar[TokenSelection]
    TOKEN_SELECTION_CLS: _ClassVar[TokenSelection]
    TOKEN_SELECTION_PATCHES: _ClassVar[TokenSelection]
    TOKEN_SELECTION_REGISTERS: _ClassVar[TokenSelection]

class EditOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDIT_OP_UNSPECIFIED: _ClassVar[EditOp]
    EDIT_OP_SET: _ClassVar[EditOp]
    EDIT_OP_SCALE: _ClassVar[EditOp]
    EDIT_OP_ADD: _ClassVar[EditOp]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_INT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType
TOKEN_SELECTION_UNSPECIFIED: TokenSelection
TOKEN_SELECTION_ALL: TokenSelection
TOKEN_SELECTION_CLS: TokenSelection
TOKEN_SELECTION_PATCHES: TokenSelection
TOKEN_SELECTION_REGISTERS: TokenSelection
EDIT_OP_UNSPECIFIED: EditOp
EDIT_OP_SET: EditOp
EDIT_OP_SCALE: EditOp
EDIT_OP_ADD: EditOp

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SparseCodes(_message.Message):
    __slots__ = ("indptr", "indices", "values", "d_sae", "n_tokens", "token_shape")
    INDPTR_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SHAPE_FIELD_NUMBER: _ClassVar[int]
    indptr: Tensor
    indices: Tensor
    values: Tensor
    d_sae: int
    n_tokens: int
    token_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, indptr: _Optional[_Union[Tensor, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., d_sae: _Optional[int] = ..., n_tokens: _Optional[int] = ..., token_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "object_key", "pixels", "id")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KEY_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    object_key: str
    pixels: Tensor
    id: str
    def __init__(self, encoded: _Optional[bytes] = ..., object_key: _Optional[str] = ..., pixels: _Optional[_Union[Tensor, _Mapping]] = ..., id: _Optional[str] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class TokenLayout(_message.Message):
    __slots__ = ("n_cls", "n_registers", "grid_height", "grid_width", "patch_size", "selection")
    N_CLS_FIELD_NUMBER: _ClassVar[int]
    N_REGISTERS_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    n_cls: int
    n_registers: int
    grid_height: int
    grid_width: int
    patch_size: int
    selection: TokenSelection
    def __init__(self, n_cls: _Optional[int] = ..., n_registers: _Optional[int] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., patch_size: _Optional[int] = ..., selection: _Optional[_Union[TokenSelection, str]] = ...) -> None: ...

class PatchIndices(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class PatchBox(_message.Message):
    __slots__ = ("row_start", "col_start", "row_end", "col_end")
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    COL_START_FIELD_NUMBER: _ClassVar[int]
    ROW_END_FIELD_NUMBER: _ClassVar[int]
    COL_END_FIELD_NUMBER: _ClassVar[int]
    row_start: int
    col_start: int
    row_end: int
    col_end: int
    def __init__(self, row_start: _Optional[int] = ..., col_start: _Optional[int] = ..., row_end: _Optional[int] = ..., col_end: _Optional[int] = ...) -> None: ...

class PatchSelection(_message.Message):
    __slots__ = ("all", "indices", "mask", "box")
    ALL_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    all: bool
    indices: PatchIndices
    mask: Tensor
    box: PatchBox
    def __init__(self, all: _Optional[bool] = ..., indices: _Optional[_Union[PatchIndices, _Mapping]] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ..., box: _Optional[_Union[PatchBox, _Mapping]] = ...) -> None: ...

class LatentEdit(_message.Message):
    __slots__ = ("latent", "op", "value", "relative_to_max", "patches", "image_indices")
    LATENT_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_TO_MAX_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDICES_FIELD_NUMBER: _ClassVar[int]
    latent: int
    op: EditOp
    value: float
    relative_to_max: bool
    patches: PatchSelection
    image_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, latent: _Optional[int] = ..., op: _Optional[_Union[EditOp, str]] = ..., value: _Optional[float] = ..., relative_to_max: _Optional[bool] = ..., patches: _Optional[_Union[PatchSelection, _Mapping]] = ..., image_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class OffTargetDrift(_message.Message):
    __slots__ = ("mean_abs", "max_abs", "relative", "flips_per_token", "target_error", "n_tokens")
    MEAN_ABS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_FIELD_NUMBER: _ClassVar[int]
    FLIPS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TARGET_ERROR_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    mean_abs: float
    max_abs: float
    relative: float
    flips_per_token: float
    target_error: float
    n_tokens: int
    def __init__(self, mean_abs: _Optional[float] = ..., max_abs: _Optional[float] = ..., relative: _Optional[float] = ..., flips_per_token: _Optional[float] = ..., target_error: _Optional[float] = ..., n_tokens: _Optional[int] = ...) -> None: ...

class LatentScore(_message.Message):
    __slots__ = ("latent", "value")
    LATENT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    latent: int
    value: float
    def __init__(self, latent: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...

class ClassScores(_message.Message):
    __slots__ = ("classes", "scores")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, classes: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...
