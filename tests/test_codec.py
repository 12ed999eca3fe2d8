"""Tensor codec: round trips for every dtype and shape, strict validation of untrusted messages, fuzzing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sae_shared import codec
from sae_shared.codec import (
    SUPPORTED_DTYPES,
    CodecError,
    SparseCodesArrays,
    csr_to_dense,
    dense_to_csr,
    dtype_enum_from_torch,
    parse_tensor_message,
    proto_to_array,
    proto_to_sparse,
    proto_to_tensor,
    sparse_to_proto,
    tensor_to_proto,
    torch_dtype_from_enum,
    validate_csr,
)
from sae_shared.proto.saev.v1 import common_pb2 as pb

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
NUMPY_DTYPES = [n for n in SUPPORTED_DTYPES if n != "bfloat16"]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def _bits_np(a: np.ndarray) -> np.ndarray:
    """Bit patterns of an array (so NaNs compare equal to themselves)."""
    a = a.astype(a.dtype.newbyteorder("="))
    return a.view(f"u{a.itemsize}") if a.dtype.kind == "f" else a


def _bits_torch(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


def _random_torch(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Any bit pattern of the dtype (NaN, Inf, subnormals included); bool is 0/1."""
    rng = np.random.default_rng(seed)
    if name == "bool":
        return torch.from_numpy(rng.integers(0, 2, size=shape).astype(bool))
    dtype = TORCH_DTYPES[name]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    words = rng.integers(0, 2 ** (8 * itemsize), size=shape, dtype=f"u{itemsize}").view(f"i{itemsize}")
    return torch.from_numpy(np.asarray(words)).view(dtype)


# ------------------------------------------------------------------------------------------------ round trips


@FAST
@given(name=st.sampled_from(list(TORCH_DTYPES)), shape=SHAPES, seed=st.integers(0, 2**32 - 1))
def test_torch_round_trip_is_bit_exact(name: str, shape: tuple[int, ...], seed: int) -> None:
    x = _random_torch(name, shape, seed)
    msg = tensor_to_proto(x, field="x")
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == x.numel() * x.element_size()
    wire = pb.Tensor.FromString(msg.SerializeToString())
    y = proto_to_tensor(wire, field="x", allow_nonfinite=True)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(_bits_torch(y), _bits_torch(x))
    assert _bits_torch(y).numpy().flags.writeable  # a copy the caller owns, not a view of the message


@FAST
@given(data=st.data(), name=st.sampled_from(NUMPY_DTYPES), shape=SHAPES, order=st.sampled_from("<>"))
def test_numpy_round_trip_is_bit_exact(data: st.DataObject, name: str, shape: tuple[int, ...], order: str) -> None:
    dtype = np.dtype(name) if name in ("bool", "int8", "uint8") else np.dtype(name).newbyteorder(order)
    x = data.draw(hnp.arrays(dtype, shape))
    y = proto_to_array(tensor_to_proto(x), allow_nonfinite=True)
    assert y.dtype == np.dtype(name) and y.shape == x.shape
    assert np.array_equal(_bits_np(y), _bits_np(x))
    t = proto_to_tensor(tensor_to_proto(x), allow_nonfinite=True)
    assert t.dtype == TORCH_DTYPES[name]
    assert np.array_equal(_bits_np(t.numpy()), _bits_np(x))


@FAST
@given(shape=SHAPES, seed=st.integers(0, 2**32 - 1))
def test_bfloat16_reads_as_exact_float32_in_numpy(shape: tuple[int, ...], seed: int) -> None:
    x = _random_torch("bfloat16", shape, seed)
    y = proto_to_array(tensor_to_proto(x), allow_nonfinite=True)
    assert y.dtype == np.float32
    assert np.array_equal(_bits_np(y), _bits_np(x.float().numpy()))


def test_scalars_non_contiguous_and_device_inputs() -> None:
    assert proto_to_tensor(tensor_to_proto(torch.tensor(3.5))).shape == ()
    assert proto_to_array(tensor_to_proto(np.float16(2.0))).shape == ()
    x_ab = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(proto_to_tensor(tensor_to_proto(x_ab.t())), x_ab.t())
    assert torch.equal(proto_to_tensor(tensor_to_proto(x_ab[:, ::2])), x_ab[:, ::2])
    w = torch.ones(2, requires_grad=True)
    assert torch.equal(proto_to_tensor(tensor_to_proto(w * 2)), torch.full((2,), 2.0))


