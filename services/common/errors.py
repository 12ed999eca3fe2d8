"""Typed service errors and the one mapping from any exception to a gRPC status and an HTTP response.

Every servicer method and route ends in :func:`to_service_error`: a client sees a status code and a message saying
what to fix, never a raw exception (Ray would put its traceback, with paths and pids, in the gRPC details). A
model service raises :class:`ServiceError` to its in-cluster callers (the gateway), so nothing that needs torch
has to be unpickled on the gateway's side.

This module imports neither torch nor grpc at module level (the gateway stays light); library exception types
are recognised through ``sys.modules``, so a module never loaded cannot have raised.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from sae_shared.telemetry import get_logger

log = get_logger(__name__)


class ServiceError(Exception):
    """An error with a gRPC status code name, an HTTP status and a message for the client.

    Attributes:
        code: gRPC status code name, e.g. ``"INVALID_ARGUMENT"``.
        http_status: HTTP status of the same error.
        message: what is wrong and how to fix it (no traceback, no paths).
        field: the request field it refers to (dotted path), or ``""``.
        retry_after: seconds a client should wait before retrying (overload), or None.
    """

    code = "INTERNAL"
    http_status = 500

    def __init__(self, message: str, field: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.field = field or ""
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray's object store between replicas
        return (type(self), (self.message, self.field, self.retry_after))

    def to_json(self) -> dict[str, Any]:
        """The HTTP error body (mirrors ``saev.v1.ErrorDetail``)."""
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class InvalidArgument(ServiceError):
    code, http_status = "INVALID_ARGUMENT", 400


class NotFound(ServiceError):
    code, http_status = "NOT_FOUND", 404


class FailedPrecondition(ServiceError):
    """The request is valid but the target is not in a state to serve it (e.g. an SAE without statistics)."""

    code, http_status = "FAILED_PRECONDITION", 409


class TooLarge(ServiceError):
    """A message, tensor or batch above the configured limits."""

    code, http_status = "RESOURCE_EXHAUSTED", 413


class Overloaded(ServiceError):
    """Admission control refused the request: every replica is busy and the queue is full."""

    code, http_status = "RESOURCE_EXHAUSTED", 503

    def __init__(self, message: str = "", field: str = "", retry_after: float | None = 1.0):
        super().__init__(message or "the service is overloaded; retry after a short backoff", field, retry_after)


class Unauthenticated(ServiceError):
    code, http_status = "UNAUTHENTICATED", 401


class Unavailable(ServiceError):
    """A downstream replica is dead, restarting or not deployed."""

    code, http_status = "UNAVAILABLE", 503

    def __init__(self, message: str = "", field: str = "", retry_after: float | None = 2.0):
        super().__init__(message or "a backing service is unavailable; retry shortly", field, retry_after)


class DeadlineExceeded(ServiceError):
    code, http_status = "DEADLINE_EXCEEDED", 504


class Cancelled(ServiceError):
    code, http_status = "CANCELLED", 499


class Unimplemented(ServiceError):
    code, http_status = "UNIMPLEMENTED", 501


class Internal(ServiceError):
    code, http_status = "INTERNAL", 500


def _instance_of(exc: BaseException, module: str, name: str) -> bool:
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return isinstance(cls, type) and isinstance(exc, cls)


def to_service_error(exc: BaseException, *, where: str = "") -> ServiceError:
    """Classify any exception as a :class:`ServiceError`; unexpected ones are logged with their traceback here
    and reach the client as INTERNAL with a generic message."""
    if isinstance(exc, ServiceError):
        return exc
    # Ray wraps a remote exception; the cause is what the replica raised.
    if _instance_of(exc, "ray.exceptions", "RayTaskError"):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and cause is not exc:
            return to_service_error(cause, where=where)
    checks: list[tuple[str, str, type[ServiceError]]] = [
        ("ray.serve.exceptions", "BackPressureError", Overloaded),
        ("ray.serve.exceptions", "DeploymentUnavailableError", Unavailable),
        ("ray.serve.exceptions", "ReplicaUnavailableError", Unavailable),
        ("ray.serve.exceptions", "RequestCancelledError", Cancelled),
        ("ray.exceptions", "RayActorError", Unavailable),
        ("ray.exceptions", "ActorUnschedulableError", Unavailable),
        ("ray.exceptions", "WorkerCrashedError", Unavailable),
        ("ray.exceptions", "NodeDiedError", Unavailable),
        ("ray.exceptions", "GetTimeoutError", DeadlineExceeded),
        ("ray.exceptions", "TaskCancelledError", Cancelled),
    ]
    for module, name, kind in checks:
        if _instance_of(exc, module, name):
            if kind in (Overloaded, Unavailable):
                return kind()
            return kind(f"{kind.code.lower().replace('_', ' ')}: {type(exc).__name__}")
    if _instance_of(exc, "sae_shared.codec", "CodecError"):
        kind = TooLarge if getattr(exc, "too_large", False) else InvalidArgument
        return kind(str(exc), getattr(exc, "field", None) or "")
    if _instance_of(exc, "sae_shared.queue", "JobNotFound") or _instance_of(exc, "sae_shared.storage", "NotFound"):
        return NotFound(str(exc))
    if _instance_of(exc, "sae_shared.storage", "InvalidKey"):
        return InvalidArgument(str(exc))
    if _instance_of(exc, "sae_shared.queue", "IdempotencyConflict"):
        return FailedPrecondition(str(exc))
    if _instance_of(exc, "sae_shared.sae.modeling", "MissingStatistics"):
        return FailedPrecondition(str(exc))
    if _instance_of(exc, "sae_shared.storage", "StorageError") or _instance_of(exc, "sae_shared.queue", "QueueError"):
        log.warning("backing store error in %s: %s", where or "request", exc)
        return Unavailable(f"a backing store is unavailable: {type(exc).__name__}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return DeadlineExceeded("the request did not finish in time; retry, or send less work per request")
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled("the request was cancelled")
    if isinstance(exc, MemoryError):
        return TooLarge("not enough memory for this request; send fewer or smaller inputs")
    if _redis_connection_error(exc):
        return Unavailable("the job queue (Redis) is unreachable; retry shortly")
    if isinstance(exc, ValueError):  # the library's own input checks: curated messages, no paths
        return InvalidArgument(str(exc))
    log.error("unexpected error in %s", where or "request", exc_info=(type(exc), exc, exc.__traceback__))
    return Internal("internal error; the service logged the details")


def _redis_connection_error(exc: BaseException) -> bool:
    return _instance_of(exc, "redis.exceptions", "ConnectionError") or _instance_of(
        exc, "redis.exceptions", "TimeoutError"
    )
