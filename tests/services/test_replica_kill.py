"""An idle SAE replica killed under clients calling it: Serve replaces it; every call made in the gap ends within
its deadline, either served or with a status the client retries (UNAVAILABLE, RESOURCE_EXHAUSTED, 503, its
deadline, or the INTERNAL without a message that Serve's gRPC proxy answers when the replica it picked is dead:
``sae_shared.client.retryable``), never a raw internal error; a client with a retry policy started in the gap gets
the right answer once the new replica is up.

tests/services/test_failover.py kills a replica *under* a request (the gateway answers 503 with a retry hint);
this test covers the gap after the death, over both transports: gRPC straight to the ``sae`` application through
Serve's proxy, and HTTP through the gateway.
"""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import ray

from sae_shared.client import ClientError, RetryPolicy, connect, retryable
from sae_shared.codec import csr_to_dense

DEADLINE = 1.5
"""Seconds each call may take (the client's deadline per attempt): shorter than Serve takes to start a replica
(a new process that imports torch and loads the SAE), so calls made in the gap reach it."""
SLACK = 3.0
"""What a loaded machine may add to a deadline before the client sees it."""
RETRYABLE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}


def _replica_names() -> list[str]:
    """Named actors of the SAE deployment's replicas (a replacement gets a new name)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "sae#SAE" in a["name"]]


def test_killed_sae_replica_is_replaced_and_calls_in_the_gap_fail_fast_or_retry_to_success(running, sae):
    x = np.random.default_rng(0).standard_normal((4, 384)).astype(np.float32)
    probes = {
        name: connect(url, api_key=running.api_key, timeout=DEADLINE, retry=RetryPolicy(attempts=1),
                      settings=running.settings)
        for name, url in (("grpc", f"grpc://{running.grpc_address}"), ("http", running.http_url))
    }
    patient = connect(f"grpc://{running.grpc_address}", api_key=running.api_key, timeout=DEADLINE,
                      retry=RetryPolicy(attempts=60, initial_backoff_s=0.5, max_backoff_s=2.0),
                      settings=running.settings)
    attempts = []
    one_attempt = patient.transport.call
    patient.transport.call = lambda *args: (attempts.append(time.monotonic()), one_attempt(*args))[1]
    try:
        with_timeout = connect(f"grpc://{running.grpc_address}", api_key=running.api_key, timeout=120,
                               settings=running.settings)
        expected = csr_to_dense(with_timeout.encode(running.sae_id, x))  # the SAE is loaded, the replica warm
        with_timeout.close()

        (old,) = _replica_names()
        ray.kill(ray.get_actor(old, namespace="serve"), no_restart=False)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            retried = pool.submit(lambda: csr_to_dense(patient.encode(running.sae_id, x)))
            outcomes = []
            deadline = time.monotonic() + 180
            served = set()
            while served != set(probes):  # until each transport has been served again
                assert time.monotonic() < deadline, f"the SAE service did not come back: {outcomes[-6:]}"
                for name, client in probes.items():
                    started = time.monotonic()
                    try:
                        codes = csr_to_dense(client.encode(running.sae_id, x))
                        outcome = ("OK", "", False)
                        served.add(name)
                        assert np.array_equal(codes.numpy(), expected.numpy())
                    except ClientError as err:
                        outcome = (err.code, err.message, retryable(err))
                    outcomes.append((name, *outcome, round(time.monotonic() - started, 2)))
                time.sleep(0.2)
            try:
                again = retried.result(timeout=180)
            except ClientError as err:
                raise AssertionError(f"the retrying client failed ({err}); probes: {outcomes}") from None
            assert np.array_equal(again.numpy(), expected.numpy())
    finally:
        for client in (*probes.values(), patient):
            client.close()

    print("calls in the gap (transport, code, message, retryable, seconds):", *outcomes, sep="\n  ")
    assert old not in _replica_names() and len(_replica_names()) == 1  # replaced by a new replica
    assert outcomes[0][1] != "OK", "the first call after the kill was served: no gap was seen"
    assert len(attempts) >= 2  # the retrying client was refused or timed out in the gap, then served
    for name, code, message, retry, seconds in outcomes:
        assert code == "OK" or code in RETRYABLE or retry, (name, code, message)
        assert code != "INTERNAL" or name == "grpc", (name, code, message)  # the gateway maps every error itself
        assert "Traceback" not in message and "ray." not in message, (name, code, message)
        assert seconds <= DEADLINE + SLACK, (name, code, seconds)
