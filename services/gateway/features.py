"""``saev.v1.Features``: a latent's statistics (from the SAE service), listings, and the latents of an image; and,
from a committed feature analysis (``saevctl analyze``), a latent's exemplars and their tiles, its histogram, the
analysed images, their pixels and their strongest latents.

The analysis reads run in the SAE deployment (``services.sae.analysis_reads``: it has the store and torch; the
gateway has neither); here requests are checked and forwarded.
"""

from __future__ import annotations

import numpy as np

from sae_shared.proto.saev.v1 import activations_pb2 as apb
from sae_shared.proto.saev.v1 import features_pb2 as fpb
from services.common.errors import InvalidArgument
from services.gateway.downstream import Downstream

DEFAULT_PAGE, MAX_PAGE = 100, 1000
ORDERS = {fpb.LATENT_ORDER_UNSPECIFIED: "index", fpb.LATENT_ORDER_INDEX: "index",
          fpb.LATENT_ORDER_FREQUENCY: "frequency", fpb.LATENT_ORDER_MAX_ACTIVATION: "max"}


def _check_sae(sae_id: str) -> None:
    if not sae_id:
        raise InvalidArgument("sae_id: required", "sae_id")


async def get_latent(down: Downstream, request: fpb.GetLatentRequest) -> fpb.GetLatentResponse:
    _check_sae(request.sae_id)
    stats = await down.call("sae", "latent_stats", request.sae_id, [int(request.latent)])
    return fpb.GetLatentResponse(stats=fpb.LatentStats(**stats[0]))


async def list_latents(down: Downstream, request: fpb.ListLatentsRequest) -> fpb.ListLatentsResponse:
    _check_sae(request.sae_id)
    order = ORDERS.get(request.order_by)
    if order is None:
        raise InvalidArgument("order_by: choose INDEX, FREQUENCY or MAX_ACTIVATION", "order_by")
    if request.page_size < 0:
        raise InvalidArgument("page_size: must be >= 0", "page_size")
    try:
        offset = int(request.page_token or 0)
    except ValueError:
        offset = -1
    if offset < 0:
        raise InvalidArgument("page_token: pass the next_page_token of the previous page", "page_token")
    table = await down.call("sae", "all_latent_stats", request.sae_id)
    freq, max_act, mean = (np.asarray(table[k], dtype=np.float64) for k in ("frequency", "max", "mean"))
    keep = np.ones(freq.shape[0], dtype=bool)
    if not request.include_dead:
        keep &= freq > 0
    if request.HasField("min_frequency"):
        keep &= freq >= request.min_frequency
    if request.HasField("max_frequency"):
        keep &= freq <= request.max_frequency
    idx = np.flatnonzero(keep)
    if order == "index":
        idx = idx[::-1] if request.descending else idx
    else:  # by the key, ties by latent index (ascending either way)
        key = (freq if order == "frequency" else max_act)[idx]
        idx = idx[np.lexsort((idx, -key if request.descending else key))]
    size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
    page = idx[offset:offset + size]
    out = fpb.ListLatentsResponse(total=int(idx.size))
    for i in page.tolist():
        f = float(freq[i])
        out.latents.add(latent=i, frequency=f, max_activation=float(max_act[i]), mean_activation=float(mean[i]),
                        dead=f == 0.0, dense=f > 1e-2)
    if offset + size < idx.size:
        out.next_page_token = str(offset + size)
    return out


KINDS = ("", "patch", "cls")
TILE_TIMEOUT_S = 60.0
"""Exemplars and tiles may render PNGs on first use (then they are cached): a longer deadline than model calls."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidArgument(f"kind: {kind[:40]!r} is not 'patch' or 'cls'", "kind")


def _check_latent(latent: int) -> None:
    if latent < 0:
        raise InvalidArgument(f"latent: {latent} is negative; latents are in [0, d_sae)", "latent")


async def get_latent_exemplars(down: Downstream, request: fpb.GetLatentExemplarsRequest):
    _check_sae(request.sae_id)
    _check_kind(request.kind)
    _check_latent(request.latent)
    if request.limit < 0:
        raise InvalidArgument("limit: must be >= 0 (0: every exemplar kept)", "limit")
    return await down.call("sae", "latent_exemplars", request, timeout_s=max(down.timeout_s, TILE_TIMEOUT_S))


async def get_tile(down: Downstream, sae_id: str, latent: int, rank: int, kind: str) -> bytes:
    """PNG bytes of exemplar ``rank`` of ``latent``."""
    _check_sae(sae_id)
    _check_kind(kind)
    _check_latent(latent)
    if rank < 0:
        raise InvalidArgument("rank: must be >= 0", "rank")
    return await down.call("sae", "tile", sae_id, latent, rank, kind or "patch",
                           timeout_s=max(down.timeout_s, TILE_TIMEOUT_S))


async def get_latent_histogram(down: Downstream, request: fpb.GetLatentHistogramRequest):
    _check_sae(request.sae_id)
    _check_latent(request.latent)
    return await down.call("sae", "latent_histogram", request)


async def list_analysed_images(down: Downstream, request: fpb.ListAnalysedImagesRequest):
    _check_sae(request.sae_id)
    return await down.call("sae", "analysed_images", request)


async def get_analysed_image_latents(down: Downstream, request: fpb.GetAnalysedImageLatentsRequest):
    _check_sae(request.sae_id)
    return await down.call("sae", "analysed_image_latents", request)


async def get_source_image(down: Downstream, sae_id: str, image_index: int) -> bytes:
    """PNG bytes of an analysed image."""
    _check_sae(sae_id)
    return await down.call("sae", "source_image", sae_id, image_index, timeout_s=max(down.timeout_s, TILE_TIMEOUT_S))


async def get_image_latents(down: Downstream, request: fpb.GetImageLatentsRequest) -> fpb.GetImageLatentsResponse:
    _check_sae(request.sae_id)
    if request.k < 0:
        raise InvalidArgument("k: must be >= 0", "k")
    if not request.HasField("image"):
        raise InvalidArgument("image: required", "image")
    sae = await down.cached("sae", "describe", request.sae_id)
    acts = await down.call("activations", "GetActivations", apb.GetActivationsRequest(
        backbone_id=sae["backbone_id"], images=[request.image], layers=[sae["layer"]], tokens=1))
    patches = request.patches if request.HasField("patches") else None
    return await down.call("sae", "image_latents", request.sae_id, acts.layers[0].activations, acts.layout,
                           request.k, patches, request.include_heatmaps)
