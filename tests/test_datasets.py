"""Datasets: layouts, bundled sets, the image decoder's guards, patch labels and seeded augmentation."""

from __future__ import annotations

import io
import zlib
import struct

import numpy as np
import pytest
from PIL import Image

from sae_shared import datasets as ds


def _png_bytes(w: int, h: int, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG that claims to be w×h (a decompression bomb as far as its header goes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decode_refuses_bombs_and_garbage():
    assert ds.decode_image(_png_bytes(4, 3)).size == (4, 3)
    with pytest.raises(ds.ImageError, match="pixels|bomb"):
        ds.decode_image(_png_header_only(100_000, 100_000))
    with pytest.raises(ds.ImageError, match="pixels|bomb"):
        ds.decode_image(_png_bytes(100, 100), max_pixels=5_000)
    for junk in (b"", b"not an image", _png_bytes(8, 8)[:40]):
        with pytest.raises(ds.ImageError):
            ds.decode_image(junk)


def test_image_folder_labels_follow_sorted_class_names(tmp_path):
    for cls, n in (("zebra", 2), ("ant", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.png").write_bytes(_png_bytes(5, 5))
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    folder = ds.ImageFolder(tmp_path)
    assert folder.classes == ["ant", "zebra"] and len(folder) == 5
    assert [folder.sample(i).label for i in range(5)] == [0, 0, 0, 1, 1]
    assert folder.sample(3).image_id == "zebra/0.png"
    h = folder.manifest_hash()
    (tmp_path / "zebra" / "1.png").write_bytes(_png_bytes(5, 5, (0, 0, 0)))
    assert ds.ImageFolder(tmp_path).manifest_hash() != h
    with pytest.raises(ds.DatasetError, match="no class subfolders"):
        ds.ImageFolder(tmp_path / "ant")


def test_ade20k_layout_and_patch_majority_vote(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    mask = np.zeros((28, 28), np.uint8)
    mask[:14, :] = 3
    mask[14:, :20] = 7
    Image.fromarray(mask).save(tmp_path / "annotations" / "training" / "a.png")
    (tmp_path / "images" / "training" / "a.jpg").write_bytes(_png_bytes(28, 28))
    ade = ds.ADE20K(tmp_path)
    assert len(ade) == 1 and np.array_equal(ade.load_mask(0), mask)
    labels = ds.patch_labels(ade.load_mask(0), 2, 2)
    assert labels.tolist() == [[3, 3], [7, 0]]  # bottom right: 6 columns of 7 vs 8 of 0 → 0


def test_patch_labels_equal_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.integers(0, 4, size=(12, 12))
        got = ds.patch_labels(mask, 3, 4)
        for r in range(3):
            for c in range(4):
                block = mask[r * 4:(r + 1) * 4, c * 3:(c + 1) * 3].ravel()
                counts = np.bincount(block, minlength=4)
                assert got[r, c] == int(np.argmax(counts))
    with pytest.raises(ValueError, match="patch grid"):
        ds.patch_labels(np.zeros((10, 10)), 3, 3)


def test_ignored_class_wins_only_full_patches():
    mask = np.zeros((4, 4), np.int64)
    mask[0, 0] = 5
    assert ds.patch_labels(mask, 1, 1, ignore=0).tolist() == [[5]]
    assert ds.patch_labels(np.zeros((4, 4), np.int64), 1, 1, ignore=0).tolist() == [[0]]


@pytest.mark.parametrize("name,size,labels", [("bundled-lfw", 200, {0, 1}), ("bundled-digits", 1797, set(range(10)))])
def test_bundled_labelled_sets(name, size, labels):
    data = ds.open_dataset(name)
    assert len(data) == size and set(data.classes or []) and data.id == name
    assert {data.sample(i).label for i in range(len(data))} == labels
    assert data.load_image(0).mode == "RGB"
    assert data.manifest_hash() == ds.open_dataset(name).manifest_hash()


def test_bundled_photos_are_real_photos():
    photos = ds.open_dataset("bundled-photos")
    assert len(photos) >= 15
    ids = [photos.sample(i).image_id for i in range(len(photos))]
    assert "skimage/astronaut" in ids and len(set(ids)) == len(ids)
    assert all(min(photos.load_image(i).size) >= 100 for i in range(len(photos)))


def test_open_dataset_names_the_choices():
    with pytest.raises(ds.DatasetError, match="bundled-photos"):
        ds.open_dataset("imagenet")


def test_augmentation_is_seeded_and_recorded():
    aug = ds.Augmentation(seed=3, views_per_image=4)
    views = [aug.view(7, v, 300, 200) for v in range(4)]
    assert views[0] == ds.View((0, 0, 300, 200), False)
    assert views == [ds.Augmentation(seed=3, views_per_image=4).view(7, v, 300, 200) for v in range(4)]
    assert views[1:] != [ds.Augmentation(seed=4, views_per_image=4).view(7, v, 300, 200) for v in range(1, 4)]
    for v in views:
        l, t, r, b = v.crop
        assert 0 <= l < r <= 300 and 0 <= t < b <= 200
        area = (r - l) * (b - t) / (300 * 200)
        assert area >= 0.35 - 0.02 or v == views[0]
    img = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint8).reshape(200, 300, 3))
    flipped = ds.View((10, 20, 110, 70), True).apply(img)
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[20:70, 10:110][:, ::-1])
    with pytest.raises(ValueError, match="views_per_image"):
        ds.Augmentation(views_per_image=0)
