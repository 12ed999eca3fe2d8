"""Resume points of a training run as one safetensors file: nested state (dicts, lists, numbers, tensors) without
pickle.

``pack_state(obj) -> bytes`` puts every tensor of ``obj`` in a safetensors file and the rest of the structure, with
each tensor replaced by a reference, as JSON in the file's metadata. ``unpack_state(bytes) -> obj`` rebuilds it.
Dict keys keep their type (an optimiser's ``state`` is keyed by int), tuples stay tuples, and floats round-trip
exactly (JSON writes ``repr``; NaN and infinities included), so a state dict restored from a checkpoint resumes a
run bit for bit. Nothing is unpickled: reading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "saev-platform/train-state"
SCHEMA = "1"


class InvalidCheckpoint(ValueError):
    """A training checkpoint that cannot be read back; the message says why."""


def pack_state(obj: Any) -> bytes:
    """Serialise nested ``dict`` / ``list`` / ``tuple`` / scalars / ``str`` / ``None`` / tensors to bytes."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().to("cpu").contiguous().clone()
            return {"$t": name}
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise TypeError(f"state dict keys must be str or int, got {type(key).__name__} {key!r}")
            return {"$d": [[key, enc(v)] for key, v in value.items()]}
        if isinstance(value, tuple):
            return {"$u": [enc(v) for v in value]}
        if isinstance(value, list):
            return [enc(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint a {type(value).__name__}; use tensors, numbers, strings, lists and dicts")

    tree = json.dumps(enc(obj), separators=(",", ":"))
    return st_save(tensors, metadata={"format": FORMAT, "schema": SCHEMA, "tree": tree})


def unpack_state(data: bytes) -> Any:
    """Inverse of :func:`pack_state`; raises :class:`InvalidCheckpoint` for anything else."""
    data = bytes(data)
    if len(data) < 8:
        raise InvalidCheckpoint("training checkpoint is truncated (under 8 bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 1 << 28:
        raise InvalidCheckpoint("training checkpoint has a corrupt safetensors header length")
    try:
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError) as exc:
        raise InvalidCheckpoint(f"training checkpoint header is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise InvalidCheckpoint("training checkpoint header: __metadata__ must be an object")
    if meta.get("format") != FORMAT or meta.get("schema") != SCHEMA:
        raise InvalidCheckpoint(
            f"not a schema-{SCHEMA} training checkpoint (format {meta.get('format')!r}, schema {meta.get('schema')!r})"
        )
    try:
        tensors = st_load(data)
        tree = json.loads(meta["tree"])
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types; RecursionError from a deep tree
        raise InvalidCheckpoint(f"training checkpoint is corrupt: {exc}") from None

    def dec(value: Any) -> Any:
        if isinstance(value, dict):
            if "$t" in value:
                return tensors[value["$t"]]
            if "$d" in value:
                return {key: dec(v) for key, v in value["$d"]}
            if "$u" in value:
                return tuple(dec(v) for v in value["$u"])
            raise InvalidCheckpoint(f"training checkpoint: unknown node {sorted(value)}")
        if isinstance(value, list):
            return [dec(v) for v in value]
        return value

    try:
        return dec(tree)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise InvalidCheckpoint(f"training checkpoint is corrupt: {exc}") from None