def test_dtype_enum_matches_generated_module() -> None:
    enum_names = {v.name for v in pb.DType.DESCRIPTOR.values} - {"DTYPE_UNSPECIFIED"}
    assert enum_names == {f"DTYPE_{n.upper()}" for n in SUPPORTED_DTYPES}
    for name, dtype in TORCH_DTYPES.items():
        value = pb.DType.Value(f"DTYPE_{name.upper()}")
        assert dtype_enum_from_torch(dtype) == value
        assert torch_dtype_from_enum(value) == dtype
    with pytest.raises(CodecError):
        torch_dtype_from_enum(0)
    with pytest.raises(CodecError):
        dtype_enum_from_torch(torch.complex64)


# ------------------------------------------------------------------------------------------------ sparse codes


@st.composite
def dense_codes(draw: st.DrawFn) -> torch.Tensor:
    lead = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
    d_sae = draw(st.integers(1, 9))
    values = st.one_of(st.just(0.0), st.floats(-1e4, 1e4, allow_nan=False, width=32))
    arr = draw(hnp.arrays(np.float32, (*lead, d_sae), elements=values))
    return torch.from_numpy(arr)


@FAST
@given(codes_nd=dense_codes(), values_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_sparse_codes_round_trip(codes_nd: torch.Tensor, values_dtype: torch.dtype) -> None:
    codes_nd = codes_nd.to(values_dtype)
    csr = dense_to_csr(codes_nd)
    assert csr.token_shape == tuple(codes_nd.shape[:-1]) and csr.d_sae == codes_nd.shape[-1]
    assert csr.nnz == int((codes_nd != 0).sum())
    validate_csr(csr)
    assert torch.equal(csr_to_dense(csr), codes_nd)
    msg = pb.SparseCodes.FromString(sparse_to_proto(csr, field="codes").SerializeToString())
    assert msg.n_tokens == csr.n_tokens
    back = proto_to_sparse(msg, field="codes")
    assert back.token_shape == csr.token_shape
    assert back.indptr.dtype == back.indices.dtype == torch.int64
    assert torch.equal(back.indptr, csr.indptr) and torch.equal(back.indices, csr.indices)
    assert torch.equal(csr_to_dense(back), codes_nd)


def test_sparse_codes_int32_indices_numpy_inputs_and_no_token_shape() -> None:
    csr = SparseCodesArrays(
        indptr=np.array([0, 2, 2, 3]),
        indices=np.array([1, 4, 0], dtype=np.int32),
        values=np.array([0.5, -1.0, 2.0], dtype=np.float32),
        d_sae=5,
    )
    msg = sparse_to_proto(csr)
    assert msg.indices.dtype == pb.DTYPE_INT32 and msg.indptr.dtype == pb.DTYPE_INT64
    assert list(msg.token_shape) == []
    back = proto_to_sparse(msg)
    assert back.token_shape is None and back.n_tokens == 3
    expected = torch.tensor([[0, 0.5, 0, 0, -1.0], [0, 0, 0, 0, 0], [2.0, 0, 0, 0, 0]])
    assert torch.equal(csr_to_dense(back), expected)


# ------------------------------------------------------------------------------------------------ malformed input


def _f32(shape: list[int], nbytes: int | None = None) -> pb.Tensor:
    n = int(np.prod(shape)) if shape else 1
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, data=b"\0" * (4 * n if nbytes is None else nbytes))


def _raises(fn, *args, match: str | None = None, too_large: bool = False, **kwargs) -> CodecError:
    with pytest.raises(CodecError, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.too_large is too_large
    return info.value


def test_wrong_byte_length_names_field_and_sizes() -> None:
    err = _raises(proto_to_tensor, _f32([2, 3], nbytes=20), field="images")
    assert "Tensor 'images': shape [2, 3] with dtype float32 needs 24 bytes, got 20" in str(err)
    assert err.field == "images"
    _raises(proto_to_tensor, _f32([], nbytes=0), match="needs 4 bytes, got 0")


@pytest.mark.parametrize("dtype", [0, 11, 99, -3])
def test_unknown_dtype(dtype: int) -> None:
    _raises(proto_to_tensor, pb.Tensor(dtype=dtype, shape=[1], data=b"\0" * 4), match="dtype")


def test_negative_and_too_many_dims() -> None:
    _raises(proto_to_tensor, pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[2, -1], data=b""), match="negative dimension")
    _raises(proto_to_tensor, pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1] * 40, data=b"\0"), match="dimensions")


