"""Image datasets: ImageFolder, ADE20K layout, datasets uploaded to the object store, and bundled sets.

Every dataset has an ``id`` and a ``manifest_hash`` (a digest of what it holds) so a recording over it can be named
by its inputs. Items are :class:`Sample` s. Images are decoded with Pillow under a pixel limit: a decompression bomb
or an unreadable file raises :class:`ImageError`, which recorders count and skip.

Augmentation draws many views from a small set: :class:`Augmentation` gives each (image, view) pair a seeded random
resized crop and flip, recorded as a :class:`View` so the exact view can be redrawn later (exemplars, heatmaps).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 64_000_000
"""Images larger than this many pixels are refused (decompression-bomb guard)."""
DEFAULT_MAX_FILE_BYTES = 256 << 20
"""Uploaded files larger than this are skipped unread."""
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A stored dataset's name: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit."""
BUNDLED = ("bundled-photos", "bundled-lfw", "bundled-digits")


class ImageError(ValueError):
    """An image could not be decoded, or is too large to decode safely."""


class DatasetError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    """One item of a dataset."""

    image_id: str
    """Stable name of the image within its dataset (relative path, or ``name-<index>`` for bundled sets)."""
    label: int | None = None
    """Class index for labelled datasets, else None."""
    mask_path: str | None = None
    """Segmentation mask location for ADE20K-layout datasets (class index per pixel, 0 = unlabelled)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes to RGB, refusing bombs and corrupt files with :class:`ImageError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
                    if w * h > max_pixels:
                        raise ImageError(f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
                    img.load()
                    return img.convert("RGB")
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt input
        raise ImageError(f"cannot decode image ({type(exc).__name__}): {exc}") from exc


def array_to_image(arr: np.ndarray) -> Image.Image:
    """A uint8 / bool / float array in [0, 1] (H×W, H×W×3 or H×W×4) to an RGB PIL image."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo if hi > lo else 1.0) * 255).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(arr[..., :3]).convert("RGB")


class Dataset(Protocol):
    """What recorders and experiments need of a dataset."""

    id: str
    classes: list[str] | None

    def __len__(self) -> int: ...

    def sample(self, index: int) -> Sample: ...

    def load_image(self, index: int) -> Image.Image: ...

    def manifest_hash(self) -> str: ...


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ on-disk layouts


class ImageFolder:
    """``root/<class name>/<image>``: one subfolder per class, sorted names give the label indices."""

    def __init__(self, root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"ImageFolder root {self.root} is not a directory")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise DatasetError(f"ImageFolder {self.root} has no class subfolders (expected root/<class>/<image>)")
        self._items: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            for path in sorted((self.root / name).rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    self._items.append((path, label))
        if not self._items:
            raise DatasetError(f"ImageFolder {self.root} holds no images with extensions {IMAGE_EXTENSIONS}")
        self.max_pixels = max_pixels
        self.id = f"imagefolder:{self.root.name}"

    def __len__(self) -> int:
        return len(self._items)

    def sample(self, index: int) -> Sample:
        path, label = self._items[index]
        return Sample(image_id=path.relative_to(self.root).as_posix(), label=label)

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self._items[index][0].read_bytes(), self.max_pixels)

    def manifest_hash(self) -> str:
        """Digest of every (relative path, label, content hash): changes when any image changes."""
        h = hashlib.sha256()
        for path, label in self._items:
            h.update(f"{path.relative_to(self.root).as_posix()}\0{label}\0{_sha256(path.read_bytes())}\n".encode())
        return h.hexdigest()


