"""The services' own metrics, exported through Ray's metrics API beside Ray Serve's built-in series.

Created on first use inside the process that records them (``sae_shared.telemetry`` picks Ray's metrics inside a
replica, prometheus-client elsewhere). Ray adds application, deployment and replica tags and a ``ray_`` prefix.
"""

from __future__ import annotations

from sae_shared import telemetry

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def requests():
    return telemetry.counter("saev_requests_total", "Requests by RPC or route and status code.", ("method", "code"))


def latency():
    return telemetry.histogram("saev_request_seconds", "Request latency by RPC or route.", ("method",))


def batch_size():
    return telemetry.histogram(
        "saev_batch_size", "Items per batched model call (concurrent requests merged).", ("op",), BATCH_BUCKETS
    )


def cache_events():
    return telemetry.counter("saev_model_cache_total", "Model cache lookups by result (hit, miss, evict).",
                             ("cache", "result"))


def cache_bytes():
    return telemetry.gauge("saev_model_cache_bytes", "Bytes of model weights held in the cache.", ("cache",))


def record_request(method: str, code: str, seconds: float) -> None:
    requests().inc(1, {"method": method, "code": code})
    latency().observe(seconds, {"method": method})
