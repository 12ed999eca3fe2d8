"""Tensor codec: torch tensors / numpy arrays <-> ``saev.v1.Tensor``, sparse codes <-> ``saev.v1.SparseCodes``.

Wire format (see ``protos/saev/v1/common.proto``): a ``Tensor`` is a dtype enum, a shape and the raw elements,
little-endian and row-major. bfloat16 travels as its raw 2-byte words (numpy has no bfloat16; torch reinterprets
them with ``Tensor.view``). Sparse codes travel in CSR form as three such tensors.

Decoding treats every message as untrusted: dtype whitelist, non-negative dims, ``prod(shape) * itemsize ==
len(data)``, size limits (bytes and elements; services pass the values from settings), bool bytes in {0, 1},
optionally no NaN/Inf, and for sparse codes the CSR invariants. Every failure, whatever the input, raises
:class:`CodecError` (a ``ValueError``) with a message that names the field, says what is wrong and how to fix it;
``CodecError.too_large`` tells a size-limit failure (gRPC RESOURCE_EXHAUSTED) from malformed input
(INVALID_ARGUMENT).

The generated protobuf module is imported lazily, so ``import sae_shared.codec`` (and :func:`dense_to_csr`,
:func:`csr_to_dense`) works where protobuf is not installed.

Main API::

    msg = tensor_to_proto(acts_ntd, field="activations")     # torch or numpy -> Tensor
    acts_ntd = proto_to_tensor(msg, field="activations", max_bytes=s.max_request_bytes,
                               max_elements=s.max_tensor_elements)   # -> torch.Tensor (CPU, writable)
    arr = proto_to_array(msg)                                # -> numpy (bfloat16 widened to float32)
    codes = dense_to_csr(codes_ntd)                          # torch dense [..., d_sae] -> SparseCodesArrays
    msg = sparse_to_proto(codes); codes = proto_to_sparse(msg)
    codes_ntd = csr_to_dense(codes)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:  # the generated stubs need protobuf; import them only inside the functions that use them
    from sae_shared.proto.saev.v1 import common_pb2

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ELEMENTS",
    "MAX_NDIM",
    "SUPPORTED_DTYPES",
    "CodecError",
    "SparseCodesArrays",
    "csr_to_dense",
    "dense_to_csr",
    "dtype_enum_from_torch",
    "parse_tensor_message",
    "proto_to_array",
    "proto_to_sparse",
    "proto_to_tensor",
    "sparse_to_proto",
    "tensor_to_proto",
    "torch_dtype_from_enum",
    "validate_csr",
]

DEFAULT_MAX_BYTES = 64 << 20
"""Default limit on the payload bytes of one tensor (or of all three tensors of a SparseCodes); matches the
default of ``Settings.max_request_bytes``."""
DEFAULT_MAX_ELEMENTS = 256 << 20
"""Default limit on the elements of one tensor; matches the default of ``Settings.max_tensor_elements``."""
MAX_NDIM = 32
"""Most dimensions a tensor may have."""


class CodecError(ValueError):
    """A tensor or sparse-codes message (or an array to encode) is invalid.

    Attributes:
        field: name of the offending request field (e.g. ``"images[2].pixels"``), or None.
        too_large: True when the input broke a size limit rather than being malformed.
    """

    def __init__(self, message: str, *, field: str | None = None, too_large: bool = False):
        super().__init__(message)
        self.field = field
        self.too_large = too_large


# --------------------------------------------------------------------------------------------------------- dtypes


@dataclass(frozen=True)
class _DType:
    name: str
    enum: int
    """Value of the saev.v1.DType enum (a wire contract; tests check it against the generated module)."""
    torch_dtype: torch.dtype
    wire: np.dtype
    """Little-endian numpy dtype of the raw bytes (bfloat16: its 16-bit words; bool: uint8)."""

    @property
    def itemsize(self) -> int:
        return self.wire.itemsize

    @property
    def is_float(self) -> bool:
        return self.torch_dtype.is_floating_point


_DTYPES = (
    _DType("float32", 1, torch.float32, np.dtype("<f4")),
    _DType("float16", 2, torch.float16, np.dtype("<f2")),
    _DType("bfloat16", 3, torch.bfloat16, np.dtype("<i2")),
    _DType("float64", 4, torch.float64, np.dtype("<f8")),
    _DType("int64", 5, torch.int64, np.dtype("<i8")),
    _DType("int32", 6, torch.int32, np.dtype("<i4")),
    _DType("int16", 7, torch.int16, np.dtype("<i2")),
    _DType("int8", 8, torch.int8, np.dtype("i1")),
    _DType("uint8", 9, torch.uint8, np.dtype("u1")),
    _DType("bool", 10, torch.bool, np.dtype("u1")),
)
_BY_ENUM = {d.enum: d for d in _DTYPES}
_BY_TORCH = {d.torch_dtype: d for d in _DTYPES}
_BY_NAME = {d.name: d for d in _DTYPES}
# numpy dtypes by (kind, itemsize), so any byte order is accepted; bfloat16 (ml_dtypes) is matched by name.
_BY_NUMPY = {(d.wire.kind, d.itemsize): d for d in _DTYPES if d.name not in ("bfloat16", "bool")}
_BY_NUMPY[("b", 1)] = _BY_NAME["bool"]

SUPPORTED_DTYPES: tuple[str, ...] = tuple(d.name for d in _DTYPES)
"""dtype names the wire format carries, in DType enum order."""
_DTYPE_LIST = ", ".join(SUPPORTED_DTYPES)

_BF16_EXPONENT = 0x7F80  # bfloat16 exponent bits; all ones means Inf or NaN


def torch_dtype_from_enum(value: int, *, field: str | None = None) -> torch.dtype:
    """The torch dtype of a ``saev.v1.DType`` enum value; CodecError for UNSPECIFIED or unknown values."""
    return _dtype_from_enum(value, field).torch_dtype


def dtype_enum_from_torch(dtype: torch.dtype, *, field: str | None = None) -> int:
    """The ``saev.v1.DType`` enum value of a torch dtype; CodecError for dtypes the wire does not carry."""
    spec = _BY_TORCH.get(dtype)
    if spec is None:
        raise CodecError(f"{_label(field)}: dtype {dtype} is not supported; use one of {_DTYPE_LIST}", field=field)
    return spec.enum


def _dtype_from_enum(value: Any, field: str | None) -> _DType:
    spec = _BY_ENUM.get(value) if isinstance(value, int) else None
    if spec is None:
        what = "is unset (DTYPE_UNSPECIFIED)" if value == 0 else f"{value!r} is unknown"
        raise CodecError(f"{_label(field)}: dtype {what}; set it to one of {_DTYPE_LIST}", field=field)
    return spec


# --------------------------------------------------------------------------------------------------------- helpers


def _label(field: str | None, kind: str = "Tensor") -> str:
    return f"{kind} '{field}'" if field else kind


def _shape_str(shape: Any) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _pb() -> Any:
    """The generated ``common_pb2`` module (imported on first use; needs protobuf)."""
    try:
        from sae_shared.proto.saev.v1 import common_pb2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"sae_shared.codec needs protobuf for message conversion ({e}); install protobuf, "
            "or regenerate the stubs with scripts/gen_protos.py"
        ) from e
    return common_pb2


_F = TypeVar("_F", bound=Callable[..., Any])


def _never_raise_other(kind: str) -> Callable[[_F], _F]:
    """Make a public function raise only CodecError: any other exception is wrapped, naming the field."""

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except CodecError:
                raise
            except ImportError:
                raise  # a broken installation is not a client error
            except Exception as e:
                field = kwargs.get("field")
                field = field if isinstance(field, str) else None
                too_large = isinstance(e, MemoryError)
                raise CodecError(
                    f"{_label(field, kind)}: invalid input ({type(e).__name__}: {e})", field=field, too_large=too_large
                ) from e

        return wrapper  # type: ignore[return-value]

    return decorate


def _check_limits(
    shape: tuple[int, ...], spec: _DType, field: str | None, max_bytes: int | None, max_elements: int | None
) -> int:
    """Validate a shape against the dimension rules and limits; returns the number of payload bytes it needs."""
    label = _label(field)
    if len(shape) > MAX_NDIM:
        raise CodecError(f"{label}: {len(shape)} dimensions, more than the limit of {MAX_NDIM}", field=field)
    if any(s < 0 for s in shape):
        raise CodecError(
            f"{label}: shape {_shape_str(shape)} has a negative dimension; every dimension must be >= 0", field=field
        )
    if max_elements is not None:
        big = [s for s in shape if s > max_elements]
        if big:
            raise CodecError(
                f"{label}: dimension {big[0]} in shape {_shape_str(shape)} exceeds the limit of {max_elements} "
                "elements",
                field=field,
                too_large=True,
            )
    n = math.prod(shape)
    if max_elements is not None and n > max_elements:
        raise CodecError(
            f"{label}: shape {_shape_str(shape)} has {n} elements, more than the limit of {max_elements}; "
            "send smaller batches",
            field=field,
            too_large=True,
        )
    nbytes = n * spec.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise CodecError(
            f"{label}: shape {_shape_str(shape)} with dtype {spec.name} is {nbytes} bytes, more than the limit of "
            f"{max_bytes}; send smaller batches or a smaller dtype",
            field=field,
            too_large=True,
        )
    return nbytes


def _check_finite(words: np.ndarray, spec: _DType, field: str | None) -> None:
    """Raise if a float array in wire form (bfloat16 as 16-bit words) holds NaN or Inf."""
    if spec.name == "bfloat16":
        bad = (words & _BF16_EXPONENT) == _BF16_EXPONENT
    else:
        bad = ~np.isfinite(words)
    if bad.any():
        flat = np.flatnonzero(bad)
        raise CodecError(
            f"{_label(field)}: contains {flat.size} NaN/Inf value(s) (first at flat index {int(flat[0])}); "
            "only finite values are accepted here",
            field=field,
        )


# --------------------------------------------------------------------------------------------------------- encode


def _to_wire(x: Any, field: str | None, max_bytes: int | None, max_elements: int | None) -> tuple[_DType, np.ndarray]:
    """A torch tensor or numpy array as (dtype spec, little-endian C-contiguous wire array)."""
    if isinstance(x, torch.Tensor):
        spec = _BY_TORCH.get(x.dtype)
        if spec is None:
            raise CodecError(
                f"{_label(field)}: torch dtype {x.dtype} is not supported; convert it to one of {_DTYPE_LIST}",
                field=field,
            )
        if x.layout != torch.strided or x.is_nested:
            raise CodecError(f"{_label(field)}: only dense tensors are encoded; call .to_dense() first", field=field)
        _check_limits(tuple(x.shape), spec, field, max_bytes, max_elements)
        t = x.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        if spec.name == "bfloat16":
            t = t.view(torch.int16)
        arr = t.numpy()
    elif isinstance(x, (np.ndarray, np.generic)):
        arr = np.asarray(x)
        if arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2:  # ml_dtypes.bfloat16
            spec = _BY_NAME["bfloat16"]
            arr = arr.astype(arr.dtype, order="C", copy=False).view(np.int16)
        else:
            spec = _BY_NUMPY.get((arr.dtype.kind, arr.dtype.itemsize))
        if spec is None:
            raise CodecError(
                f"{_label(field)}: numpy dtype {arr.dtype} is not supported; convert it to one of {_DTYPE_LIST}",
                field=field,
            )
        _check_limits(tuple(arr.shape), spec, field, max_bytes, max_elements)
    else:
        raise CodecError(
            f"{_label(field)}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}", field=field
        )
    # (not np.ascontiguousarray: it turns 0-d arrays into 1-d ones)
    return spec, arr.astype(spec.wire, order="C", copy=False)


@_never_raise_other("Tensor")
def tensor_to_proto(
    x: torch.Tensor | np.ndarray,
    *,
    field: str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_elements: int | None = DEFAULT_MAX_ELEMENTS,
    allow_nonfinite: bool = True,
) -> common_pb2.Tensor:
    """Encode a torch tensor (any device; detached and copied to the CPU) or a numpy array as a ``Tensor``.

    Args:
        x: dense tensor or array with a dtype in :data:`SUPPORTED_DTYPES` (numpy: any byte order; bfloat16 from
            torch or ml_dtypes).
        field: name used in error messages.
        max_bytes, max_elements: size limits (None: unlimited).
        allow_nonfinite: when False, NaN/Inf in a float tensor raise CodecError.
    """
    spec, wire = _to_wire(x, field, max_bytes, max_elements)
    if spec.is_float and not allow_nonfinite:
        _check_finite(wire, spec, field)
    return _pb().Tensor(dtype=spec.enum, shape=list(wire.shape), data=wire.tobytes())


# --------------------------------------------------------------------------------------------------------- decode


@_never_raise_other("Tensor")
def parse_tensor_message(data: bytes, *, field: str | None = None) -> common_pb2.Tensor:
    """Parse a serialized ``Tensor`` message; CodecError when the bytes are not one."""
    pb = _pb()
    msg = pb.Tensor()
    try:
        msg.ParseFromString(bytes(data))
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise CodecError(f"{_label(field)}: not a serialized saev.v1.Tensor message ({e})", field=field) from e
    return msg


def _from_wire(
    msg: Any, field: str | None, max_bytes: int | None, max_elements: int | None, allow_nonfinite: bool
) -> tuple[_DType, np.ndarray]:
    """Validate a Tensor message; returns its dtype spec and a writable native-endian wire array of its shape."""
    pb = _pb()
    if not isinstance(msg, pb.Tensor):
        raise CodecError(f"{_label(field)}: expected a saev.v1.Tensor message, got {type(msg).__name__}", field=field)
    spec = _dtype_from_enum(msg.dtype, field)
    shape = tuple(int(s) for s in msg.shape)
    nbytes = _check_limits(shape, spec, field, max_bytes, max_elements)
    data = msg.data
    if len(data) != nbytes:
        raise CodecError(
            f"{_label(field)}: shape {_shape_str(shape)} with dtype {spec.name} needs {nbytes} bytes, got {len(data)}; "
            "data must hold prod(shape) * itemsize bytes, little-endian, row-major",
            field=field,
            too_large=max_bytes is not None and len(data) > max_bytes,
        )
    wire = np.frombuffer(data, dtype=spec.wire).reshape(shape)
    if spec.name == "bool" and wire.size and int(wire.max()) > 1:
        raise CodecError(f"{_label(field)}: bool elements must be bytes 0 or 1", field=field)
    if spec.is_float and not allow_nonfinite:
        _check_finite(wire, spec, field)
    return spec, wire.astype(spec.wire.newbyteorder("="), copy=True)


@_never_raise_other("Tensor")
def proto_to_tensor(
    msg: common_pb2.Tensor,
    *,
    field: str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_elements: int | None = DEFAULT_MAX_ELEMENTS,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """Decode and validate a ``Tensor`` message into a writable CPU torch tensor of its dtype and shape.

    Args:
        msg: the message (untrusted).
        field: name used in error messages, e.g. ``"images[0].pixels"``.
        max_bytes, max_elements: size limits (None: unlimited); services pass ``Settings.max_request_bytes`` and
            ``Settings.max_tensor_elements``.
        allow_nonfinite: accept NaN/Inf in float tensors.

    Raises:
        CodecError: for any invalid message (``too_large`` set when a size limit is broken).
    """
    spec, wire = _from_wire(msg, field, max_bytes, max_elements, allow_nonfinite)
    t = torch.from_numpy(wire)
    if spec.name == "bfloat16":
        return t.view(torch.bfloat16)
    if spec.name == "bool":
        return t.to(torch.bool)
    return t


@_never_raise_other("Tensor")
def proto_to_array(
    msg: common_pb2.Tensor,
    *,
    field: str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_elements: int | None = DEFAULT_MAX_ELEMENTS,
    allow_nonfinite: bool = False,
) -> np.ndarray:
    """Like :func:`proto_to_tensor` but returns a writable numpy array.

    numpy has no bfloat16, so bfloat16 tensors are widened to float32 (exactly: every bfloat16 is a float32).
    """
    spec, wire = _from_wire(msg, field, max_bytes, max_elements, allow_nonfinite)
    if spec.name == "bfloat16":
        return (wire.astype(np.uint32) << 16).view(np.float32)
    if spec.name == "bool":
        return wire.astype(np.bool_)
    return wire


# --------------------------------------------------------------------------------------------------------- sparse


class SparseCodesArrays(NamedTuple):
    """SAE codes of a batch of tokens in compressed sparse row (CSR) form, as CPU torch tensors.

    Row ``t`` (token ``t``) has non-zero latents ``indices[indptr[t]:indptr[t+1]]`` with code values
    ``values[indptr[t]:indptr[t+1]]``. :func:`dense_to_csr` and :func:`proto_to_sparse` return canonical CSR:
    indices strictly increasing within each row.
    """

    indptr: torch.Tensor
    """int64 ``[n_tokens + 1]``: starts at 0, non-decreasing, ends at nnz."""
    indices: torch.Tensor
    """int64 ``[nnz]`` (int32 also accepted when encoding): latent index of each non-zero, in ``[0, d_sae)``."""
    values: torch.Tensor
    """float ``[nnz]`` (float32, float16, bfloat16 or float64): the code value of each non-zero."""
    d_sae: int
    """Number of latents, the width of the dense codes."""
    token_shape: tuple[int, ...] | None = None
    """Shape of the token batch the rows flatten (row-major), e.g. ``(n_images, n_tokens_per_image)``; its product
    is n_tokens. None means ``(n_tokens,)``."""

    @property
    def n_tokens(self) -> int:
        """Number of rows."""
        return int(self.indptr.shape[0]) - 1

    @property
    def nnz(self) -> int:
        """Number of stored non-zeros."""
        return int(self.indices.shape[0])


@_never_raise_other("SparseCodes")
def dense_to_csr(codes_nd: torch.Tensor) -> SparseCodesArrays:
    """Dense codes ``[..., d_sae]`` (at least 2-d) -> canonical CSR with one row per leading position.

    Exact zeros are dropped; every other value (NaN included) is stored. ``token_shape`` is the leading shape.
    """
    if not isinstance(codes_nd, torch.Tensor) or codes_nd.ndim < 2:
        raise CodecError("dense_to_csr: expected a torch.Tensor of shape [..., d_sae] with at least 2 dimensions")
    if not codes_nd.is_floating_point():
        raise CodecError(f"dense_to_csr: codes must be floating point, got {codes_nd.dtype}")
    *token_shape, d_sae = codes_nd.shape
    codes_td = codes_nd.detach().to("cpu").reshape(-1, d_sae)
    n_tokens = codes_td.shape[0]
    rows_k, cols_k = torch.nonzero(codes_td, as_tuple=True)  # row-major order: canonical CSR
    counts_t = torch.bincount(rows_k, minlength=n_tokens)
    indptr = torch.zeros(n_tokens + 1, dtype=torch.int64)
    torch.cumsum(counts_t, dim=0, out=indptr[1:])
    return SparseCodesArrays(
        indptr=indptr,
        indices=cols_k.to(torch.int64),
        values=codes_td[rows_k, cols_k].contiguous(),
        d_sae=int(d_sae),
        token_shape=tuple(int(s) for s in token_shape),
    )


@_never_raise_other("SparseCodes")
def csr_to_dense(codes: SparseCodesArrays) -> torch.Tensor:
    """CSR codes -> dense codes ``[*token_shape, d_sae]`` (``[n_tokens, d_sae]`` without a token shape).

    Expects valid CSR (as :func:`proto_to_sparse` and :func:`dense_to_csr` return; see :func:`validate_csr`).
    The caller is responsible for ``n_tokens * d_sae`` fitting in memory.
    """
    indptr = torch.as_tensor(codes.indptr, dtype=torch.int64)
    indices = torch.as_tensor(codes.indices).to(torch.int64)
    values = torch.as_tensor(codes.values)
    n_tokens = int(indptr.shape[0]) - 1
    rows_k = torch.repeat_interleave(torch.arange(n_tokens), torch.diff(indptr))
    codes_td = torch.zeros(n_tokens, int(codes.d_sae), dtype=values.dtype)
    codes_td[rows_k, indices] = values
    token_shape = codes.token_shape if codes.token_shape is not None else (n_tokens,)
    return codes_td.reshape(*token_shape, int(codes.d_sae))


def _as_torch(x: Any, name: str, field: str | None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iuf":
            raise CodecError(f"{_label(field, 'SparseCodes')}: {name} has unsupported dtype {x.dtype}", field=field)
        return torch.from_numpy(x.astype(x.dtype.newbyteorder("="), order="C", copy=False))
    raise CodecError(
        f"{_label(field, 'SparseCodes')}: {name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}",
        field=field,
    )


def _check_token_shape(token_shape: tuple[int, ...] | None, n_tokens: int, field: str | None) -> None:
    if token_shape is None:
        return
    label = _label(field, "SparseCodes")
    if len(token_shape) > MAX_NDIM or any(s < 0 for s in token_shape) or math.prod(token_shape) != n_tokens:
        raise CodecError(
            f"{label}: token_shape {_shape_str(token_shape)} must have non-negative dims whose product is n_tokens "
            f"= {n_tokens} (or be empty)",
            field=field,
        )


@_never_raise_other("SparseCodes")
def validate_csr(codes: SparseCodesArrays, *, field: str | None = None, allow_nonfinite: bool = False) -> None:
    """Check the CSR invariants of ``codes``; CodecError saying which one fails and how to fix it.

    indptr: 1-d integer, length n_tokens + 1, starts at 0, non-decreasing, ends at nnz; indices: 1-d integer, in
    ``[0, d_sae)``, strictly increasing within each row; values: 1-d float of length nnz, finite unless
    ``allow_nonfinite``; d_sae >= 1; token_shape (when set) multiplies to n_tokens.
    """
    label = _label(field, "SparseCodes")

    def fail(msg: str) -> CodecError:
        return CodecError(f"{label}: {msg}", field=field)

    indptr = _as_torch(codes.indptr, "indptr", field)
    indices = _as_torch(codes.indices, "indices", field)
    values = _as_torch(codes.values, "values", field)
    d_sae = codes.d_sae
    if isinstance(d_sae, bool) or not isinstance(d_sae, (int, np.integer)) or d_sae < 1:
        raise fail(f"d_sae must be a positive integer, got {d_sae!r}")
    for name, t in (("indptr", indptr), ("indices", indices)):
        if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise fail(f"{name} must be a 1-d integer tensor, got {t.dtype} of shape {_shape_str(t.shape)}")
    if values.ndim != 1 or not values.is_floating_point():
        raise fail(f"values must be a 1-d float tensor, got {values.dtype} of shape {_shape_str(values.shape)}")
    if indptr.numel() < 1:
        raise fail("indptr must have n_tokens + 1 >= 1 entries, got 0")
    nnz = indices.numel()
    if values.numel() != nnz:
        raise fail(f"indices and values must have the same length (nnz), got {nnz} and {values.numel()}")
    indptr = indptr.to(torch.int64)
    if int(indptr[0]) != 0:
        raise fail(f"indptr must start at 0, got {int(indptr[0])}")
    if int(indptr[-1]) != nnz:
        raise fail(f"indptr must end at nnz = {nnz} (the length of indices and values), got {int(indptr[-1])}")
    steps = torch.diff(indptr)
    if steps.numel() and bool((steps < 0).any()):
        row = int(torch.nonzero(steps < 0)[0])
        raise fail(f"indptr must be non-decreasing; it decreases after row {row}")
    _check_token_shape(codes.token_shape, indptr.numel() - 1, field)
    if nnz:
        indices = indices.to(torch.int64)
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= d_sae:
            bad = lo if lo < 0 else hi
            raise fail(f"latent index {bad} is out of range [0, d_sae = {d_sae})")
        # strictly increasing within rows: compare neighbours, except across the start of a row
        same_row = torch.ones(nnz - 1, dtype=torch.bool) if nnz > 1 else torch.zeros(0, dtype=torch.bool)
        starts = indptr[1:-1]
        starts = starts[(starts > 0) & (starts < nnz)]
        same_row[starts - 1] = False
        if bool((torch.diff(indices)[same_row] <= 0).any()):
            raise fail("indices must be strictly increasing within each row; sort them per row and merge duplicates")
        if not allow_nonfinite and not bool(torch.isfinite(values).all()):
            raise fail("values contain NaN/Inf; only finite code values are accepted here")


@_never_raise_other("SparseCodes")
def sparse_to_proto(
    codes: SparseCodesArrays,
    *,
    field: str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_elements: int | None = DEFAULT_MAX_ELEMENTS,
    allow_nonfinite: bool = True,
) -> common_pb2.SparseCodes:
    """Validate (see :func:`validate_csr`) and encode CSR codes as a ``SparseCodes`` message.

    indptr is sent as int64, indices as int32 when given as int32 (else int64), values in their own float dtype.
    ``max_bytes`` bounds the three payloads together.
    """
    if not isinstance(codes, SparseCodesArrays):
        raise CodecError(
            f"{_label(field, 'SparseCodes')}: expected SparseCodesArrays, got {type(codes).__name__}", field=field
        )
    validate_csr(codes, field=field, allow_nonfinite=allow_nonfinite)
    indptr = _as_torch(codes.indptr, "indptr", field).to(torch.int64)
    indices = _as_torch(codes.indices, "indices", field)
    if indices.dtype != torch.int32:
        indices = indices.to(torch.int64)
    values = _as_torch(codes.values, "values", field)
    parts = {}
    used = 0
    for name, t in (("indptr", indptr), ("indices", indices), ("values", values)):
        budget = None if max_bytes is None else max_bytes - used
        parts[name] = tensor_to_proto(t, field=_sub(field, name), max_bytes=budget, max_elements=max_elements)
        used += len(parts[name].data)
    n_tokens = indptr.numel() - 1
    token_shape = [] if codes.token_shape is None else [int(s) for s in codes.token_shape]
    return _pb().SparseCodes(
        indptr=parts["indptr"],
        indices=parts["indices"],
        values=parts["values"],
        d_sae=int(codes.d_sae),
        n_tokens=n_tokens,
        token_shape=token_shape,
    )


def _sub(field: str | None, name: str) -> str:
    return f"{field}.{name}" if field else name


@_never_raise_other("SparseCodes")
def proto_to_sparse(
    msg: common_pb2.SparseCodes,
    *,
    field: str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_elements: int | None = DEFAULT_MAX_ELEMENTS,
    allow_nonfinite: bool = False,
) -> SparseCodesArrays:
    """Decode and validate a ``SparseCodes`` message (untrusted) into canonical CSR arrays.

    Checks each tensor like :func:`proto_to_tensor` (``max_bytes`` bounds the three payloads together), that
    indptr/indices are int32 or int64 and values a float dtype, that ``n_tokens`` matches indptr and
    ``token_shape``, and the CSR invariants of :func:`validate_csr`. indptr and indices come back as int64.
    """
    pb = _pb()
    label = _label(field, "SparseCodes")
    if not isinstance(msg, pb.SparseCodes):
        raise CodecError(f"{label}: expected a saev.v1.SparseCodes message, got {type(msg).__name__}", field=field)
    for name in ("indptr", "indices", "values"):
        if not msg.HasField(name):
            raise CodecError(f"{label}: {name} is missing; CSR codes need indptr, indices and values", field=field)
    # cheap header checks first, so an oversized payload is refused before it is copied
    total = len(msg.indptr.data) + len(msg.indices.data) + len(msg.values.data)
    if max_bytes is not None and total > max_bytes:
        raise CodecError(
            f"{label}: {total} payload bytes, more than the limit of {max_bytes}; send smaller batches",
            field=field,
            too_large=True,
        )
    d_sae, n_tokens = int(msg.d_sae), int(msg.n_tokens)
    if d_sae < 1 or (max_elements is not None and d_sae > max_elements):
        raise CodecError(f"{label}: d_sae must be in [1, {max_elements}], got {d_sae}", field=field)
    if n_tokens < 0:
        raise CodecError(f"{label}: n_tokens must be >= 0, got {n_tokens}", field=field)
    token_shape = tuple(int(s) for s in msg.token_shape) or None
    _check_token_shape(token_shape, n_tokens, field)

    tensors = {}
    for name, allowed in (("indptr", ("int64", "int32")), ("indices", ("int64", "int32")), ("values", None)):
        sub = getattr(msg, name)
        spec = _dtype_from_enum(sub.dtype, _sub(field, name))
        if allowed is not None and spec.name not in allowed:
            raise CodecError(
                f"{label}: {name} must be int64 or int32, got {spec.name}", field=field
            )
        if allowed is None and not spec.is_float:
            raise CodecError(
                f"{label}: values must be float32, float16, bfloat16 or float64, got {spec.name}", field=field
            )
        if len(sub.shape) != 1:
            raise CodecError(f"{label}: {name} must be 1-d, got shape {_shape_str(sub.shape)}", field=field)
        tensors[name] = proto_to_tensor(
            sub, field=_sub(field, name), max_bytes=max_bytes, max_elements=max_elements, allow_nonfinite=True
        )
    indptr = tensors["indptr"].to(torch.int64)
    if indptr.numel() != n_tokens + 1:
        raise CodecError(
            f"{label}: indptr has {indptr.numel()} entries but n_tokens = {n_tokens} needs n_tokens + 1 = "
            f"{n_tokens + 1}",
            field=field,
        )
    codes = SparseCodesArrays(
        indptr=indptr,
        indices=tensors["indices"].to(torch.int64),
        values=tensors["values"],
        d_sae=d_sae,
        token_shape=token_shape,
    )
    validate_csr(codes, field=field, allow_nonfinite=allow_nonfinite)
    return codes
