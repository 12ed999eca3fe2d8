"""The wrapper every servicer method goes through: auth, error mapping, metrics.

A method decorated with :func:`unary` (or :func:`server_stream`) can be called two ways:

- by Ray Serve's gRPC proxy, which passes the call's context as ``grpc_context`` (Ray looks for a parameter of
  exactly that name): the API key in the metadata is checked, and any error becomes a status code and a message on
  the context (never INTERNAL with Ray's traceback);
- through a DeploymentHandle from another deployment (the gateway), without a context: the caller is inside the
  cluster, so no key is checked, and errors are raised as :class:`ServiceError` for the caller to map.

The deployment class provides ``self.auth`` (an :class:`ApiKeyCheck`).
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Awaitable, Callable

from services.common import metrics
from services.common.errors import ServiceError, to_service_error


def _set_status(grpc_context: Any, err: ServiceError) -> None:
    import grpc

    details = err.message
    if err.retry_after:
        details += f" (retry after {err.retry_after:g}s)"
    grpc_context.set_code(getattr(grpc.StatusCode, err.code))
    grpc_context.set_details(details)


def _empty(full_name: str) -> Any:
    """An empty message of a registered type (closures keep the name: generated classes do not pickle)."""
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(full_name)()


def unary(response_type: type) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Decorate ``async def Method(self, request)`` as a gRPC unary method returning ``response_type``."""
    response_name = response_type.DESCRIPTOR.full_name

    def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        name = fn.__name__

        async def method(self, request, grpc_context=None):
            started, code = time.perf_counter(), "OK"
            try:
                if grpc_context is not None:
                    self.auth.require_grpc(grpc_context)
                return await fn(self, request)
            except Exception as exc:  # noqa: BLE001 - every error is mapped, none reaches the client raw
                err = to_service_error(exc, where=name)
                code = err.code
                if grpc_context is None:
                    raise err from None
                _set_status(grpc_context, err)
                return _empty(response_name)
            finally:
                metrics.record_request(name, code, time.perf_counter() - started)

        method.__name__, method.__qualname__, method.__doc__ = name, fn.__qualname__, fn.__doc__
        return method

    return decorate


def server_stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Decorate ``async def Method(self, request)`` (an async generator) as a gRPC server-streaming method."""
    name = fn.__name__

    async def method(self, request, grpc_context=None):
        started, code = time.perf_counter(), "OK"
        try:
            if grpc_context is not None:
                self.auth.require_grpc(grpc_context)
            async for item in fn(self, request):
                yield item
        except Exception as exc:  # noqa: BLE001
            err = to_service_error(exc, where=name)
            code = err.code
            if grpc_context is None:
                raise err from None
            _set_status(grpc_context, err)
            # Serve carries a streaming method's status to the client only with a message or an exception: without
            # this raise an error before the first message (no key, unknown id) would end an empty stream with OK.
            # Serve keeps the code and details set above (no traceback reaches the client).
            raise err from None
        finally:
            metrics.record_request(name, code, time.perf_counter() - started)

    method.__name__, method.__qualname__, method.__doc__ = name, fn.__qualname__, fn.__doc__
    return method


def internal(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Decorate a method other deployments call through a handle: errors leave as :class:`ServiceError` only
    (so the caller never has to unpickle a library exception, and never sees a traceback)."""
    name = fn.__name__

    async def method(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise to_service_error(exc, where=name) from None

    method.__name__, method.__qualname__, method.__doc__ = name, fn.__qualname__, fn.__doc__
    return method
