"""The dataset upload path (``saevctl datasets upload`` -> ``sae_shared.datasets.upload_dataset``) fed hostile
folders and names, against the real S3 server: non-images, decompression bombs, oversized files, symbolic links
(out of the folder), traversal in dataset and file names. Each is refused with a clear error or skipped and listed,
and nothing of a refused upload reaches the store."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from sae_shared.datasets import DatasetError, StoredDataset, open_dataset, upload_dataset


def _png(size=(8, 8), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(side: int = 100_000) -> bytes:
    """A valid-looking PNG whose header claims side x side pixels (10^10 by default) in a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _hostile_files(folder: Path) -> dict[str, str]:
    """Write the hostile files into ``folder``; returns file -> the reason it must be skipped for (a regex)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.png").write_text("not an image at all")
    (folder / "script.jpg").write_bytes(b"#!/bin/sh\nrm -rf /\n")
    (folder / "bomb.png").write_bytes(_png_bomb())
    (folder / "truncated.png").write_bytes(_png()[:40])
    (folder / "empty.gif").write_bytes(b"")
    return {"notes.png": "cannot decode", "script.jpg": "cannot decode", "bomb.png": "pixels|bomb",
            "truncated.png": "cannot decode", "empty.gif": "cannot decode"}


@pytest.fixture
def store(settings, bucket):
    from sae_shared.storage import open_store

    return open_store(settings.model_copy(update={"storage_url": f"s3://{bucket}"}))


def test_a_folder_of_only_hostile_files_is_refused_and_nothing_is_written(tmp_path, store):
    _hostile_files(tmp_path / "bad")
    with pytest.raises(DatasetError, match="no readable images"):
        upload_dataset(store, tmp_path / "bad", "hostile")
    assert store.list("") == []


def test_hostile_files_beside_good_ones_are_skipped_and_listed_and_never_stored(tmp_path, store):
    reasons = _hostile_files(tmp_path / "mixed")
    (tmp_path / "mixed" / "good.png").write_bytes(_png())
    (tmp_path / "outside.png").write_bytes(_png(color=(1, 2, 3)))
    os.symlink(tmp_path / "outside.png", tmp_path / "mixed" / "link.png")
    (tmp_path / "mixed" / "big.png").write_bytes(_png((64, 64)))
    result = upload_dataset(store, tmp_path / "mixed", "mixed", max_file_bytes=len(_png((64, 64))) - 1)
    skipped = {s["file"]: s["reason"] for s in result["skipped"]}
    assert result["n_images"] == 1
    assert set(skipped) == set(reasons) | {"link.png", "big.png"}
    for name, pattern in reasons.items():
        assert re.search(pattern, skipped[name]), (name, skipped[name])
    assert "symbolic link" in skipped["link.png"] and "limit" in skipped["big.png"]
    keys = store.list("datasets/mixed/")
    assert sorted(k.rsplit("/", 1)[-1] for k in keys if "/images/" in k) == ["000000-good.png"]
    ds = StoredDataset(store, "mixed")
    assert len(ds) == 1 and ds.load_image(0).size == (8, 8)


def test_a_symlinked_class_folder_pointing_outside_is_refused(tmp_path, store):
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "private.png").write_bytes(_png())
    root = tmp_path / "classes"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "a.png").write_bytes(_png())
    os.symlink(secret, root / "dogs")
    with pytest.raises(DatasetError, match="symbolic links: dogs"):
        upload_dataset(store, root, "linked")
    assert store.list("") == []


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 200, "a\nb", "saes/../x", "..", "a b"])
def test_dataset_names_with_traversal_or_odd_characters_are_refused(tmp_path, store, name):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(_png())
    with pytest.raises(DatasetError, match="dataset name"):
        upload_dataset(store, tmp_path / "ok", name)
    with pytest.raises(DatasetError, match="dataset name"):
        open_dataset(f"stored:{name}", store) if name else StoredDataset(store, name)
    assert store.list("") == []


def test_file_names_cannot_escape_the_dataset_folder(tmp_path, store):
    root = tmp_path / "names"
    root.mkdir()
    for name in ["..png", "...png", "a b;rm -rf.png", "ünï.png", "-.png", "%2e%2e%2fx.png"]:
        (root / name).write_bytes(_png())
    result = upload_dataset(store, root, "names")
    assert result["n_images"] == 6 and not result["skipped"]
    for key in store.list(""):
        assert key.startswith("datasets/names/")
        assert ".." not in key.split("/") and " " not in key
    ids = [StoredDataset(store, "names").sample(i).image_id for i in range(6)]
    assert sorted(ids) == sorted(p.name for p in root.iterdir())


def test_the_cli_refuses_a_traversal_name_and_a_folder_of_non_images(tmp_path, settings, bucket, store, monkeypatch):
    import typer.testing

    from sae_shared.settings import get_settings
    from services.cli import app
    from tests.workers_support import worker_env

    for key, value in worker_env(settings, bucket).items():
        if key.startswith("SAEV_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("SAEV_LOG_JSON", "0")
    get_settings.cache_clear()
    _hostile_files(tmp_path / "bad")
    run = typer.testing.CliRunner().invoke
    try:
        traversal = run(app, ["datasets", "upload", str(tmp_path / "bad"), "--name", "../../saes/x"])
        assert traversal.exit_code == 2 and "--name must be" in traversal.output
        hostile = run(app, ["datasets", "upload", str(tmp_path / "bad"), "--name", "hostile", "--json"])
        assert hostile.exit_code == 2 and "no readable images" in hostile.output, hostile.output
        assert "Traceback" not in hostile.output
    finally:
        get_settings.cache_clear()
    assert store.list("") == []


def test_a_stored_index_pointing_elsewhere_is_refused(store):
    """A tampered index.json whose keys climb out of the dataset folder is refused by the store's key rules."""
    from sae_shared.storage import InvalidKey

    writer = store.artifact("datasets/tampered")
    writer.put_bytes("images/000000-a.png", _png())
    writer.put_json("index.json", {"schema": 1, "classes": None,
                                   "images": [{"id": "a", "key": "../../saes/x/cfg.json", "label": None}]})
    writer.commit(extra={"manifest_hash": "0" * 64, "n_images": 1, "skipped": []})
    with pytest.raises(InvalidKey, match="'..' segment"):
        StoredDataset(store, "tampered").load_image(0)
    assert json.loads(store.get_bytes("datasets/tampered/index.json"))["images"][0]["key"].startswith("..")


def test_local_dataset_folders_are_confined_to_the_configured_roots(tmp_path, monkeypatch):
    """With SAEV_DATASET_ROOTS set, a job spec cannot name (and the services later serve images of) another folder."""
    from sae_shared.datasets import DatasetError, open_dataset
    from sae_shared.settings import get_settings

    allowed, other = tmp_path / "datasets", tmp_path / "elsewhere"
    for root in (allowed / "a" / "cat", other / "cat"):
        root.mkdir(parents=True)
        (root / "x.png").write_bytes(_png())
    monkeypatch.setenv("SAEV_DATASET_ROOTS", f"{allowed}, /nonexistent")
    get_settings.cache_clear()
    try:
        assert len(open_dataset(f"imagefolder:{allowed / 'a'}")) == 1
        for spec in (f"imagefolder:{other}", f"ade20k:{other}", f"imagefolder:{allowed}/../elsewhere"):
            with pytest.raises(DatasetError, match="outside the allowed dataset roots"):
                open_dataset(spec)
    finally:
        monkeypatch.delenv("SAEV_DATASET_ROOTS")
        get_settings.cache_clear()
    assert len(open_dataset(f"imagefolder:{other}")) == 1  # unset: any readable folder (a laptop)
