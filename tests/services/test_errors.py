"""Bad input gets a typed error with a message, never a 5xx or a traceback, and the services stay up.

A table of malformed requests for every RPC (gRPC) and route (HTTP), hypothesis-generated malformed tensors and
messages, and a schemathesis run against /openapi.json that must find no server error.
"""

from __future__ import annotations

import base64

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sae_shared.codec import tensor_to_proto
from sae_shared.proto.saev.v1 import activations_pb2 as apb
from sae_shared.proto.saev.v1 import common_pb2 as pb
from sae_shared.proto.saev.v1 import features_pb2 as fpb
from sae_shared.proto.saev.v1 import interventions_pb2 as ipb
from sae_shared.proto.saev.v1 import jobs_pb2 as jpb
from sae_shared.proto.saev.v1 import sae_pb2 as spb
from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb
from tests.services.conftest import MAX_REQUEST_BYTES

INVALID, NOT_FOUND, TOO_LARGE = "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"
TYPED = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "UNIMPLEMENTED"}
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def _img(**kw) -> pb.Image:
    return pb.Image(**kw)


def _f32(shape, fill=0.0) -> pb.Tensor:
    return tensor_to_proto(np.full(shape, fill, dtype=np.float32))


GOOD_ACTS = lambda: _f32((1, 257, 384))  # noqa: E731
LAYOUT = pb.TokenLayout(n_cls=1, grid_height=16, grid_width=16, patch_size=14, selection=pb.TOKEN_SELECTION_ALL)