def test_size_limits() -> None:
    _raises(proto_to_tensor, _f32([3]), max_bytes=10, match="more than the limit of 10", too_large=True)
    _raises(proto_to_tensor, _f32([6]), max_elements=5, match="elements", too_large=True)
    huge = pb.Tensor(dtype=pb.DTYPE_INT8, shape=[0, 2**62, 2**62], data=b"")
    _raises(proto_to_tensor, huge, too_large=True)
    assert proto_to_tensor(_f32([3]), max_bytes=12, max_elements=3).shape == (3,)
    _raises(tensor_to_proto, torch.zeros(10), max_elements=9, too_large=True)
    _raises(tensor_to_proto, np.zeros(10, np.float64), max_bytes=79, too_large=True)


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_rejected_unless_allowed(name: str, bad: float) -> None:
    x = torch.tensor([1.0, bad, 2.0]).to(TORCH_DTYPES[name])
    msg = tensor_to_proto(x)  # encoding allows non-finite by default
    _raises(proto_to_tensor, msg, field="acts", match="NaN/Inf.*flat index 1")
    _raises(tensor_to_proto, x, allow_nonfinite=False, match="NaN/Inf")
    assert torch.equal(_bits_torch(proto_to_tensor(msg, allow_nonfinite=True)), _bits_torch(x))


def test_bool_bytes_must_be_0_or_1() -> None:
    _raises(proto_to_tensor, pb.Tensor(dtype=pb.DTYPE_BOOL, shape=[2], data=b"\x01\x02"), match="0 or 1")


@pytest.mark.parametrize(
    "value", [None, b"\x08\x01", "tensor", 3, pb.SparseCodes(), torch.zeros(2), np.zeros(2, np.float32)]
)
def test_not_a_tensor_message(value: object) -> None:
    _raises(proto_to_tensor, value, match="saev.v1.Tensor")
    _raises(proto_to_array, value, match="saev.v1.Tensor")


@pytest.mark.parametrize(
    "value",
    [
        torch.zeros(2, dtype=torch.complex64),
        torch.zeros(2, dtype=torch.uint16),
        torch.zeros(2).to_sparse(),
        np.zeros(2, np.uint16),
        np.zeros(2, np.complex64),
        np.array(["a"]),
        np.array([object()]),
        [1.0, 2.0],
        None,
    ],
)
def test_encoding_unsupported_inputs(value: object) -> None:
    _raises(tensor_to_proto, value)


def _csr_msg(indptr, indices, values, d_sae, n_tokens=None, token_shape=()) -> pb.SparseCodes:
    return pb.SparseCodes(
        indptr=tensor_to_proto(np.asarray(indptr, np.int64)),
        indices=tensor_to_proto(np.asarray(indices, np.int64)),
        values=tensor_to_proto(np.asarray(values, np.float32)),
        d_sae=d_sae,
        n_tokens=len(indptr) - 1 if n_tokens is None else n_tokens,
        token_shape=list(token_shape),
    )


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (_csr_msg([0, 2, 1, 3], [0, 1, 2], [1, 1, 1], 4), "non-decreasing"),
        (_csr_msg([1, 2, 3], [0, 1, 2], [1, 1, 1], 4), "start at 0"),
        (_csr_msg([0, 1, 2], [0, 1, 2], [1, 1, 1], 4), "end at nnz"),
        (_csr_msg([0, 1, 3], [0, 4, 2], [1, 1, 1], 4), "out of range"),
        (_csr_msg([0, 1, 3], [0, -1, 2], [1, 1, 1], 4), "out of range"),
        (_csr_msg([0, 3], [2, 1, 3], [1, 1, 1], 4), "strictly increasing"),
        (_csr_msg([0, 3], [1, 1, 3], [1, 1, 1], 4), "strictly increasing"),
        (_csr_msg([0, 1, 3], [0, 1, 2], [1, 1], 4), "same length"),
        (_csr_msg([0, 1, 3], [0, 1, 2], [1, 1, 1], 4, n_tokens=3), "n_tokens"),
        (_csr_msg([0, 1, 3], [0, 1, 2], [1, 1, 1], 4, n_tokens=-1), "n_tokens"),
        (_csr_msg([0, 1, 3], [0, 1, 2], [1, 1, 1], 4, token_shape=(3, 1)), "token_shape"),
        (_csr_msg([0, 1, 3], [0, 1, 2], [1, 1, 1], 0), "d_sae"),
        (_csr_msg([0, 1, 3], [0, 1, 2], [1, float("nan"), 1], 4), "NaN/Inf"),
        (_csr_msg([], [], [], 4, n_tokens=0), "indptr"),
    ],
)
def test_bad_csr(msg: pb.SparseCodes, match: str) -> None:
    _raises(proto_to_sparse, msg, field="codes", match=match)


