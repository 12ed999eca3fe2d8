"""Conversions between ``saev.v1`` messages and the library's plain values that several services share.

Token selections, token layouts and patch selections. numpy only (no torch), so the gateway can use them too.
"""

from __future__ import annotations

import numpy as np

from sae_shared.proto.saev.v1 import common_pb2 as pb
from services.common.errors import InvalidArgument

SELECTION_NAMES = {
    pb.TOKEN_SELECTION_UNSPECIFIED: "all",
    pb.TOKEN_SELECTION_ALL: "all",
    pb.TOKEN_SELECTION_CLS: "cls",
    pb.TOKEN_SELECTION_PATCHES: "patches",
    pb.TOKEN_SELECTION_REGISTERS: "registers",
}
SELECTION_ENUMS = {"all": pb.TOKEN_SELECTION_ALL, "cls": pb.TOKEN_SELECTION_CLS,
                   "patches": pb.TOKEN_SELECTION_PATCHES, "registers": pb.TOKEN_SELECTION_REGISTERS}


def selection_name(value: int, field: str = "tokens") -> str:
    """``TokenSelection`` enum -> the library's name ('all', 'cls', 'patches', 'registers')."""
    name = SELECTION_NAMES.get(value)
    if name is None:
        raise InvalidArgument(f"{field}: unknown token selection {value}; use ALL, CLS, PATCHES or REGISTERS", field)
    return name


def layout_to_proto(layout, selection: str = "all") -> pb.TokenLayout:
    """A backbone ``Layout`` -> ``TokenLayout`` (with the selection the accompanying tensors hold)."""
    return pb.TokenLayout(
        n_cls=0 if layout.cls_index is None else 1,
        n_registers=len(layout.register_indices),
        grid_height=layout.grid_rows,
        grid_width=layout.grid_cols,
        patch_size=layout.patch_size,
        selection=SELECTION_ENUMS[selection],
    )


def layout_tokens(layout: pb.TokenLayout) -> int:
    """Tokens per image that a ``TokenLayout`` describes (for its selection)."""
    name = SELECTION_NAMES.get(layout.selection, "all")
    patches = layout.grid_height * layout.grid_width
    return {"all": layout.n_cls + layout.n_registers + patches, "cls": layout.n_cls,
            "patches": patches, "registers": layout.n_registers}[name]


def check_layout(layout: pb.TokenLayout, n_tokens: int, field: str = "layout") -> None:
    """Reject a layout that is unset, negative or disagrees with the tensor's token axis."""
    values = (layout.n_cls, layout.n_registers, layout.grid_height, layout.grid_width, layout.patch_size)
    if any(v < 0 for v in values) or layout.n_cls > 1:
        raise InvalidArgument(f"{field}: counts must be >= 0 and n_cls 0 or 1", field)
    if layout.grid_height * layout.grid_width == 0:
        raise InvalidArgument(f"{field}: grid_height and grid_width must be set (use the layout the activations "
                              "service returned)", field)
    if layout.selection not in SELECTION_NAMES:
        raise InvalidArgument(f"{field}: unknown token selection {layout.selection}", field)
    expected = layout_tokens(layout)
    if expected != n_tokens:
        raise InvalidArgument(f"{field}: describes {expected} tokens per image but the tensor has {n_tokens}; "
                              "send the layout that came with the activations", field)