class ADE20K:
    """ADEChallengeData2016 layout: ``images/<split>/X.jpg`` with ``annotations/<split>/X.png`` masks.

    Mask pixels hold class indices 1..150; 0 is "other / unlabelled" (ignored by mIoU).
    """

    def __init__(self, root: str | Path, split: str = "training", max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        images, masks = self.root / "images" / split, self.root / "annotations" / split
        if not images.is_dir() or not masks.is_dir():
            raise DatasetError(f"ADE20K root {self.root} needs images/{split}/ and annotations/{split}/")
        self._items = []
        for path in sorted(images.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                mask = masks / (path.stem + ".png")
                if not mask.is_file():
                    raise DatasetError(f"ADE20K image {path.name} has no mask {mask}")
                self._items.append((path, mask))
        if not self._items:
            raise DatasetError(f"ADE20K {images} holds no images")
        self.split, self.max_pixels = split, max_pixels
        self.classes = None
        self.id = f"ade20k:{self.root.name}/{split}"

    def __len__(self) -> int:
        return len(self._items)

    def sample(self, index: int) -> Sample:
        path, mask = self._items[index]
        return Sample(image_id=path.relative_to(self.root).as_posix(), mask_path=str(mask))

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self._items[index][0].read_bytes(), self.max_pixels)

    def load_mask(self, index: int) -> np.ndarray:
        """The class-index mask ``[H, W]`` (uint16)."""
        with Image.open(self._items[index][1]) as m:
            return np.asarray(m, dtype=np.uint16)

    def manifest_hash(self) -> str:
        h = hashlib.sha256()
        for path, mask in self._items:
            h.update(f"{path.name}\0{_sha256(path.read_bytes())}\0{_sha256(mask.read_bytes())}\n".encode())
        return h.hexdigest()


def patch_labels(mask_hw: np.ndarray, rows: int, cols: int, ignore: int | None = None) -> np.ndarray:
    """Majority class per patch of a ``rows × cols`` grid over a mask (already resized to the model input).

    Ties go to the smaller class index. With ``ignore`` set, that class only wins a patch it fills entirely.
    Returns ``[rows, cols]`` int64.
    """
    h, w = mask_hw.shape
    if h % rows or w % cols:
        raise ValueError(f"mask {h}x{w} does not split into a {rows}x{cols} patch grid; resize it first")
    ph, pw = h // rows, w // cols
    blocks = mask_hw.reshape(rows, ph, cols, pw).transpose(0, 2, 1, 3).reshape(rows * cols, ph * pw)
    n_classes = int(mask_hw.max()) + 1
    counts = np.zeros((rows * cols, n_classes), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(rows * cols), ph * pw), blocks.reshape(-1).astype(np.int64)), 1)
    if ignore is not None and ignore < n_classes:
        full = counts[:, ignore] == ph * pw
        counts[~full, ignore] = -1
    return counts.argmax(axis=1).reshape(rows, cols)


# ------------------------------------------------------------------------------------------------ bundled sets


class InMemory:
    """A dataset held as a list of RGB images (the bundled sets)."""

    def __init__(self, id: str, images: Sequence[Image.Image], names: Sequence[str],
                 labels: Sequence[int] | None = None, classes: list[str] | None = None):
        if len(images) != len(names) or (labels is not None and len(labels) != len(images)):
            raise DatasetError("images, names and labels must have the same length")
        self.id, self.classes = id, classes
        self._images, self._names, self._labels = list(images), list(names), labels

    def __len__(self) -> int:
        return len(self._images)

    def sample(self, index: int) -> Sample:
        return Sample(self._names[index], None if self._labels is None else int(self._labels[index]))

    def load_image(self, index: int) -> Image.Image:
        return self._images[index]

    def manifest_hash(self) -> str:
        h = hashlib.sha256()
        for i, img in enumerate(self._images):
            label = "" if self._labels is None else str(int(self._labels[i]))
            h.update(f"{self._names[i]}\0{label}\0{img.size}\0{_sha256(img.tobytes())}\n".encode())
        return h.hexdigest()


# scikit-image photos that ship inside the package (no download); grayscale ones become RGB.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                   "retina", "camera", "coins", "moon", "page", "text", "clock", "brick", "grass", "gravel",
                   "cell", "colorwheel")


def _bundled_photos() -> InMemory:
    import skimage.data
    from sklearn.datasets import load_sample_images

    images, names = [], []
    for name in _SKIMAGE_PHOTOS:
        try:
            images.append(array_to_image(getattr(skimage.data, name)()))
            names.append(f"skimage/{name}")
        except Exception:  # noqa: BLE001 - an image that needs a download offline is left out
            continue
    sample = load_sample_images()
    for fname, arr in zip(sample.filenames, sample.images):
        images.append(array_to_image(arr))
        names.append(f"sklearn/{Path(fname).stem}")
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            images.append(decode_image(f.read()))
            names.append("matplotlib/grace_hopper")
    except Exception:  # noqa: BLE001 - matplotlib is optional
        pass
    return InMemory("bundled-photos", images, names)


def _bundled_lfw() -> InMemory:
    import skimage.data

    faces = skimage.data.lfw_subset()  # [200, 25, 25] float in [0, 1]: 100 faces, then 100 non-faces
    images = [array_to_image((f * 255).round().astype(np.uint8)) for f in faces]
    labels = [1] * 100 + [0] * 100
    names = [f"lfw/{'face' if y else 'nonface'}-{i:03d}" for i, y in enumerate(labels)]
    return InMemory("bundled-lfw", images, names, labels, ["non-face", "face"])


