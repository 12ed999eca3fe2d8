"""The Features API's reads of a committed feature analysis (``saes/<sae_id>/analysis/``): exemplars and their
tiles, the analysed images and their source pixels, the reverse index, a latent's histogram.

Plain functions over an object store, run by the SAE deployment on a worker thread (they read the store and
render PNGs; the model thread keeps encoding). Library errors leave as typed service errors (:func:`mapped`):
no analysis -> NOT_FOUND naming ``saevctl analyze``; a latent out of range -> INVALID_ARGUMENT; an exemplar or
image the analysis does not hold -> NOT_FOUND; tiles that cannot be drawn (the dataset is gone or changed) ->
FAILED_PRECONDITION.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from sae_shared.proto.saev.v1 import common_pb2 as pb
from sae_shared.proto.saev.v1 import features_pb2 as fpb
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError
from services.sae.catalog import SAE_ID

KINDS = ("patch", "cls")
MAX_LIMIT = 1024
MAX_INLINE = 64
"""Most exemplars per request with their tile PNGs inline (each may be rendered on the spot)."""
DEFAULT_IMAGES, MAX_IMAGES = 100, 1000
DEFAULT_BINS, MAX_BINS = 32, 256
TILE_THREADS = 4


def mapped(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)`` with the analysis library's errors turned into service errors."""
    from sae_shared.analysis import AnalysisError, LatentOutOfRange, NotAnalysed
    from sae_shared.tiles import TileError

    try:
        return fn(*args, **kwargs)
    except ServiceError:
        raise
    except NotAnalysed as exc:
        raise NotFound(str(exc), "sae_id") from None
    except TileError as exc:
        raise FailedPrecondition(f"tiles: {exc}") from None
    except AnalysisError as exc:
        raise FailedPrecondition(f"the stored analysis cannot be read: {exc}") from None
    except LatentOutOfRange as exc:
        raise InvalidArgument(f"latent: {exc}", "latent") from None
    except IndexError as exc:  # a table shorter than the SAE's latents or the analysed images: a damaged file
        raise FailedPrecondition(f"the stored analysis cannot be read: {exc}") from None
    except KeyError as exc:
        raise NotFound(str(exc.args[0]) if exc.args else "not in the analysis") from None


def _reader(store, sae_id: str):
    from sae_shared.analysis import open_analysis

    if not sae_id:
        raise InvalidArgument("sae_id: required", "sae_id")
    if not SAE_ID.match(sae_id):
        raise InvalidArgument(f"sae_id: {sae_id[:80]!r} is not an SAE id (letters, digits and ._:@+-)", "sae_id")
    return open_analysis(store, sae_id)


def _kind(reader, kind: str) -> str:
    kind = kind or "patch"
    if kind not in KINDS:
        raise InvalidArgument(f"kind: {kind[:40]!r} is not 'patch' or 'cls'", "kind")
    if kind not in reader.kinds:
        why = ("the backbone has no CLS token (or it was not recorded)" if kind == "cls"
               else "the recording has no patch tokens")
        raise InvalidArgument(f"kind: this analysis has no {kind!r} exemplars: {why}", "kind")
    return kind


def _latent(reader, latent: int) -> int:
    if not 0 <= int(latent) < reader.d_sae:
        raise InvalidArgument(f"latent: {latent} is out of range [0, d_sae = {reader.d_sae})", "latent")
    return int(latent)


def _layout(reader) -> pb.TokenLayout:
    rows, cols = reader.grid
    return pb.TokenLayout(n_cls=1 if reader.doc.get("has_cls") else 0, grid_height=rows, grid_width=cols,
                          selection=pb.TOKEN_SELECTION_PATCHES)


