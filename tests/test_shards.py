"""Shard sets and their readers, on the file backend and on the real S3 server."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sae_shared.loader import OrderedReader, ShuffledReader
from sae_shared.shards import (ShardSet, ShardSetError, ShardSetMetadata, ShardSetWriter, TokenLayout,
                               compute_acts_id)
from sae_shared.storage import FileStore, S3Store, make_minio_client

N_ROWS, LAYERS, GRID, D = 10, (3, 7), (2, 3), 5
LAYOUT = TokenLayout(n_tokens=1 + 6, cls_index=0, register_indices=(), patch_start=1, patch_grid=GRID)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return FileStore(tmp_path / "store")
    settings = request.getfixturevalue("settings")
    bucket = request.getfixturevalue("bucket")
    endpoint, access, secret = settings.require_s3()
    return S3Store(make_minio_client(endpoint, access, secret), bucket, retry_seconds=10)


def _metadata(dtype="float32", rows_per_shard=4) -> ShardSetMetadata:
    aug = {"seed": 0, "views_per_image": 1}
    return ShardSetMetadata(
        acts_id=compute_acts_id(dataset_id="fake", dataset_hash="h", backbone_id="fake:1", layers=LAYERS,
                                tokens="all", dtype=dtype, augmentation=aug),
        backbone_id="fake:1", layers=LAYERS, tokens="all", token_layout=LAYOUT, d_model=D, dtype=dtype,
        n_rows=N_ROWS, rows_per_shard=rows_per_shard, dataset_id="fake", dataset_hash="h", augmentation=aug,
    )


def _acts(dtype=torch.float32) -> torch.Tensor:
    # Every value names its own (row, layer, token, dim), so any misplaced byte shows.
    r, l, t, d = torch.meshgrid(*(torch.arange(n) for n in (N_ROWS, len(LAYERS), LAYOUT.n_tokens, D)), indexing="ij")
    return (r * 1000 + l * 100 + t * 10 + d).to(dtype)


def _write(store, meta: ShardSetMetadata, acts: torch.Tensor, commit=True) -> ShardSetWriter:
    writer = ShardSetWriter(store, meta)
    for s in range(meta.n_shards):
        rows = meta.shard_rows(s)
        writer.write_shard(s, acts[rows.start:rows.stop],
                           [{"image_index": i, "image_id": f"img{i}", "label": i % 2, "view": None} for i in rows])
    if commit:
        writer.commit()
    return writer


def test_acts_id_names_the_inputs():
    base = dict(dataset_id="d", dataset_hash="h", backbone_id="b", layers=[1], tokens="all", dtype="float32",
                augmentation={"seed": 0})
    assert compute_acts_id(**base) == compute_acts_id(**base)
    assert compute_acts_id(**base) != compute_acts_id(**{**base, "layers": [2]})
    assert compute_acts_id(**base) != compute_acts_id(**{**base, "augmentation": {"seed": 1}})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ranged_reads_return_exactly_the_selected_layer_and_tokens(store, dtype):
    meta = _metadata(dtype)
    acts = _acts(getattr(torch, dtype))
    _write(store, meta, acts)
    ss = ShardSet(store, meta.acts_id)
    assert ss.metadata == meta and meta.n_shards == 3
    for shard in range(meta.n_shards):
        start = meta.shard_rows(shard).start
        n = len(meta.shard_rows(shard))
        for layer_pos, layer in enumerate(LAYERS):
            for tokens, idx in (("all", list(range(7))), ("patches", list(range(1, 7))), ("cls", [0]), ([6, 2], [6, 2])):
                got = ss.read(shard, range(0, n), layer, tokens)
                assert torch.equal(got, acts[start:start + n, layer_pos][:, idx])
        assert torch.equal(ss.read_shard_full(shard), acts[start:start + n])
    assert ss.rows(2)[0]["image_id"] == "img8"
    with pytest.raises(ShardSetError, match="recorded layers"):
        ss.read(0, range(0, 1), 5)
    with pytest.raises(ShardSetError, match="no register"):
        ss.read(0, range(0, 1), 3, "registers")
    ss.close()


def test_incomplete_shard_set_is_refused(store):
    meta = _metadata()
    writer = _write(store, meta, _acts(), commit=False)
    with pytest.raises(ShardSetError, match="not complete"):
        ShardSet(store, meta.acts_id)
    with pytest.raises(ShardSetError, match="must be"):
        writer.write_shard(0, torch.zeros(4, 2, 7, 4), [{}] * 4)
    writer.commit()
    ShardSet(store, meta.acts_id).close()


def test_commit_refuses_missing_shards(tmp_path):
    store = FileStore(tmp_path)
    meta = _metadata()
    writer = ShardSetWriter(store, meta)
    writer.write_shard(0, _acts()[:4], [{}] * 4)
    with pytest.raises(ShardSetError, match=r"shards \[1, 2\]"):
        writer.commit()


def test_shuffled_reader_delivers_every_token_once_in_a_seeded_order(store):
    meta = _metadata()
    acts = _acts()
    _write(store, meta, acts)
    ss = ShardSet(store, meta.acts_id)
    reader = ShuffledReader(ss, layer=7, tokens="patches", batch_size=8, seed=1, buffer_tokens=20, chunk_rows=3)
    batches = list(reader.epoch(0))
    assert len(batches) == len(reader) and reader.n_tokens == N_ROWS * 6
    assert all(b.shape == (8, D) for b in batches[:-1]) and batches[-1].shape[0] == N_ROWS * 6 - 8 * (len(batches) - 1)
    got = torch.cat(batches)
    expected = acts[:, 1, 1:].reshape(-1, D)
    assert Counter(map(tuple, got.tolist())) == Counter(map(tuple, expected.tolist()))
    assert not torch.equal(got, expected)
    again = torch.cat(list(ShuffledReader(ss, 7, "patches", 8, seed=1, buffer_tokens=20, chunk_rows=3).epoch(0)))
    assert torch.equal(got, again)
    other_seed = torch.cat(list(ShuffledReader(ss, 7, "patches", 8, seed=2, buffer_tokens=20, chunk_rows=3).epoch(0)))
    other_epoch = torch.cat(list(reader.epoch(1)))
    assert not torch.equal(got, other_seed) and not torch.equal(got, other_epoch)
    resumed = torch.cat(list(reader.epoch(0, start_batch=3)))
    assert torch.equal(resumed, torch.cat(batches[3:]))
    reader.close()
    ss.close()


def test_ordered_reader_keeps_provenance(tmp_path):
    store = FileStore(tmp_path)
    meta = _metadata()
    acts = _acts()
    _write(store, meta, acts)
    batches = list(OrderedReader(ShardSet(store, meta.acts_id), layer=3, tokens="cls", batch_rows=3))
    rows = [r for b in batches for r in b.rows]
    assert [r["row"] for r in rows] == list(range(N_ROWS)) and rows[5]["image_id"] == "img5"
    assert torch.equal(torch.cat([b.acts for b in batches]), acts[:, 0, :1])