def _bundled_digits() -> InMemory:
    from sklearn.datasets import load_digits

    digits = load_digits()  # [1797, 8, 8] in 0..16
    images = [array_to_image((d * (255 / 16)).round().astype(np.uint8)) for d in digits.images]
    names = [f"digits/{i:04d}" for i in range(len(images))]
    return InMemory("bundled-digits", images, names, [int(t) for t in digits.target], [str(i) for i in range(10)])


_BUNDLED_LOADERS: dict[str, Callable[[], InMemory]] = {
    "bundled-photos": _bundled_photos,
    "bundled-lfw": _bundled_lfw,
    "bundled-digits": _bundled_digits,
}


def load_bundled(name: str) -> InMemory:
    """One of the datasets that ship inside installed packages (no download needed)."""
    if name not in _BUNDLED_LOADERS:
        raise DatasetError(f"unknown bundled dataset {name!r}; known: {', '.join(BUNDLED)}")
    return _BUNDLED_LOADERS[name]()


# ------------------------------------------------------------------------------------------------ object store


class StoredDataset:
    """A dataset uploaded with :func:`upload_dataset`: ``datasets/<name>/`` holding images and a manifest."""

    def __init__(self, store, name: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        check_dataset_name(name)
        self.store, self.name, self.max_pixels = store, name, max_pixels
        self.prefix = f"datasets/{name}"
        manifest = store.read_manifest(self.prefix)  # raises when the upload never completed
        self._index = store.get_json(f"{self.prefix}/index.json")
        self.classes = self._index.get("classes")
        self._hash = manifest["extra"]["manifest_hash"]
        self.id = f"stored:{name}"

    def __len__(self) -> int:
        return len(self._index["images"])

    def sample(self, index: int) -> Sample:
        item = self._index["images"][index]
        return Sample(item["id"], item.get("label"))

    def load_image(self, index: int) -> Image.Image:
        item = self._index["images"][index]
        return decode_image(self.store.get_bytes(f"{self.prefix}/{item['key']}"), self.max_pixels)

    def manifest_hash(self) -> str:
        return self._hash


def check_dataset_name(name: str) -> str:
    """``name`` if it is a valid stored dataset name (no '/', no '..'), else :class:`DatasetError`."""
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        raise DatasetError(f"dataset name must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or "
                           f"digit), got {str(name)[:80]!r}")
    return name


def _safe_upload_name(rel: str) -> str:
    """An object-key-safe name for an uploaded file (no traversal, no odd characters)."""
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in rel.replace("/", "__"))
    return clean.lstrip(".") or "image"


def upload_dataset(store, root: str | Path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                   progress: Callable[[int, int], None] | None = None,
                   max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> dict:
    """Upload an ImageFolder (class subfolders) or a flat folder of images as ``datasets/<name>/``.

    Every image is decoded first: files that are not images, too large (bytes or pixels), or symbolic links are
    skipped and listed in the result; symbolically linked class folders are refused. Nothing is written unless at
    least one image is readable, and the dataset becomes visible only when its manifest is written, after all images.
    """
    check_dataset_name(name)
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory")
    linked = sorted(p.name for p in root.iterdir() if p.is_symlink() and p.is_dir())
    if linked:
        raise DatasetError(f"{root}: class folders must be real folders, not symbolic links: {', '.join(linked)}")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int | None]] = []
    if subdirs:
        for label, d in enumerate(subdirs):
            files += [(p, label) for p in sorted((root / d).rglob("*")) if p.is_file()]
    else:
        files = [(p, None) for p in sorted(root.iterdir()) if p.is_file()]
    writer = store.artifact(f"datasets/{name}")  # refuses a name already taken, before reading anything
    images, skipped, digest = [], [], hashlib.sha256()
    for i, (path, label) in enumerate(files):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            skipped.append({"file": rel, "reason": "symbolic links are not uploaded"})
            continue
        size = path.stat().st_size
        if size > max_file_bytes:
            skipped.append({"file": rel, "reason": f"file is {size} bytes, more than the limit of {max_file_bytes}"})
            continue
        data = path.read_bytes()
        try:
            decode_image(data, max_pixels)
        except ImageError as exc:
            skipped.append({"file": rel, "reason": str(exc)})
            continue
        key = f"images/{len(images):06d}-{_safe_upload_name(rel)}"
        writer.put_bytes(key, data)
        images.append({"id": rel, "key": key, "label": label, "sha256": _sha256(data)})
        digest.update(f"{rel}\0{label}\0{images[-1]['sha256']}\n".encode())
        if progress:
            progress(i + 1, len(files))
    if not images:
        raise DatasetError(f"{root} holds no readable images ({len(skipped)} files skipped)")
    writer.put_json("index.json", {"schema": 1, "classes": subdirs or None, "images": images})
    writer.commit(extra={"manifest_hash": digest.hexdigest(), "n_images": len(images), "skipped": skipped})
    return {"name": name, "n_images": len(images), "skipped": skipped, "manifest_hash": digest.hexdigest()}