# (service stub, method, request factory (sae_id) -> message, expected code, a word the message must contain)
CASES = [
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(), INVALID, "image"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(encoded=b"not an image")]),
     INVALID, "decode"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img()]), INVALID, "encoded"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(encoded=PNG_1PX)],
                                                                          layers=[12]), INVALID, "layer"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(encoded=PNG_1PX)],
                                                                          layers=[1, 1]), INVALID, "duplicates"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(encoded=PNG_1PX)],
                                                                          backbone_id="nope:1"), NOT_FOUND, "nope"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(encoded=PNG_1PX)] * 65),
     TOO_LARGE, "limit"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(encoded=PNG_1PX)],
                                                                          dtype=pb.DTYPE_INT8), INVALID, "dtype"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(encoded=PNG_1PX)],
                                                                          tokens=pb.TOKEN_SELECTION_CLS + 40),
     INVALID, "token selection"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(pixels=_f32((3, 4, 4), np.nan))]),
     INVALID, "NaN"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(pixels=_f32((4, 4)))]),
     INVALID, "pixels"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(
        images=[_img(pixels=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[4, 4, 3], data=b"\x00" * 5))]), INVALID, "bytes"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(object_key="no/such.png")]),
     NOT_FOUND, "no/such.png"),
    ("activations", "GetActivations", lambda s: apb.GetActivationsRequest(images=[_img(object_key="../etc/passwd")]),
     INVALID, "object_key"),
    ("activations", "ForwardFrom", lambda s: apb.ForwardFromRequest(layer=3), INVALID, "residual"),
    ("activations", "ForwardFrom", lambda s: apb.ForwardFromRequest(layer=3, residual=_f32((1, 10, 384))), INVALID,
     "shape"),
    ("activations", "ForwardFrom", lambda s: apb.ForwardFromRequest(layer=-1, residual=GOOD_ACTS()), INVALID, "layer"),
    ("activations", "ForwardFrom", lambda s: apb.ForwardFromRequest(layer=3, residual=_f32((1, 257, 384), np.inf)),
     INVALID, "NaN"),
    ("activations", "ForwardFrom", lambda s: apb.ForwardFromRequest(
        layer=3, residual=pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"1234")), INVALID, "dtype"),
    ("sae", "Encode", lambda s: spb.EncodeRequest(sae_id="missing-sae", activations=GOOD_ACTS()), NOT_FOUND,
     "missing-sae"),
    ("sae", "Encode", lambda s: spb.EncodeRequest(sae_id="../../etc", activations=GOOD_ACTS()), INVALID, "sae_id"),
    ("sae", "Encode", lambda s: spb.EncodeRequest(sae_id=s), INVALID, "activations"),
    ("sae", "Encode", lambda s: spb.EncodeRequest(sae_id=s, activations=_f32((2, 100))), INVALID, "d_model"),
    ("sae", "Encode", lambda s: spb.EncodeRequest(sae_id=s, activations=_f32((2, 384), np.nan)), INVALID, "NaN"),
    ("sae", "Decode", lambda s: spb.DecodeRequest(sae_id=s), INVALID, "codes"),
    ("sae", "Decode", lambda s: spb.DecodeRequest(sae_id=s, dense=_f32((1, 5))), INVALID, "d_sae"),
    ("sae", "Decode", lambda s: spb.DecodeRequest(sae_id=s, sparse=pb.SparseCodes(
        indptr=tensor_to_proto(np.array([0, 1], dtype=np.int64)), indices=tensor_to_proto(np.array([9999], np.int64)),
        values=_f32((1,)), d_sae=768, n_tokens=1)), INVALID, "out of range"),
    ("sae", "Edit", lambda s: spb.EditRequest(sae_id=s, activations=GOOD_ACTS()), INVALID, "layout"),
    ("sae", "Edit", lambda s: spb.EditRequest(sae_id=s, activations=GOOD_ACTS(), layout=LAYOUT, edits=[
        pb.LatentEdit(latent=768, op=pb.EDIT_OP_SET)]), INVALID, "latent"),
    ("sae", "Edit", lambda s: spb.EditRequest(sae_id=s, activations=GOOD_ACTS(), layout=LAYOUT, edits=[
        pb.LatentEdit(latent=1, op=pb.EDIT_OP_SET, patches=pb.PatchSelection(indices=pb.PatchIndices()))]),
     INVALID, "empty"),
    ("sae", "Edit", lambda s: spb.EditRequest(sae_id=s, activations=GOOD_ACTS(), layout=LAYOUT, edits=[
        pb.LatentEdit(latent=1, op=pb.EDIT_OP_SET, patches=pb.PatchSelection(box=pb.PatchBox(row_end=17, col_end=2)))]),
     INVALID, "box"),
    ("sae", "Edit", lambda s: spb.EditRequest(sae_id=s, activations=GOOD_ACTS(), layout=LAYOUT, edits=[
        pb.LatentEdit(latent=1, op=pb.EDIT_OP_UNSPECIFIED)]), INVALID, "op"),
    ("sae", "Edit", lambda s: spb.EditRequest(sae_id=s, activations=GOOD_ACTS(), layout=LAYOUT, edits=[
        pb.LatentEdit(latent=1, op=pb.EDIT_OP_SET, image_indices=[3])]), INVALID, "image_indices"),
    ("sae", "Edit", lambda s: spb.EditRequest(sae_id=s, activations=GOOD_ACTS(), layout=LAYOUT, edits=[
        pb.LatentEdit(latent=1, op=pb.EDIT_OP_SET, value=float("nan"))]), INVALID, "finite"),
    ("sae", "TopFeatures", lambda s: spb.TopFeaturesRequest(sae_id=s, activations=GOOD_ACTS(), k=100000), INVALID, "k"),
    ("taskhead", "Predict", lambda s: tpb.PredictRequest(head_id="no-head", tokens=GOOD_ACTS()), NOT_FOUND, "no-head"),
    ("taskhead", "Predict", lambda s: tpb.PredictRequest(tokens=_f32((1, 257, 100))), INVALID, "width"),
    ("taskhead", "Predict", lambda s: tpb.PredictRequest(), INVALID, "tokens"),
    ("interventions", "Intervene", lambda s: ipb.InterveneRequest(head_id="img-focus:saliency",
                                                                  images=[_img(encoded=PNG_1PX)]), INVALID, "sae_id"),
    ("interventions", "Intervene", lambda s: ipb.InterveneRequest(sae_id="nope", head_id="img-focus:saliency",
                                                                  images=[_img(encoded=PNG_1PX)]), NOT_FOUND, "nope"),
    ("interventions", "Intervene", lambda s: ipb.InterveneRequest(sae_id=s, head_id="no-head",
                                                                  images=[_img(encoded=PNG_1PX)]), NOT_FOUND, "no-head"),
    ("interventions", "Intervene", lambda s: ipb.InterveneRequest(sae_id=s, head_id="img-focus:saliency"), INVALID,
     "image"),
    ("interventions", "PreviewIntervention", lambda s: ipb.PreviewInterventionRequest(
        sae_id=s, images=[_img(encoded=PNG_1PX)]), INVALID, "edit"),
    ("jobs", "GetJob", lambda s: jpb.GetJobRequest(job_id="no-such-job"), NOT_FOUND, "no-such-job"),
    ("jobs", "SubmitJob", lambda s: jpb.SubmitJobRequest(type=jpb.JOB_TYPE_TRAIN, spec_json='{"stpes": 3}'), INVALID,
     "stpes"),
    ("jobs", "SubmitJob", lambda s: jpb.SubmitJobRequest(spec_json="{}"), INVALID, "type"),
    ("jobs", "SubmitJob", lambda s: jpb.SubmitJobRequest(type=jpb.JOB_TYPE_RECORD, spec_json="{not json"), INVALID,
     "JSON"),
    ("jobs", "ListJobs", lambda s: jpb.ListJobsRequest(page_token="garbage"), INVALID, "page_token"),
    ("features", "GetLatent", lambda s: fpb.GetLatentRequest(sae_id=s, latent=768), INVALID, "latent"),
    ("features", "GetLatentExemplars", lambda s: fpb.GetLatentExemplarsRequest(sae_id="never-analysed"), NOT_FOUND,
     "saevctl analyze"),
]
APPS = {"activations": "activations", "sae": "sae", "taskhead": "taskhead", "interventions": "gateway",
        "jobs": "gateway", "features": "gateway"}


