"""The intervention of DESIGN.md §1, composed from the three model services (no torch here).

    x       = Activations.GetActivations(images, [L], ALL)    # L, backbone: from the SAE's contract
    x'      = SAE.Edit(x, edits)                               # x + (decode(f') - decode(f)), error term kept
    [y; y'] = TaskHead.Predict(Activations.ForwardFrom([x; x'], L))

SAE.Edit also returns each image's off-target drift (the edited tokens re-encoded, compared with f').

Four calls in sequence; x and x' travel stacked (as raw bytes: tensors are never decoded here). When the edits
change no code, ``x'`` is ``x`` bit for bit and ``y'`` is ``y``, computed once from x alone: the prediction after
an empty edit is exactly the unedited model's.
"""

from __future__ import annotations

import asyncio

import numpy as np

from sae_shared.proto.saev.v1 import activations_pb2 as apb
from sae_shared.proto.saev.v1 import common_pb2 as pb
from sae_shared.proto.saev.v1 import interventions_pb2 as ipb
from sae_shared.proto.saev.v1 import sae_pb2 as spb
from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb
from services.common.errors import InvalidArgument
from services.common.limits import Limits
from services.common.protos import concat_rows, split_rows, to_numpy
from services.gateway.downstream import Downstream


async def _contracts(down: Downstream, sae_id: str, head_id: str | None) -> tuple[dict, dict | None]:
    if not sae_id:
        raise InvalidArgument("sae_id: required", "sae_id")
    calls = [down.cached("sae", "describe", sae_id)]
    if head_id is not None:
        if not head_id:
            raise InvalidArgument("head_id: required", "head_id")
        calls.append(down.cached("taskhead", "describe", head_id))
    found = await asyncio.gather(*calls)
    sae, head = found[0], (found[1] if head_id is not None else None)
    if not sae["backbone_id"]:
        raise InvalidArgument(f"sae_id: SAE {sae_id!r} records no backbone contract", "sae_id")
    if head is not None and head["backbone_id"] != sae["backbone_id"]:
        raise InvalidArgument(f"head_id: head {head_id!r} reads backbone {head['backbone_id']!r} but SAE "
                              f"{sae_id!r} was trained on {sae['backbone_id']!r}; pick a matching pair", "head_id")
    return sae, head


async def _activations(down: Downstream, sae: dict, images) -> apb.GetActivationsResponse:
    if not images:
        raise InvalidArgument("images: send at least one image", "images")
    request = apb.GetActivationsRequest(backbone_id=sae["backbone_id"], images=images, layers=[sae["layer"]],
                                        tokens=1)  # TOKEN_SELECTION_ALL
    return await down.call("activations", "GetActivations", request)


async def intervene(down: Downstream, request: ipb.InterveneRequest, limits: Limits) -> ipb.InterveneResponse:
    """Predictions before and after the edits, per image."""
    if request.top_k < 0:
        raise InvalidArgument("top_k: must be >= 0", "top_k")
    sae, _ = await _contracts(down, request.sae_id, request.head_id)
    acts = await _activations(down, sae, request.images)
    x = acts.layers[0].activations
    edited = await down.call("sae", "Edit", spb.EditRequest(sae_id=request.sae_id, activations=x, layout=acts.layout,
                                                             edits=request.edits, return_drift=True))
    x_new = edited.edited_activations
    unchanged = x_new.data == x.data and list(x_new.shape) == list(x.shape)
    layer, backbone = sae["layer"], acts.backbone_id

    async def forward_and_predict(residual):
        final = await down.call("activations", "ForwardFrom",
                                apb.ForwardFromRequest(backbone_id=backbone, layer=layer, residual=residual))
        return await down.call("taskhead", "Predict", tpb.PredictRequest(
            head_id=request.head_id, tokens=final.tokens, layout=final.layout, top_k=request.top_k))

    n = len(request.images)
    if unchanged:
        before = after = await forward_and_predict(x)
    elif 2 * n <= limits.max_batch_images and 2 * len(x.data) <= limits.max_request_bytes:
        # x and x' stacked: one forward over both (the blocks treat images independently, so this equals two
        # separate forwards) and one head call, split back here; two calls fewer than one each way
        before, after = _halves(await forward_and_predict(concat_rows(x, x_new)), n)
    else:  # too large to stack within the limits: one request each way, at the same time
        before, after = await asyncio.gather(forward_and_predict(x), forward_and_predict(x_new))
    return _results(request, acts, x, x_new, before, after, edited.drift)


def _halves(both: tpb.PredictResponse, n: int) -> tuple[tpb.PredictResponse, tpb.PredictResponse]:
    """A prediction over [x; x'] (2n images) -> the predictions of x and of x'."""
    logits, labels = split_rows(both.logits), split_rows(both.labels)
    halves = []
    for part in (slice(0, n), slice(n, 2 * n)):
        out = tpb.PredictResponse(kind=both.kind)
        out.logits.CopyFrom(_stack(logits[part], both.logits))
        out.labels.CopyFrom(_stack(labels[part], both.labels))
        out.top.extend(both.top[part])
        halves.append(out)
    return halves[0], halves[1]


def _stack(rows, like: pb.Tensor) -> pb.Tensor:
    return pb.Tensor(dtype=like.dtype, shape=[len(rows), *like.shape[1:]], data=b"".join(r.data for r in rows))


def _results(request, acts, x, x_new, before: tpb.PredictResponse, after: tpb.PredictResponse, drift=()):
    out = ipb.InterveneResponse(layout=acts.layout)
    n = len(request.images)
    logits_b, logits_a = split_rows(before.logits), split_rows(after.logits)
    labels_b, labels_a = split_rows(before.labels), split_rows(after.labels)
    xs_b = split_rows(x) if request.return_activations else [None] * n
    xs_a = split_rows(x_new) if request.return_activations else [None] * n
    for i in range(n):
        lb, la = to_numpy(labels_b[i]), to_numpy(labels_a[i])
        change = float(np.mean(lb != la)) if lb.size else 0.0
        result = out.results.add(
            image_id=request.images[i].id, change_rate=change,
            before=ipb.Prediction(logits=logits_b[i], labels=labels_b[i]),
            after=ipb.Prediction(logits=logits_a[i], labels=labels_a[i]))
        if i < len(before.top):
            result.before.top.CopyFrom(before.top[i])
        if i < len(after.top):
            result.after.top.CopyFrom(after.top[i])
        if i < len(drift):
            result.drift.CopyFrom(drift[i])
        if request.return_activations:
            result.activations_before.CopyFrom(xs_b[i])
            result.activations_after.CopyFrom(xs_a[i])
    return out


async def preview(down: Downstream, request: ipb.PreviewInterventionRequest) -> ipb.PreviewInterventionResponse:
    """The edited latents' codes on the patch grid before and after, without running the head."""
    if not request.edits:
        raise InvalidArgument("edits: send at least one edit to preview", "edits")
    sae, _ = await _contracts(down, request.sae_id, None)
    acts = await _activations(down, sae, request.images)
    return await down.call("sae", "preview", request.sae_id, acts.layers[0].activations, acts.layout,
                           list(request.edits))
