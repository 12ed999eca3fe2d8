"""Tiles: PNG images of an exemplar view with a latent's patch heatmap overlaid.

A tile shows what the backbone saw: the exemplar's view is redrawn from its dataset (:meth:`View.apply` on the
source image), put through the backbone's own image transform recorded with the shard set (resize / crop / pad, as
``sae_shared.backbones.transforms.ImageTransform`` does; its normalisation is undone), and the latent's activation
on every patch is painted over that patch's pixels. The colour scale is fixed per latent: 0 is transparent and the
latent's largest activation over all its exemplars (``scale`` in ``latents.safetensors``) is the brightest colour,
so the tiles of one latent compare.

Two ways tiles come to exist:

- the ``analyze`` job renders them for the latents worth looking at (:func:`select_latents`: alive, log10 frequency
  in (-6, -2), log10 mean value in (-1, 1), at most ``max_tiles``, in latent order) into one pack per kind,
  ``tiles-patch.pack`` (the PNGs one after another) indexed by ``tiles.json`` (latent -> [offset, length] per rank),
  inside the analysis artifact: one object to publish instead of thousands, and a tile is one ranged GET;
- :func:`get_tile` (the gateway's entry point) serves any (latent, rank, kind): from the pack when it is there, else
  from the cache ``saes/<sae_id>/analysis-cache/<analysis_id>/tiles/<kind>/<latent>/<rank>.png``, else it renders the
  tile, caches it, and returns it.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from sae_shared.analysis import AnalysisError, Exemplar, LatentOutOfRange, cache_prefix, open_analysis

TILES_JSON = "tiles.json"
PACK_FILES = {"patch": "tiles-patch.pack", "cls": "tiles-cls.pack"}
LOG10_FREQUENCY = (-6.0, -2.0)
LOG10_VALUE = (-1.0, 1.0)
SELECTION_DOC = {"alive": True, "log10_frequency": list(LOG10_FREQUENCY), "log10_mean_value": list(LOG10_VALUE),
                 "order": "latent index"}
ALPHA = 0.7
"""Opacity of the heatmap colour at the latent's maximum (it fades to transparent at 0)."""
PIXELS_PER_PATCH = 16
"""Tile resolution per patch when the shard set records no transform."""

# Anchors of the colour ramp (an "inferno"-like scale: dark purple -> red -> yellow), interpolated to 256 entries.
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                 for c in range(3)], axis=1).astype(np.float32)


class TileError(AnalysisError):
    """A tile cannot be rendered: no dataset to redraw the view from, or the dataset does not match the recording."""


# ------------------------------------------------------------------------------------------------ selection


def select_latents(sae_stats: Any, analysis_stats: dict | None = None, *, max_latents: int = 256,
                   log10_frequency: tuple[float, float] = LOG10_FREQUENCY,
                   log10_value: tuple[float, float] = LOG10_VALUE) -> list[int]:
    """Latents worth looking at: alive, ``log10(frequency)`` and ``log10(mean value when firing)`` strictly inside
    the bounds, at most ``max_latents``, in latent order (for a Matryoshka SAE the coarse latents come first; for
    any other, latent order is an unbiased sample).

    The SAE's own statistics (``sae.stats``: frequency, mean_when_firing) are used when it has them, else the
    analysis's (frequency, mean_value over the analysed patch tokens).
    """
    import torch

    if sae_stats is not None:
        freq, mean = sae_stats.frequency, sae_stats.mean_when_firing
    elif analysis_stats is not None:
        freq, mean = analysis_stats["frequency"], analysis_stats["mean_value"]
    else:
        raise AnalysisError("no statistics to select latents with")
    freq, mean = freq.double(), mean.double()
    alive = freq > 0
    lf = torch.log10(freq.clamp(min=1e-300))
    lv = torch.log10(mean.clamp(min=1e-300))
    keep = alive & (lf > log10_frequency[0]) & (lf < log10_frequency[1]) & (lv > log10_value[0]) & (lv < log10_value[1])
    return keep.nonzero().squeeze(1)[:max(0, max_latents)].tolist()