def _call(running, stubs, service, method, request):
    return getattr(getattr(stubs, service), method)(request, metadata=running.metadata(APPS[service]), timeout=60)


def _assert_clean(err: grpc.RpcError):
    details = err.details() or ""
    assert "Traceback" not in details and 'File "' not in details and "ray::" not in details, details


@pytest.mark.parametrize("service,method,make,code,word", CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_bad_grpc_input_gets_a_typed_error(running, stubs, sae, service, method, make, code, word):
    with pytest.raises(grpc.RpcError) as err:
        _call(running, stubs, service, method, make(running.sae_id))
    assert err.value.code().name == code, err.value.details()
    assert word.lower() in (err.value.details() or "").lower()
    _assert_clean(err.value)


def test_oversize_grpc_message_is_resource_exhausted(running, stubs):
    from sae_shared.proto.saev.v1 import activations_pb2_grpc

    big = pb.Image(encoded=b"\x00" * (MAX_REQUEST_BYTES + (2 << 20)))
    with grpc.insecure_channel(running.grpc_address, options=[("grpc.max_send_message_length", -1)]) as unlimited:
        with pytest.raises(grpc.RpcError) as err:
            activations_pb2_grpc.ActivationsStub(unlimited).GetActivations(
                apb.GetActivationsRequest(images=[big]), metadata=running.metadata("activations"), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in err.value.details()  # the proxy's limit, from Settings
    half = pb.Image(encoded=b"\x00" * (MAX_REQUEST_BYTES // 2 + (100 << 10)))  # two: over the payload limit only
    with pytest.raises(grpc.RpcError) as err:
        stubs.activations.GetActivations(apb.GetActivationsRequest(images=[half, half]),
                                         metadata=running.metadata("activations"), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "bytes of image data" in err.value.details()  # refused by the service, naming what to change


def test_services_still_answer_after_the_bad_inputs(running, stubs):
    reply = stubs.activations.GetActivations(apb.GetActivationsRequest(images=[_img(encoded=running.images[0])]),
                                             metadata=running.metadata("activations"), timeout=60)
    assert reply.layers[0].activations.shape == [1, 257, 384]
    assert stubs.sae.ListSAEs(spb.ListSAEsRequest(), metadata=running.metadata("sae")).saes


# -- hypothesis: malformed tensors and messages ------------------------------------------------------------------

dtypes = st.sampled_from([pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16,
                          pb.DTYPE_INT64, pb.DTYPE_BOOL, 99])
tensors = st.builds(lambda d, shape, data: pb.Tensor(dtype=d, shape=shape, data=data), dtypes,
                    st.lists(st.integers(-3, 300), max_size=4), st.binary(max_size=2048))


@settings(max_examples=40, suppress_health_check=list(HealthCheck), deadline=None)
@given(data=st.data())
def test_hypothesis_malformed_messages_get_typed_errors(running, stubs, data):
    sae_id = running.sae_id
    kind = data.draw(st.sampled_from(["pixels", "encoded", "residual", "encode", "decode", "edit", "predict"]))
    t = data.draw(tensors)
    requests = {
        "pixels": ("activations", "GetActivations", apb.GetActivationsRequest(images=[_img(pixels=t)])),
        "encoded": ("activations", "GetActivations", apb.GetActivationsRequest(
            images=[_img(encoded=data.draw(st.binary(min_size=1, max_size=512)))])),
        "residual": ("activations", "ForwardFrom", apb.ForwardFromRequest(
            layer=data.draw(st.integers(-2, 14)), residual=t)),
        "encode": ("sae", "Encode", spb.EncodeRequest(sae_id=sae_id, activations=t)),
        "decode": ("sae", "Decode", spb.DecodeRequest(sae_id=sae_id, sparse=pb.SparseCodes(
            indptr=data.draw(tensors), indices=t, values=data.draw(tensors), d_sae=data.draw(st.integers(-1, 800)),
            n_tokens=data.draw(st.integers(-1, 5))))),
        "edit": ("sae", "Edit", spb.EditRequest(sae_id=sae_id, activations=t, layout=LAYOUT, edits=[pb.LatentEdit(
            latent=data.draw(st.integers(-5, 800)), op=data.draw(st.integers(0, 5)))])),
        "predict": ("taskhead", "Predict", tpb.PredictRequest(tokens=t, top_k=data.draw(st.integers(-2, 3)))),
    }
    service, method, request = requests[kind]
    try:
        _call(running, stubs, service, method, request)
    except grpc.RpcError as err:
        assert err.code().name in TYPED, (kind, err.code(), err.details())
        _assert_clean(err)


# -- HTTP ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,body,status", [
    ("post", "/v1/activations", b"{not json", 400),
    ("post", "/v1/activations", b"[1, 2]", 400),
    ("post", "/v1/activations", b'{"images": [{"encoded": "@@@"}]}', 400),
    ("post", "/v1/activations", b'{"imagez": []}', 400),
    ("post", "/v1/activations", b'{"layers": ["x"]}', 400),
    ("post", "/v1/activations", b'{"images": [{"encoded": "aGVsbG8="}]}', 400),
    ("post", "/v1/saes/encode", b'{"sae_id": "missing", "activations": {"dtype": "DTYPE_FLOAT32", "shape": [1, 384],'
                                b' "data": ""}}', 404),
    ("post", "/v1/heads/predict", b'{"head_id": "nope"}', 404),
    ("post", "/v1/interventions", b'{"sae_id": "", "images": []}', 400),
    ("get", "/v1/saes?layer=-1", None, 400),
    ("get", "/v1/saes/x/latents/-4", None, 400),
    ("get", "/v1/jobs?state=exploded", None, 400),
    ("get", "/v1/nothing-here", None, 404),
    ("delete", "/v1/jobs", None, 405),
])
def test_bad_http_input_gets_a_4xx_json_error(running, http, method, path, body, status):
    response = http.request(method.upper(), path, content=body,
                            headers={"content-type": "application/json"} if body is not None else {})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] and error["message"] and "Traceback" not in error["message"]


def test_oversize_http_body_is_413(running, http):
    response = http.post("/v1/activations", content=b"x" * (MAX_REQUEST_BYTES * 4 // 3 + (2 << 20)),
                         headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
