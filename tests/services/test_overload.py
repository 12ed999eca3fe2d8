"""Admission control and batching: more concurrent requests than a service admits are refused at once with
RESOURCE_EXHAUSTED / 503 + Retry-After (none hangs), and concurrent requests are merged into batches."""

from __future__ import annotations

import base64
import concurrent.futures
import re
import time

import grpc
import httpx

from sae_shared.proto.saev.v1 import activations_pb2 as apb
from sae_shared.proto.saev.v1 import common_pb2 as pb
from tests.services.conftest import ACTIVATIONS_QUEUE

N = 40
"""Per protocol, at the same time: 80 in all, well above what the activations deployment admits in the test stack
(max_ongoing_requests 8, and 8 queued at each caller: Serve's proxy and the gateway)."""


def test_overload_is_refused_at_once_on_both_protocols_and_nothing_hangs(running, stubs):
    # seven blocks per image: batches take long enough for the burst to pile up behind them
    request = apb.GetActivationsRequest(images=[pb.Image(encoded=running.images[2])], layers=[6])
    body = {"images": [{"encoded": base64.b64encode(running.images[2]).decode()}], "layers": [6]}

    def post(_):
        return httpx.post(running.http_url + "/v1/activations", json=body, headers=running.headers, timeout=120)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(N) as pool:
        futures = [stubs.activations.GetActivations.future(request, metadata=running.metadata("activations"),
                                                           timeout=120) for _ in range(N)]
        responses = list(pool.map(post, range(N)))
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append("OK")
        except grpc.RpcError as err:
            codes.append(err.code().name)
            assert "Traceback" not in (err.details() or "")
    statuses = [r.status_code for r in responses]
    assert time.monotonic() - started < 110  # every request answered: none hangs
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert set(statuses) <= {200, 503}, statuses
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and 200 in statuses, statuses
    for r in rejected:  # refused behind the gateway (a nested handle call), mapped with a retry hint
        assert r.json()["error"]["code"] == "RESOURCE_EXHAUSTED" and int(r.headers["retry-after"]) >= 1


def _batches(text: str, name: str, op: str) -> tuple[float, float]:
    """(all batches, batches of one request) of the batch-size histogram with tag op=<op>, over replicas."""
    count = singles = 0.0
    for line in text.splitlines():
        if f'op="{op}"' not in line:
            continue
        if line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_bucket") and 'le="1.0"' in line:
            singles += float(line.rsplit(" ", 1)[1])
    return count, singles


def test_concurrent_requests_are_batched(running, stubs):
    request = apb.ForwardFromRequest(layer=10, residual=pb.Tensor(
        dtype=pb.DTYPE_FLOAT32, shape=[1, 257, 384], data=b"\x00" * (257 * 384 * 4)))
    # no more than the queue admits (ACTIVATIONS_QUEUE), even if the router still counts the overload test's burst
    futures = [stubs.activations.ForwardFrom.future(request, metadata=running.metadata("activations"), timeout=120)
               for _ in range(ACTIVATIONS_QUEUE)]
    for f in futures:
        f.result()
    deadline = time.monotonic() + 45
    forward_ok = re.compile(r'ray_saev_requests_total\{[^}]*code="OK"[^}]*method="ForwardFrom"[^}]*\} (\d+)')
    while True:
        text = httpx.get(running.local.metrics_url, timeout=10).text
        count, singles = _batches(text, "ray_saev_batch_size", "backbone")
        counted = sum(float(m) for m in forward_ok.findall(text))
        if count > singles and counted >= ACTIVATIONS_QUEUE:  # some batch merged more than one request
            break
        assert time.monotonic() < deadline, f"batches {count}, of one request {singles}; ForwardFrom OK {counted}"
        time.sleep(1.0)
    assert "ray_serve_grpc_request_latency_ms" in text  # Ray Serve's own series beside ours
