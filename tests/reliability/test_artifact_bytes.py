"""The same tensors give the same file bytes in every process (artifacts are compared and addressed by sha256)."""

from __future__ import annotations

import subprocess
import sys

from tests.workers_support import REPO

ENCODE = """
import hashlib, torch
from sae_shared.storage import decode_tensors, encode_tensors
t = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64)}
data = encode_tensors(t, metadata={"format": "pt", "schema": "1", "kind": "test", "tree": "x"})
back = decode_tensors(data, "k")
assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
print(hashlib.sha256(data).hexdigest())
"""


def test_encoded_tensors_are_the_same_bytes_in_every_process():
    # safetensors writes its metadata map in a per-process random order: 4 keys, 24 orders; four processes agree
    # by chance once in 24**3 runs without the canonical header.
    digests = {subprocess.run([sys.executable, "-c", ENCODE], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=120).stdout.strip() for _ in range(4)}
    assert len(digests) == 1, digests
