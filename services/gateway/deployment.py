"""The gateway deployment: the HTTP ingress and the composed gRPC services (Interventions, Jobs, Features).

One deployment serves both protocols: FastAPI routes (built per replica by ``__serve_build_asgi_app__``, see
``services.gateway.http``) and the gRPC methods below, which Ray Serve's gRPC proxy routes by method name (unique
across the three services). It reaches the model services through DeploymentHandles and never imports torch.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from sae_shared.proto.saev.v1 import features_pb2 as fpb
from sae_shared.proto.saev.v1 import interventions_pb2 as ipb
from sae_shared.proto.saev.v1 import jobs_pb2 as jpb
from sae_shared.settings import Settings
from services.common.auth import ApiKeyCheck, digests_of
from services.common.config import GatewayArgs
from services.common.limits import Limits
from services.common.rpc import server_stream, unary
from services.gateway import features, interventions
from services.gateway.downstream import Downstream
from services.gateway.jobs import JobsFacade

READY_TIMEOUT_S = 5.0


@serve.deployment(
    name="Gateway",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=64,
    max_queued_requests=128,
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
    health_check_period_s=10.0,
    graceful_shutdown_timeout_s=5.0,
)
@serve.ingress()
class Gateway:
    """HTTP routes + Interventions, Jobs and Features over gRPC."""

    def __init__(self, args: GatewayArgs, settings: Settings):
        self.args, self.settings = args, settings
        self.limits = Limits.from_settings(settings)
        self.auth = ApiKeyCheck(digests_of(settings.api_key_values()))
        self.down = Downstream(args)
        self.jobs = JobsFacade(settings, args.job_namespace)

    def __serve_build_asgi_app__(self):
        from services.gateway.http import create_app

        return create_app(self)

    # -- shared by both protocols -------------------------------------------------------------------------------

    async def intervene(self, request: ipb.InterveneRequest) -> ipb.InterveneResponse:
        return await interventions.intervene(self.down, request, self.limits)

    async def preview_intervention(self, request: ipb.PreviewInterventionRequest):
        return await interventions.preview(self.down, request)

    async def get_latent(self, request: fpb.GetLatentRequest) -> fpb.GetLatentResponse:
        return await features.get_latent(self.down, request)

    async def list_latents(self, request: fpb.ListLatentsRequest) -> fpb.ListLatentsResponse:
        return await features.list_latents(self.down, request)

    async def image_latents(self, request: fpb.GetImageLatentsRequest) -> fpb.GetImageLatentsResponse:
        return await features.get_image_latents(self.down, request)

    async def latent_exemplars(self, request: fpb.GetLatentExemplarsRequest) -> fpb.GetLatentExemplarsResponse:
        return await features.get_latent_exemplars(self.down, request)

    async def latent_histogram(self, request: fpb.GetLatentHistogramRequest) -> fpb.GetLatentHistogramResponse:
        return await features.get_latent_histogram(self.down, request)

    async def analysed_images(self, request: fpb.ListAnalysedImagesRequest) -> fpb.ListAnalysedImagesResponse:
        return await features.list_analysed_images(self.down, request)

    async def analysed_image_latents(self, request: fpb.GetAnalysedImageLatentsRequest):
        return await features.get_analysed_image_latents(self.down, request)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Each model service answers, the job queue and the object store are reachable."""

        async def check(name: str, probe) -> tuple[str, dict[str, Any]]:
            try:
                detail = await asyncio.wait_for(probe(), READY_TIMEOUT_S)
                return name, {"ok": True, **(detail or {})}
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                return name, {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}

        probes = {service: (lambda s=service: self.down.call(s, "ready", timeout_s=READY_TIMEOUT_S))
                  for service in ("activations", "sae", "taskhead")}
        probes["queue"] = self._ping_queue
        probes["store"] = self._ping_store
        results = dict(await asyncio.gather(*(check(n, p) for n, p in probes.items())))
        return all(r["ok"] for r in results.values()), results

    async def _ping_queue(self) -> dict[str, Any]:
        await self.jobs.ping()
        return {}

    async def _ping_store(self) -> dict[str, Any]:
        def ping():
            from sae_shared.storage import open_store

            open_store(self.settings).list("saes/", recursive=False)

        await asyncio.to_thread(ping)
        return {}

    # -- gRPC: Interventions --------------------------------------------------------------------------------------

    @unary(ipb.InterveneResponse)
    async def Intervene(self, request: ipb.InterveneRequest) -> ipb.InterveneResponse:
        return await self.intervene(request)

    @unary(ipb.PreviewInterventionResponse)
    async def PreviewIntervention(self, request):
        return await self.preview_intervention(request)

    # -- gRPC: Jobs -------------------------------------------------------------------------------------------------

    @unary(jpb.SubmitJobResponse)
    async def SubmitJob(self, request: jpb.SubmitJobRequest) -> jpb.SubmitJobResponse:
        return await self.jobs.submit(request)

    @unary(jpb.GetJobResponse)
    async def GetJob(self, request: jpb.GetJobRequest) -> jpb.GetJobResponse:
        return await self.jobs.get(request)

    @unary(jpb.ListJobsResponse)
    async def ListJobs(self, request: jpb.ListJobsRequest) -> jpb.ListJobsResponse:
        return await self.jobs.list(request)

    @unary(jpb.CancelJobResponse)
    async def CancelJob(self, request: jpb.CancelJobRequest) -> jpb.CancelJobResponse:
        return await self.jobs.cancel(request)

    @server_stream
    async def WatchJob(self, request: jpb.WatchJobRequest):
        async for update in self.jobs.watch(request):
            yield update

    # -- gRPC: Features -------------------------------------------------------------------------------------------

    @unary(fpb.GetLatentResponse)
    async def GetLatent(self, request: fpb.GetLatentRequest) -> fpb.GetLatentResponse:
        return await self.get_latent(request)

    @unary(fpb.ListLatentsResponse)
    async def ListLatents(self, request: fpb.ListLatentsRequest) -> fpb.ListLatentsResponse:
        return await self.list_latents(request)

    @unary(fpb.GetLatentExemplarsResponse)
    async def GetLatentExemplars(self, request: fpb.GetLatentExemplarsRequest):
        return await self.latent_exemplars(request)

    @unary(fpb.GetImageLatentsResponse)
    async def GetImageLatents(self, request: fpb.GetImageLatentsRequest) -> fpb.GetImageLatentsResponse:
        return await self.image_latents(request)

    @unary(fpb.GetLatentHistogramResponse)
    async def GetLatentHistogram(self, request: fpb.GetLatentHistogramRequest):
        return await self.latent_histogram(request)

    @unary(fpb.ListAnalysedImagesResponse)
    async def ListAnalysedImages(self, request: fpb.ListAnalysedImagesRequest):
        return await self.analysed_images(request)

    @unary(fpb.GetAnalysedImageLatentsResponse)
    async def GetAnalysedImageLatents(self, request: fpb.GetAnalysedImageLatentsRequest):
        return await self.analysed_image_latents(request)