def test_bad_csr_structure() -> None:
    good = _csr_msg([0, 1, 3], [0, 1, 2], [1, 1, 1], 4)
    assert proto_to_sparse(good).nnz == 3
    for name in ("indptr", "indices", "values"):
        m = pb.SparseCodes()
        m.CopyFrom(good)
        m.ClearField(name)
        _raises(proto_to_sparse, m, match=f"{name} is missing")
    m = pb.SparseCodes()
    m.CopyFrom(good)
    m.indptr.CopyFrom(tensor_to_proto(np.array([0, 1, 3], np.float32)))
    _raises(proto_to_sparse, m, match="int64 or int32")
    m.CopyFrom(good)
    m.values.CopyFrom(tensor_to_proto(np.array([1, 1, 1], np.int32)))
    _raises(proto_to_sparse, m, match="values must be float")
    m.CopyFrom(good)
    m.indices.CopyFrom(tensor_to_proto(np.array([[0, 1, 2]], np.int64)))
    _raises(proto_to_sparse, m, match="1-d")
    _raises(proto_to_sparse, good, max_bytes=40, too_large=True)
    _raises(proto_to_sparse, _f32([1]), match="SparseCodes")
    with pytest.raises(CodecError):  # validation also guards the encoder
        sparse_to_proto(SparseCodesArrays(torch.tensor([0, 2]), torch.tensor([3, 1]), torch.ones(2), 4))


# ------------------------------------------------------------------------------------------------ fuzzing

_INT64 = st.integers(-(2**63), 2**63 - 1)


def _mostly(draw: st.DrawFn, usual: st.SearchStrategy, odd: st.SearchStrategy, odd_chance: int = 4):
    """Draw from ``usual``, and from ``odd`` about once in ``odd_chance`` draws.

    The odd branch is picked by a value from the middle of a range, because hypothesis favours the endpoints.
    """
    pick = draw(st.integers(0, 99))
    return draw(odd if 40 <= pick < 40 + 100 // odd_chance else usual)


@st.composite
def tensor_messages(draw: st.DrawFn) -> pb.Tensor:
    """Arbitrary field values, biased towards nearly valid messages so the deeper checks are reached."""
    dtype = _mostly(draw, st.integers(1, 10), st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1)))
    dim = st.integers(0, 4)
    shape = draw(st.lists(st.builds(lambda: None), max_size=5))
    shape = [_mostly(draw, dim, st.one_of(st.integers(-2, -1), _INT64), odd_chance=8) for _ in shape]
    n = 1
    for s in shape:
        n *= s
    itemsize = {1: 4, 2: 2, 3: 2, 4: 8, 5: 8, 6: 4, 7: 2, 8: 1, 9: 1, 10: 1}.get(dtype, 1)
    exact = 0 <= n * itemsize <= 512
    size = _mostly(draw, st.just(n * itemsize), st.integers(0, 64)) if exact else draw(st.integers(0, 64))
    data = draw(st.binary(min_size=size, max_size=size))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def _decode_all_ways(msg: object) -> None:
    for fn in (proto_to_tensor, proto_to_array):
        for allow in (False, True):
            try:
                fn(msg, field="fuzz", max_bytes=4096, max_elements=1024, allow_nonfinite=allow)
            except CodecError:
                pass


@FUZZ
@given(msg=tensor_messages())
def test_fuzz_tensor_fields_only_raise_codec_error(msg: pb.Tensor) -> None:
    _decode_all_ways(msg)