# ------------------------------------------------------------------------------------------------ rendering


def model_input_pixels(image, view, transform: dict | None, grid: tuple[int, int]) -> np.ndarray:
    """The view as the backbone saw it, ``uint8 [H, W, 3]``: the view drawn from the source image, then the
    backbone's transform (its normalisation undone). Without a recorded transform, the view is stretched to
    ``PIXELS_PER_PATCH`` pixels per patch."""
    img = image if view is None else view.apply(image)
    img = img if img.mode == "RGB" else img.convert("RGB")
    if not transform:
        from PIL import Image

        size = (grid[1] * PIXELS_PER_PATCH, grid[0] * PIXELS_PER_PATCH)
        return np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
    from sae_shared.backbones.transforms import ImageTransform

    t = ImageTransform.from_dict(transform)
    x = t(img)  # normalised float32 [3, H, W]
    mean = np.asarray(t.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(t.std, dtype=np.float32)[:, None, None]
    pixels = (x.numpy() * std + mean).clip(0.0, 1.0) * 255.0
    return np.ascontiguousarray(pixels.round().astype(np.uint8).transpose(1, 2, 0))


def overlay(pixels: np.ndarray, heatmap: np.ndarray, vmax: float, *, alpha: float = ALPHA) -> np.ndarray:
    """Paint ``heatmap [rows, cols]`` (patch activations) over ``pixels [H, W, 3]``: every pixel takes its
    patch's value (patch ``(r, c)`` covers rows ``[r H / rows, (r + 1) H / rows)`` and likewise for columns),
    coloured on a fixed scale ``[0, vmax]`` and blended with opacity ``alpha * value / vmax``."""
    h, w = pixels.shape[:2]
    rows, cols = heatmap.shape
    level = np.clip(np.asarray(heatmap, dtype=np.float32) / (vmax if vmax > 0 else 1.0), 0.0, 1.0)
    ys = (np.arange(h) * rows) // h
    xs = (np.arange(w) * cols) // w
    level_hw = level[ys][:, xs]
    colour = _LUT[np.rint(level_hw * 255).astype(np.int64)]
    a = (alpha * level_hw)[..., None]
    out = pixels.astype(np.float32) * (1.0 - a) + colour * a
    return out.round().clip(0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def render_tile(image, exemplar: Exemplar, transform: dict | None, grid: tuple[int, int], vmax: float) -> bytes:
    """The PNG tile of one exemplar (``image`` is its source image)."""
    if exemplar.heatmap is None:
        raise TileError(f"exemplar {exemplar.kind}/{exemplar.latent}/{exemplar.rank} carries no heatmap")
    pixels = model_input_pixels(image, exemplar.view, transform, grid)
    return encode_png(overlay(pixels, exemplar.heatmap, vmax))


# ------------------------------------------------------------------------------------------------ datasets


_DATASETS: OrderedDict[tuple[int, str], Any] = OrderedDict()
_DATASETS_LOCK = threading.Lock()


def open_view_dataset(spec: str | None, store, meta: Any = None, *, dataset_hash: str | None = None):
    """The dataset to redraw views from (kept open for later calls). Bundled and stored datasets are checked
    against the recording's dataset hash (cheap for them); every tile checks its image id anyway."""
    from sae_shared.datasets import DatasetError, InMemory, StoredDataset, open_dataset

    if spec is None:
        dataset_id = getattr(meta, "dataset_id", None)
        raise TileError(f"no dataset to redraw the views from (the recording's dataset {dataset_id!r} cannot be "
                        "opened by its id): give a dataset spec, e.g. imagefolder:<dir>")
    key = (id(store), spec)
    with _DATASETS_LOCK:
        if key in _DATASETS:
            _DATASETS.move_to_end(key)
            return _DATASETS[key]
    try:
        ds = open_dataset(spec, store)
    except (DatasetError, ValueError, OSError) as exc:
        raise TileError(f"cannot open dataset {spec!r} to redraw views: {exc}") from exc
    expected = dataset_hash if dataset_hash is not None else getattr(meta, "dataset_hash", None)
    if expected and isinstance(ds, (InMemory, StoredDataset)) and ds.manifest_hash() != expected:
        raise TileError(f"dataset {spec!r} is not the one the activations were recorded from (its manifest hash "
                        "differs)")
    with _DATASETS_LOCK:
        _DATASETS[key] = ds
        while len(_DATASETS) > 4:
            _DATASETS.popitem(last=False)
    return ds


def _source_image(dataset, exemplar: Exemplar):
    if not 0 <= exemplar.image_index < len(dataset):
        raise TileError(f"image index {exemplar.image_index} is outside dataset {dataset.id} ({len(dataset)} images)")
    found = dataset.sample(exemplar.image_index).image_id
    if found != exemplar.image_id:
        raise TileError(f"dataset {dataset.id} does not match the recording: image {exemplar.image_index} is "
                        f"{found!r}, the shard set says {exemplar.image_id!r}")
    return dataset.load_image(exemplar.image_index)


def render_pack(result, dataset, meta, latents: list[int], path: str, *, kind: str = "patch",
                per_latent: int | None = None, check: Callable[[], None] | None = None) -> dict[str, list]:
    """Render the tiles of ``latents`` (their first ``per_latent`` exemplars of ``kind``) from an in-memory
    :class:`~sae_shared.analysis.AnalysisResult` into the pack file ``path``. Returns the index
    ``{str(latent): [[offset, length], ...]}`` (one entry per rank). Tiles are rendered grouped by source image,
    so each image is decoded once."""
    ex = result.exemplars[kind]
    k = ex["rows"].shape[1] if per_latent is None else min(per_latent, ex["rows"].shape[1])
    grid = tuple(result.info["patch_grid"])
    scale = result.stats["scale"]
    tasks = [(int(ex["image_index"][lat, r]), lat, r) for lat in latents for r in range(k) if ex["rows"][lat, r] >= 0]
    tasks.sort()
    index: dict[str, list] = {str(lat): [None] * int(min(k, int((ex["rows"][lat] >= 0).sum()))) for lat in latents}
    cached: tuple[int, Any] | None = None
    offset = 0
    with open(path, "wb") as fh:
        for n, (image_index, lat, r) in enumerate(tasks):
            if check is not None and n % 32 == 0:
                check()
            e = result.exemplar(kind, lat, r)
            if cached is None or cached[0] != image_index:
                cached = (image_index, _source_image(dataset, e))
            png = render_tile(cached[1], e, meta.transform, grid, float(scale[lat]))
            fh.write(png)
            index[str(lat)][r] = [offset, len(png)]
            offset += len(png)
    return index


# ------------------------------------------------------------------------------------------------ on demand


def tile_cache_key(sae_id: str, analysis_id: str, kind: str, latent: int, rank: int) -> str:
    return f"{cache_prefix(sae_id, analysis_id)}/tiles/{kind}/{latent}/{rank}.png"


def get_tile(store, sae_id: str, latent: int, rank: int = 0, kind: str = "patch", *,
             dataset: str | None = None) -> bytes:
    """The PNG tile of exemplar ``rank`` of ``latent`` (by ``kind``: "patch" or "cls") of the analysed SAE.

    From the analysis's pack when it was pre-rendered, else from the cache, else rendered now (the view redrawn
    from ``dataset``, default the spec the analysis recorded) and cached. Raises
    :class:`~sae_shared.analysis.NotAnalysed` (no analysis), ``KeyError`` (no such exemplar), ``IndexError``
    (latent out of range) and :class:`TileError` (no dataset, or not the recorded one).
    """
    from sae_shared.storage import NotFound

    reader = open_analysis(store, sae_id)
    latent, rank = int(latent), int(rank)
    if not 0 <= latent < reader.d_sae:
        raise LatentOutOfRange(f"latent {latent} out of range [0, {reader.d_sae})")
    if not 0 <= rank < reader.top_k:
        raise KeyError(f"rank {rank} out of range: the analysis keeps {reader.top_k} exemplars per latent")
    packed = reader.tiles_index().get("kinds", {}).get(kind)
    if packed is not None:
        entries = packed["latents"].get(str(latent))
        if entries is not None and rank < len(entries) and entries[rank] is not None:
            off, length = entries[rank]
            return store.get_bytes(f"{reader.prefix}/{packed['file']}", off, length)
    key = tile_cache_key(sae_id, reader.analysis_id, kind, latent, rank)
    try:
        return store.get_bytes(key)
    except NotFound:
        pass
    exemplars = reader.exemplars(latent, kind, limit=rank + 1)
    if rank >= len(exemplars):
        raise KeyError(f"latent {latent} has no {kind} exemplar of rank {rank} (it fired on {len(exemplars)} views)")
    e = exemplars[rank]
    ds = open_view_dataset(dataset or reader.doc.get("dataset"), store, None,
                           dataset_hash=reader.doc.get("dataset_hash"))
    if not reader.doc.get("has_patches", True) or e.heatmap is None:
        raise TileError("this analysis has no patch heatmaps (the shard set recorded no patch tokens)")
    png = render_tile(_source_image(ds, e), e, reader.doc.get("transform"), reader.grid, reader.scale(latent))
    store.put_bytes(key, png, content_type="image/png")
    return png


def tile_object(store, sae_id: str, latent: int, rank: int = 0, kind: str = "patch", *,
                dataset: str | None = None) -> str:
    """The object-store key of the tile :func:`get_tile` serves, as one object of its own: the cache key, where the
    tile is put (copied from the pack, or rendered) unless it is there already. For callers that pass keys, not
    bytes."""
    reader = open_analysis(store, sae_id)
    key = tile_cache_key(sae_id, reader.analysis_id, kind, int(latent), int(rank))
    if store.exists(key):
        return key
    png = get_tile(store, sae_id, latent, rank, kind, dataset=dataset)  # renders into the cache when not packed
    if not store.exists(key):  # it came from the pack
        store.put_bytes(key, png, content_type="image/png")
    return key


MAX_SOURCE_SIDE = 2048
"""Longest side of a source image as :func:`source_image_png` serves it (larger ones are scaled down)."""


def source_image_png(store, sae_id: str, image_index: int, *, dataset: str | None = None,
                     max_side: int = MAX_SOURCE_SIDE) -> bytes:
    """The source image of one analysed image (by its dataset index) as PNG, redrawn from the analysis' dataset
    (``dataset`` overrides the spec it recorded), scaled down to ``max_side`` pixels at most. Raises
    :class:`~sae_shared.analysis.NotAnalysed`, ``KeyError`` (not an analysed image) and :class:`TileError` (no
    dataset, or not the recorded one)."""
    from PIL import Image

    reader = open_analysis(store, sae_id)
    pos = reader.image_position(image_index=int(image_index))
    image_id = str(reader.images()["image_id"][pos])
    ds = open_view_dataset(dataset or reader.doc.get("dataset"), store, None,
                           dataset_hash=reader.doc.get("dataset_hash"))
    if not 0 <= int(image_index) < len(ds) or ds.sample(int(image_index)).image_id != image_id:
        raise TileError(f"dataset {ds.id} does not match the analysis: image {image_index} should be {image_id!r}")
    img = ds.load_image(int(image_index))
    img = img if img.mode == "RGB" else img.convert("RGB")
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return encode_png(np.asarray(img, dtype=np.uint8))


__all__ = ["MAX_SOURCE_SIDE", "TileError", "get_tile", "model_input_pixels", "open_view_dataset", "overlay",
           "render_pack", "render_tile", "select_latents", "source_image_png", "tile_cache_key", "tile_object"]
