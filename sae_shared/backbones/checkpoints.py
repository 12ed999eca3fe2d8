"""Weights files: hashing, reading (safetensors or a weights-only torch file) and writing self-describing copies.

Files written by :meth:`Backbone.save_checkpoint` are safetensors with a small JSON description in the header
(family, model name, architecture options, image transform), so ``load_backbone(family, checkpoint=path)`` needs no
other argument to rebuild the same backbone. Torch pickles are read with ``weights_only=True``: never unpickle an
untrusted file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_SCHEMA = 1
"""Version of the header written into backbone checkpoints; bump on any change to its keys."""

_HEADER_KEY = "saev.backbone"


@dataclass(frozen=True)
class CheckpointFile:
    """A weights file read from disk."""

    path: Path
    """Where it was read from."""
    sha256: str
    """Hex sha256 of the file's bytes; part of the backbone id."""
    state_dict: dict[str, torch.Tensor]
    """The tensors, unwrapped from a ``{"state_dict": ...}`` / ``{"model": ...}`` container and any ``module.``
    prefix."""
    header: dict[str, Any] = field(default_factory=dict)
    """The description this package wrote into the file (empty for files from elsewhere)."""


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> CheckpointFile:
    """Read a weights file: ``.safetensors``, or a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    header: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            if _HEADER_KEY in meta:
                header = json.loads(meta[_HEADER_KEY])
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors (a pickle or junk named .safetensors)
            raise ValueError(f"cannot read checkpoint {path} as safetensors: {exc}") from exc
        if not isinstance(header, dict):
            raise ValueError(f"checkpoint {path}: its {_HEADER_KEY} metadata is not a JSON object")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - say which file and why, whatever torch raised
            raise ValueError(f"cannot read checkpoint {path} as a weights-only torch file: {exc}") from exc
        tensors = _unwrap(obj, path)
    if any(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return CheckpointFile(path=path, sha256=sha256_file(path), state_dict=tensors, header=header)


def write_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], header: dict[str, Any]) -> str:
    """Write ``state_dict`` as safetensors with ``header`` in its metadata; returns the file's sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"backbone checkpoints are written as safetensors: name the file *.safetensors, not {path}")
    # clone: safetensors refuses tensors that share storage (tied or viewed parameters)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={_HEADER_KEY: json.dumps({"schema": CHECKPOINT_SCHEMA, **header})})
    return sha256_file(path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    return dict(obj)