def patch_mask(selection: pb.PatchSelection | None, grid: tuple[int, int], field: str = "patches") -> np.ndarray:
    """A ``PatchSelection`` -> bool ``[grid_h * grid_w]`` (row-major). Unset or ``all`` selects every patch.

    Raises InvalidArgument for out-of-range indices or boxes, masks of the wrong shape, and empty selections.
    """
    rows, cols = grid
    n = rows * cols
    kind = selection.WhichOneof("selection") if selection is not None else None
    if kind is None:
        return np.ones(n, dtype=bool)
    if kind == "all":
        if not selection.all:
            raise InvalidArgument(f"{field}.all is false: set it to true, or choose indices, a mask or a box", field)
        return np.ones(n, dtype=bool)
    mask = np.zeros(n, dtype=bool)
    if kind == "indices":
        idx = np.asarray(selection.indices.values, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx.min() if idx.min() < 0 else idx.max())
            raise InvalidArgument(f"{field}.indices: patch {bad} is out of range [0, {n}) for a {rows}x{cols} grid",
                                  f"{field}.indices")
        mask[idx] = True
    elif kind == "box":
        b = selection.box
        if not (0 <= b.row_start < b.row_end <= rows and 0 <= b.col_start < b.col_end <= cols):
            raise InvalidArgument(
                f"{field}.box: rows [{b.row_start}, {b.row_end}) and columns [{b.col_start}, {b.col_end}) must be "
                f"non-empty half-open ranges inside the {rows}x{cols} grid", f"{field}.box")
        grid_mask = mask.reshape(rows, cols)
        grid_mask[b.row_start:b.row_end, b.col_start:b.col_end] = True
    elif kind == "mask":
        m = selection.mask
        if m.dtype != pb.DTYPE_BOOL:
            raise InvalidArgument(f"{field}.mask: dtype must be BOOL", f"{field}.mask")
        shape = tuple(int(s) for s in m.shape)
        if shape not in ((rows, cols), (n,)):
            raise InvalidArgument(f"{field}.mask: shape must be [{rows}, {cols}] or [{n}], got {list(shape)}",
                                  f"{field}.mask")
        raw = np.frombuffer(m.data, dtype=np.uint8)
        if raw.size != n or (raw > 1).any():
            raise InvalidArgument(f"{field}.mask: needs {n} bytes, each 0 or 1", f"{field}.mask")
        mask = raw.astype(bool)
    if not mask.any():
        raise InvalidArgument(f"{field}: the selection is empty; select at least one patch", field)
    return mask


ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2, pb.DTYPE_FLOAT64: 8,
            pb.DTYPE_INT64: 8, pb.DTYPE_INT32: 4, pb.DTYPE_INT16: 2, pb.DTYPE_INT8: 1, pb.DTYPE_UINT8: 1,
            pb.DTYPE_BOOL: 1}
NUMPY_DTYPES = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT16: "<f2", pb.DTYPE_FLOAT64: "<f8", pb.DTYPE_INT64: "<i8",
                pb.DTYPE_INT32: "<i4", pb.DTYPE_INT16: "<i2", pb.DTYPE_INT8: "i1", pb.DTYPE_UINT8: "u1",
                pb.DTYPE_BOOL: "u1"}


def split_rows(t: pb.Tensor) -> list[pb.Tensor]:
    """A well-formed tensor ``[n, ...]`` (as a service produced it) -> its n rows ``[...]``, without decoding."""
    n = int(t.shape[0])
    row = len(t.data) // n if n else 0
    return [pb.Tensor(dtype=t.dtype, shape=list(t.shape[1:]), data=t.data[i * row:(i + 1) * row]) for i in range(n)]


def to_numpy(t: pb.Tensor) -> np.ndarray:
    """A well-formed tensor (as a service produced it; bfloat16 excluded) -> a read-only numpy view."""
    return np.frombuffer(t.data, dtype=NUMPY_DTYPES[t.dtype]).reshape([int(s) for s in t.shape])


def concat_rows(a: pb.Tensor, b: pb.Tensor) -> pb.Tensor:
    """Two well-formed tensors ``[n, ...]`` and ``[m, ...]`` of one dtype and row shape -> ``[n + m, ...]``."""
    if a.dtype != b.dtype or list(a.shape[1:]) != list(b.shape[1:]):
        raise ValueError(f"cannot stack tensors of shapes {list(a.shape)} and {list(b.shape)}")
    return pb.Tensor(dtype=a.dtype, shape=[int(a.shape[0]) + int(b.shape[0]), *a.shape[1:]], data=a.data + b.data)