def latent_exemplars(store, request: fpb.GetLatentExemplarsRequest) -> fpb.GetLatentExemplarsResponse:
    """Features.GetLatentExemplars: the latent's exemplars with tile keys (default) or tile bytes."""
    from sae_shared.codec import tensor_to_proto
    from sae_shared.tiles import get_tile, tile_object

    reader = _reader(store, request.sae_id)
    kind = _kind(reader, request.kind)
    latent = _latent(reader, request.latent)
    if not 0 <= request.limit <= MAX_LIMIT:
        raise InvalidArgument(f"limit: must be in [0, {MAX_LIMIT}] (0: every exemplar kept)", "limit")
    if request.include_images and not 0 < request.limit <= MAX_INLINE:
        raise InvalidArgument(f"limit: with include_images, give a limit in [1, {MAX_INLINE}] (or fetch the tile "
                              "keys without include_images)", "limit")
    exemplars = reader.exemplars(latent, kind, limit=request.limit or None, heatmaps=request.include_heatmaps)
    out = fpb.GetLatentExemplarsResponse(latent=latent, layout=_layout(reader), kind=kind, scale=reader.scale(latent),
                                         analysis_id=reader.analysis_id)
    tiles: list[Any] = [None] * len(exemplars)
    if exemplars:
        tile = get_tile if request.include_images else tile_object
        with ThreadPoolExecutor(min(TILE_THREADS, len(exemplars)), thread_name_prefix="tiles") as pool:
            futures = [pool.submit(mapped, tile, store, request.sae_id, latent, e.rank, kind) for e in exemplars]
            try:
                tiles = [f.result() for f in futures]
            except FailedPrecondition as exc:  # the exemplars stand without their pictures
                out.tiles_unavailable = exc.message
                tiles = [None] * len(exemplars)
    for e, tile in zip(exemplars, tiles):
        item = out.exemplars.add(image_id=e.image_id, max_activation=e.value, rank=e.rank, image_index=e.image_index,
                                 augmentation_json=json.dumps(e.view.to_json()) if e.view is not None else "")
        if e.label is not None:
            item.label = int(e.label)
        if tile is not None:
            item.image.CopyFrom(pb.Image(encoded=tile) if request.include_images else pb.Image(object_key=tile))
            item.image.id = e.image_id
        if e.heatmap is not None:
            import numpy as np

            item.heatmap.CopyFrom(tensor_to_proto(np.ascontiguousarray(e.heatmap, dtype=np.float32),
                                                  field="heatmap"))
    return out


def tile_png(store, sae_id: str, latent: int, rank: int, kind: str) -> bytes:
    """One exemplar's tile (PNG bytes), rendered and cached on first use."""
    from sae_shared.tiles import get_tile

    reader = _reader(store, sae_id)
    kind = _kind(reader, kind)
    latent = _latent(reader, latent)
    return get_tile(store, sae_id, latent, int(rank), kind)


def latent_histogram(store, request: fpb.GetLatentHistogramRequest, sae_stats=None) -> fpb.GetLatentHistogramResponse:
    """Features.GetLatentHistogram (see ``AnalysisReader.latent_histogram``); the frequency comes from the
    analysis when it counted tokens, else from the SAE's own statistics (``sae_stats``)."""
    reader = _reader(store, request.sae_id)
    latent = _latent(reader, request.latent)
    if not 0 <= request.bins <= MAX_BINS:
        raise InvalidArgument(f"bins: must be in [0, {MAX_BINS}] (0: {DEFAULT_BINS})", "bins")
    h = reader.latent_histogram(latent, request.bins or DEFAULT_BINS)
    if h["frequency"] is None:
        h["frequency"] = float(sae_stats.frequency[latent]) if sae_stats is not None else float("nan")  # unknown
    return fpb.GetLatentHistogramResponse(**h)


def _analysed_image(images: dict[str, list], pos: int) -> fpb.AnalysedImage:
    item = fpb.AnalysedImage(image_index=int(images["image_index"][pos]), image_id=str(images["image_id"][pos]))
    label = images["label"][pos]
    if label is not None:
        item.label = int(label)
    return item


def list_images(store, request: fpb.ListAnalysedImagesRequest) -> fpb.ListAnalysedImagesResponse:
    """Features.ListAnalysedImages: a page of the analysed images, in recording order."""
    reader = _reader(store, request.sae_id)
    if request.offset < 0:
        raise InvalidArgument("offset: must be >= 0", "offset")
    if not 0 <= request.limit <= MAX_IMAGES:
        raise InvalidArgument(f"limit: must be in [0, {MAX_IMAGES}] (0: {DEFAULT_IMAGES})", "limit")
    images = reader.images()
    total = len(images["image_index"])
    stop = min(total, request.offset + (request.limit or DEFAULT_IMAGES))
    return fpb.ListAnalysedImagesResponse(
        total=total, images=[_analysed_image(images, p) for p in range(request.offset, stop)])


def image_latents(store, request: fpb.GetAnalysedImageLatentsRequest) -> fpb.GetAnalysedImageLatentsResponse:
    """Features.GetAnalysedImageLatents: the reverse index of one analysed image."""
    reader = _reader(store, request.sae_id)
    if request.k < 0:
        raise InvalidArgument("k: must be >= 0 (0: every latent the analysis kept)", "k")
    pos = reader.image_position(image_index=int(request.image_index))
    latents = reader.image_latents(position=pos)
    if request.k:
        latents = latents[:request.k]
    return fpb.GetAnalysedImageLatentsResponse(
        image=_analysed_image(reader.images(), pos),
        latents=[fpb.ImageLatent(latent=i, value=v) for i, v in latents])


def source_image(store, sae_id: str, image_index: int) -> bytes:
    """The source image of an analysed image as PNG."""
    from sae_shared.tiles import source_image_png

    _reader(store, sae_id)
    return source_image_png(store, sae_id, int(image_index))
