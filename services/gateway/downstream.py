"""The gateway's view of the three model services: DeploymentHandles with a deadline and error mapping.

Every call goes through :meth:`Downstream.call`, which waits at most ``timeout_s`` and turns whatever Ray raises
(overload, a dead or restarting replica, the service's own typed errors) into a :class:`ServiceError`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.common.config import GatewayArgs
from services.common.errors import DeadlineExceeded, to_service_error

DEPLOYMENTS = {"activations": "Activations", "sae": "SAE", "taskhead": "TaskHead"}
"""Service -> deployment name inside its application."""
CONTRACT_TTL_S = 30.0
"""How long the gateway reuses a model's contract (backbone, layer, kind) before asking again."""
MAX_CACHED = 1024


class Downstream:
    """Handles to the activations, SAE and task-head applications."""

    def __init__(self, args: GatewayArgs):
        self.apps = {"activations": args.activations_app, "sae": args.sae_app, "taskhead": args.taskhead_app}
        self.timeout_s = args.downstream_timeout_s
        self._handles: dict[str, Any] = {}
        self._cached: dict[tuple[str, str, str], tuple[float, Any]] = {}

    def handle(self, service: str):
        handle = self._handles.get(service)
        if handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(DEPLOYMENTS[service], app_name=self.apps[service])
            self._handles[service] = handle
        return handle

    async def call(self, service: str, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """``await handle.<method>.remote(*args)`` with a deadline; errors leave as ServiceError."""
        response = None
        try:
            response = getattr(self.handle(service), method).remote(*args)
            return await asyncio.wait_for(_await(response), timeout_s or self.timeout_s)
        except asyncio.TimeoutError:
            if response is not None:
                response.cancel()
            raise DeadlineExceeded(f"the {service} service did not answer {method} within "
                                   f"{timeout_s or self.timeout_s:g}s; retry later") from None
        except Exception as exc:  # noqa: BLE001 - mapped: overload, unavailable, the service's own errors
            raise to_service_error(exc, where=f"{service}.{method}") from None


    async def cached(self, service: str, method: str, key: str) -> Any:
        """``call(service, method, key)`` remembered for ``CONTRACT_TTL_S`` (contracts change only on redeploys);
        saves two round trips per intervention."""
        now = time.monotonic()
        hit = self._cached.get((service, method, key))
        if hit is not None and hit[0] > now:
            return hit[1]
        value = await self.call(service, method, key)
        if len(self._cached) >= MAX_CACHED:
            self._cached.clear()
        self._cached[(service, method, key)] = (now + CONTRACT_TTL_S, value)
        return value


async def _await(response: Any) -> Any:
    return await response
