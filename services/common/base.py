"""What every model service replica sets up the same way: threads, device, limits, auth, model cache, store."""

from __future__ import annotations

from typing import Any, Callable

from sae_shared.settings import Settings
from services.common.auth import ApiKeyCheck, digests_of
from services.common.cache import ModelCache
from services.common.compute import compute_thread
from services.common.config import ModelServiceArgs
from services.common.heap import keep_freed_memory
from services.common.limits import Limits


MODEL_DEPLOYMENT = dict(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=16,
    max_queued_requests=32,
    health_check_period_s=10.0,
    health_check_timeout_s=60.0,
    graceful_shutdown_timeout_s=5.0,
)
"""Default ``@serve.deployment`` options of the three model services (serve configs override them per replica)."""


class ModelServiceBase:
    """Shared constructor pieces and the HTTP answer of a gRPC-only service."""

    def _setup(self, args: ModelServiceArgs, settings: Settings, cache_name: str,
               size_of: Callable[[Any], int]) -> None:
        keep_freed_memory()
        threads = args.resolved_threads(settings)
        self.args, self.settings = args, settings
        self.device = args.resolved_device(settings)
        self.limits = Limits.from_settings(settings)
        self.auth = ApiKeyCheck(digests_of(settings.api_key_values()))
        self.cache: ModelCache = ModelCache(cache_name, args.batching.cache_bytes, size_of)
        self.pool = compute_thread(threads)  # before any model loads (here, with one torch thread)
        self._store = None

    def _open_store(self):
        if self._store is None:
            from sae_shared.storage import open_store

            self._store = open_store(self.settings)
        return self._store

    async def __call__(self, request):
        """Plain HTTP reaching this application: point at the gateway's API instead of failing."""
        from starlette.responses import JSONResponse

        return JSONResponse({"error": {"code": "NOT_FOUND", "field": "", "message": (
            "this service speaks gRPC only; use the gateway's HTTP API under /v1 (see /openapi.json)")}},
            status_code=404)