@FUZZ
@given(data=st.binary(max_size=128))
def test_fuzz_random_bytes_only_raise_codec_error(data: bytes) -> None:
    try:
        msg = parse_tensor_message(data, field="fuzz")
    except CodecError:
        return
    _decode_all_ways(msg)


@st.composite
def sparse_messages(draw: st.DrawFn) -> pb.SparseCodes:
    """Nearly consistent CSR messages (sorted row counts, indices near [0, d_sae)) with occasional damage."""
    d_sae = _mostly(draw, st.integers(1, 9), st.one_of(st.integers(-2, 0), _INT64), odd_chance=8)
    counts = draw(st.lists(st.integers(0, 3), max_size=5))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    damaged = st.lists(st.integers(-3, 8), max_size=6).map(lambda v: np.asarray(v, np.int64))
    indptr = _mostly(draw, st.just(indptr), damaged)
    nnz = int(indptr[-1]) if indptr.size and indptr[-1] >= 0 else 0
    nnz = _mostly(draw, st.just(nnz), st.integers(0, 8))
    indices = np.asarray(draw(st.lists(st.integers(-2, 10), min_size=nnz, max_size=nnz)), np.int64)
    if draw(st.booleans()):  # sort within rows, as a valid encoder would
        for a, b in zip(indptr[:-1], indptr[1:]):
            if 0 <= a <= b <= nnz:
                indices[a:b] = np.sort(indices[a:b])
    values = np.asarray(draw(st.lists(st.floats(width=32), min_size=nnz, max_size=nnz)), np.float32)
    idx_dtype = _mostly(draw, st.sampled_from([np.int64, np.int32]), st.sampled_from([np.int8, np.float32]))
    with np.errstate(all="ignore"):  # float32 -> float16 may overflow to inf: fine, it is fuzz
        val_dtype = _mostly(draw, st.sampled_from([np.float32, np.float16]), st.just(np.int64))
        values = values.astype(val_dtype) if val_dtype != np.int64 else np.arange(nnz)
    n_tokens = _mostly(draw, st.just(max(indptr.size - 1, 0)), st.one_of(st.integers(-2, 6), _INT64))
    token_shape = _mostly(draw, st.just([]), st.lists(st.integers(-2, 6), max_size=3))
    msg = pb.SparseCodes(
        indptr=tensor_to_proto(indptr.astype(idx_dtype)),
        indices=tensor_to_proto(indices.astype(idx_dtype)),
        values=tensor_to_proto(values),
        d_sae=d_sae,
        n_tokens=n_tokens,
        token_shape=token_shape,
    )
    missing = _mostly(draw, st.none(), st.sampled_from(["indptr", "indices", "values"]), odd_chance=10)
    if missing:
        msg.ClearField(missing)
    return msg


@FUZZ
@given(msg=sparse_messages())
def test_fuzz_sparse_codes_only_raise_codec_error(msg: pb.SparseCodes) -> None:
    for allow in (False, True):
        try:
            codes = proto_to_sparse(msg, field="fuzz", max_bytes=4096, max_elements=1024, allow_nonfinite=allow)
        except CodecError:
            continue
        dense = csr_to_dense(codes)  # whatever validates must densify, and round trip
        assert dense.shape == (*(codes.token_shape or (codes.n_tokens,)), codes.d_sae)
        again = dense_to_csr(dense.reshape(-1, codes.d_sae))
        assert torch.equal(again.indices, codes.indices[codes.values != 0])


# ------------------------------------------------------------------------------------------------ packaging


def test_codec_imports_and_densifies_without_protobuf() -> None:
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "grpc" or name.startswith(("grpc.", "google.protobuf")):
                    raise ModuleNotFoundError(f"blocked {name}")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import sae_shared.codec as c
        import sae_shared.proto

        codes_ntd = torch.eye(3)[None]
        assert torch.equal(c.csr_to_dense(c.dense_to_csr(codes_ntd)), codes_ntd)
        assert not any(m == "grpc" or m.startswith("google.protobuf") for m in sys.modules), "protobuf imported"
        try:
            c.tensor_to_proto(codes_ntd)
        except ImportError as e:
            assert "protobuf" in str(e)
        else:
            raise AssertionError("tensor_to_proto worked without protobuf")
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_api_is_exported() -> None:
    for name in codec.__all__:
        assert hasattr(codec, name), name
    assert issubclass(CodecError, ValueError)
