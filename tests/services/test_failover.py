"""A replica that dies under a request: the gateway answers UNAVAILABLE / 503 with a retry hint (no traceback, no
hang), and the service comes back on its own."""

from __future__ import annotations

import base64
import concurrent.futures
import time

import grpc
import numpy as np
import ray

from sae_shared.proto.saev.v1 import activations_pb2 as apb


def _replica_actor(app: str, deployment: str):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if f"{app}#{deployment}" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def test_dead_replica_behind_the_gateway_is_unavailable_and_recovers(running, http, stubs):
    resid = np.zeros((20, 257, 384), dtype=np.float32)  # 20 images through 11 blocks: seconds of work
    body = {"layer": 0, "residual": {"dtype": "DTYPE_FLOAT32", "shape": list(resid.shape),
                                     "data": base64.b64encode(resid.tobytes()).decode()}}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/v1/forward", json=body)
        time.sleep(1.0)  # the request is on the replica now
        ray.kill(_replica_actor("activations", "Activations"), no_restart=False)
        response = pending.result(timeout=60)
    assert response.status_code == 503, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == "UNAVAILABLE" and "Traceback" not in error["message"]
    assert int(response.headers["retry-after"]) >= 1
    deadline = time.monotonic() + 120
    while True:  # the controller starts a new replica, which loads its backbone again
        try:
            stubs.activations.ListBackbones(apb.ListBackbonesRequest(), metadata=running.metadata("activations"),
                                            timeout=30)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "the activations service did not come back"
            time.sleep(1.0)
