"""``saev.v1.Features``: a latent's statistics (from the SAE service), listings, and the latents of an image.

Exemplars (top-activating images with heatmaps) come with the feature-analysis issue; until then
GetLatentExemplars answers UNIMPLEMENTED.
"""

from __future__ import annotations

import numpy as np

from sae_shared.proto.saev.v1 import activations_pb2 as apb
from sae_shared.proto.saev.v1 import features_pb2 as fpb
from services.common.errors import InvalidArgument, Unimplemented
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


async def get_latent_exemplars(down: Downstream, request: fpb.GetLatentExemplarsRequest):
    raise Unimplemented("latent exemplars are not served yet: they come with feature analysis (analyze jobs); "
                        "use GetLatent for the statistics")


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