def _check_local_root(path: str) -> None:
    """Refuse a local folder outside ``Settings.dataset_roots`` when that is set (a job spec names the folder, and
    the services later serve its images: in a shared deployment, only the folders meant for datasets)."""
    from sae_shared.settings import get_settings

    roots = get_settings().dataset_roots
    if roots is None:
        return
    real = Path(path).resolve()
    if not any(real == Path(r).resolve() or Path(r).resolve() in real.parents for r in roots):
        raise DatasetError(f"dataset folder {path!r} is outside the allowed dataset roots (SAEV_DATASET_ROOTS: "
                           f"{', '.join(str(r) for r in roots)}); upload it (`saevctl datasets upload`) or move it")


def open_dataset(spec: str, store=None, split: str = "training") -> Dataset:
    """Resolve a dataset by name: ``bundled-*``, ``imagefolder:<dir>``, ``ade20k:<dir>``, ``stored:<name>``."""
    if spec in _BUNDLED_LOADERS:
        return load_bundled(spec)
    kind, _, arg = spec.partition(":")
    if kind in ("imagefolder", "ade20k") and arg:
        _check_local_root(arg)
    if kind == "imagefolder" and arg:
        return ImageFolder(arg)
    if kind == "ade20k" and arg:
        return ADE20K(arg, split)
    if kind == "stored" and arg:
        if store is None:
            raise DatasetError("a stored dataset needs an object store")
        return StoredDataset(store, arg)
    raise DatasetError(
        f"unknown dataset {spec!r}: use one of {', '.join(BUNDLED)}, imagefolder:<dir>, ade20k:<dir> or stored:<name>"
    )


# ------------------------------------------------------------------------------------------------ augmentation


@dataclass(frozen=True)
class View:
    """How one view was drawn from its source image, enough to redraw it exactly."""

    crop: tuple[int, int, int, int]
    """Crop box in source pixels: (left, top, right, bottom)."""
    flip: bool
    """Mirrored left-right after cropping."""

    def apply(self, image: Image.Image) -> Image.Image:
        out = image.crop(self.crop)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else out

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Augmentation:
    """Seeded random resized crops and flips; view 0 of each image is the whole image when ``keep_original``."""

    seed: int = 0
    """Seed of every view's draw; with (image index, view index) it fixes the view."""
    views_per_image: int = 1
    """Views drawn per source image."""
    scale: tuple[float, float] = (0.35, 1.0)
    """Range of the crop's area as a fraction of the image's."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's aspect ratio (width / height)."""
    flip: bool = True
    """Mirror half of the views."""
    keep_original: bool = True
    """View 0 is the unaugmented image."""

    def __post_init__(self):
        if self.views_per_image < 1:
            raise ValueError("views_per_image must be at least 1")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")

    def view(self, image_index: int, view_index: int, width: int, height: int) -> View:
        if self.keep_original and view_index == 0:
            return View((0, 0, width, height), False)
        rng = np.random.default_rng([self.seed, image_index, view_index])
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return View((left, top, left + w, top + h), bool(self.flip and rng.random() < 0.5))
        side = min(width, height)  # fall back to a centre square
        left, top = (width - side) // 2, (height - side) // 2
        return View((left, top, left + side, top + side), bool(self.flip and rng.random() < 0.5))

    def to_json(self) -> dict:
        return asdict(self)


def iter_views(dataset: Dataset, augmentation: Augmentation) -> Iterator[tuple[int, int, Sample, View, Image.Image]]:
    """Every (image index, view index, sample, view, view image); unreadable images raise :class:`ImageError`."""
    for i in range(len(dataset)):
        image = dataset.load_image(i)
        for v in range(augmentation.views_per_image):
            view = augmentation.view(i, v, *image.size)
            yield i, v, dataset.sample(i), view, view.apply(image)


def dataset_card(dataset: Dataset) -> str:
    """A one-line JSON description (id, size, classes) for logs and job results."""
    return json.dumps({"id": dataset.id, "n_images": len(dataset), "classes": dataset.classes})
