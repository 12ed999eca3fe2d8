"""The same tensors give the same file bytes in every process (artifacts are compared and addressed by sha256):
tensors put in the store, an SAE's and a head's weights file."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys

import torch

from sae_shared.storage import canonical_safetensors, decode_tensors, encode_tensors
from tests.workers_support import REPO

TENSORS = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64)}
METADATA = {"format": "pt", "schema": "1", "kind": "test", "tree": "x"}
ENCODE = f"""
import torch
from sae_shared.storage import encode_tensors
from tests.reliability.test_artifact_bytes import digests
t = {{"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64)}}
print(digests(encode_tensors(t, metadata={METADATA!r})))
"""


def digests(tensors_file: bytes) -> list[str]:
    """sha256 of a tensors file, of a small seeded SAE's weights file and of a probe head's."""
    from sae_shared.heads import HeadContract, LinearProbe, to_files as head_files
    from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder
    from sae_shared.sae.io import to_files as sae_files

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_model=8, d_sae=16, variant=Relu(), seed=1),
                            contract=Contract(backbone_id="fake:vit", layer=3, tokens="patches"))
    head = LinearProbe(["a", "b"], HeadContract(backbone_id="fake:vit", input="pooled", d_in=8, layout={}))
    files = [tensors_file, sae_files(sae)["sae.safetensors"], head_files(head)["head.safetensors"]]
    return [hashlib.sha256(f).hexdigest() for f in files]


def _with_header(data: bytes, header: dict) -> bytes:
    text = json.dumps(header).encode()
    n = int.from_bytes(data[:8], "little")
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def test_every_order_of_the_header_gives_one_file():
    data = encode_tensors(TENSORS, metadata=METADATA)
    back = decode_tensors(data, "k")
    assert back.keys() == TENSORS.keys() and all(torch.equal(back[k], TENSORS[k]) for k in TENSORS)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    for keys in itertools.permutations(METADATA):
        shuffled = {**{k: header[k] for k in reversed(list(header)) if k != "__metadata__"},
                    "__metadata__": {k: METADATA[k] for k in keys}}
        assert canonical_safetensors(_with_header(data, shuffled)) == data


def test_tensors_sae_and_head_files_are_the_same_bytes_in_another_process():
    # safetensors writes its metadata map in a per-process random order (4 keys: 24 orders; 2 keys: 2).
    here = str(digests(encode_tensors(TENSORS, metadata=METADATA)))
    there = subprocess.run([sys.executable, "-c", ENCODE], cwd=REPO, capture_output=True, text=True, check=True,
                           timeout=120).stdout.strip()
    assert there == here
