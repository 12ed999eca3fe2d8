"""The gateway's HTTP API (FastAPI): ``/v1/...`` routes, health, readiness and the OpenAPI document.

Bodies and responses are the protobuf JSON mapping of the same ``saev.v1`` messages the gRPC API uses (schemas in
``/openapi.json``, generated from the descriptors). Every ``/v1`` route needs ``Authorization: Bearer <key>`` when
keys are configured (the two ``.png`` feature routes also take ``?key=<key>``, for ``<img>`` tags, which cannot send
headers); ``/healthz`` and ``/readyz`` never do. Errors are JSON ``{"error": {"code", "message",
"field"}}`` with a 4xx status for bad input (400 invalid, 401 no key, 404 unknown id, 409 not ready for it, 413 too
large) and 503 + ``Retry-After`` for overload or an unavailable backing service.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from fastapi import Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from google.protobuf import json_format
from starlette.exceptions import HTTPException as StarletteHTTPException

from sae_shared.proto.saev.v1 import activations_pb2 as apb
from sae_shared.proto.saev.v1 import features_pb2 as fpb
from sae_shared.proto.saev.v1 import interventions_pb2 as ipb
from sae_shared.proto.saev.v1 import jobs_pb2 as jpb
from sae_shared.proto.saev.v1 import sae_pb2 as spb
from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb
from services.common import metrics
from services.common.errors import InvalidArgument, ServiceError, TooLarge, Unauthenticated, to_service_error
from services.gateway import features
from services.gateway.openapi import message_schemas, ref
from services.sae.catalog import SAE_ID_MAX, SAE_ID_PATTERN

STATIC_DIR = Path(__file__).parent / "static"
MAX_INDEX, MAX_INT32 = 1 << 62, (1 << 31) - 1
ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}},
}
ERROR_RESPONSES = {
    str(status): {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for status, text in ((400, "Invalid input"), (401, "Missing or invalid API key"), (404, "Unknown id"),
                         (409, "The target is not ready for this request"), (413, "Input too large"),
                         (503, "Overloaded or a backing service is unavailable; retry after Retry-After"))
}


def to_json(message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)


def error_response(err: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after else None
    if err.code == "UNAUTHENTICATED":
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(err.to_json(), status_code=err.http_status, headers=headers)


async def read_body(request: Request, message_type, limit: int):
    """The request body (JSON, at most ``limit`` bytes) parsed into ``message_type``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {declared} bytes is over the limit of {limit}; send less per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes; send less per request")
        chunks.append(chunk)
    try:
        doc = json.loads(b"".join(chunks) or b"{}")
    except ValueError as exc:
        raise InvalidArgument(f"body: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"body: expected a JSON object ({message_type.DESCRIPTOR.name})")
    try:
        return json_format.ParseDict(doc, message_type())
    except json_format.ParseError as exc:
        raise InvalidArgument(f"body: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for odd JSON
        raise InvalidArgument(f"body: not a valid {message_type.DESCRIPTOR.name} ({type(exc).__name__})") from None


def create_app(gw) -> FastAPI:
    """The FastAPI app of a gateway replica ``gw`` (see ``services.gateway.deployment.Gateway``)."""
    app = FastAPI(title="SAE-V platform API", version="1",
                  description="Interpret vision transformers with sparse autoencoders: activations, SAE codes, "
                              "feature edits and their effect on task heads, batch jobs.",
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    bearer = HTTPBearer(auto_error=False, description="API key (saevctl serve writes one to $SAEV_HOME/api_key)")
    body_limit = gw.limits.max_request_bytes * 4 // 3 + (1 << 20)  # base64 inflation + JSON envelope
    schemas: dict[str, dict[str, Any]] = {}

    async def require_key(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        gw.auth.require(f"Bearer {credentials.credentials}" if credentials else None)

    async def timed(name: str, run: Callable[[], Awaitable[Any]]):
        started, code = time.perf_counter(), "OK"
        try:
            return await run()
        except Exception as exc:  # noqa: BLE001 - mapped to a typed error, never a raw 500
            err = to_service_error(exc, where=name)
            code = err.code
            raise err from None
        finally:
            metrics.record_request(name, code, time.perf_counter() - started)

    def post(path: str, name: str, request_type, response_type, handler, summary: str, tag: str) -> None:
        schemas.update(message_schemas(request_type.DESCRIPTOR, response_type.DESCRIPTOR))

        async def endpoint(request: Request):
            async def run():
                message = await read_body(request, request_type, body_limit)
                return to_json(await handler(message))

            return JSONResponse(await timed(name, run))

        endpoint.__name__ = name
        app.add_api_route(
            path, endpoint, methods=["POST"], summary=summary, tags=[tag], dependencies=[Depends(require_key)],
            operation_id=name, responses={"200": {"description": "OK", "content": {"application/json": {
                "schema": ref(response_type.DESCRIPTOR)}}}, **ERROR_RESPONSES},
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                "schema": ref(request_type.DESCRIPTOR)}}}})

    def get(path: str, name: str, response_type, summary: str, tag: str):
        """Decorator for GET routes whose endpoint returns a message."""
        schemas.update(message_schemas(response_type.DESCRIPTOR))

        def register(fn):
            async def endpoint(*args, **kwargs):
                return JSONResponse(await timed(name, lambda: _as_json(fn(*args, **kwargs))))

            endpoint.__signature__ = _signature(fn)
            endpoint.__name__ = name
            app.add_api_route(
                path, endpoint, methods=["GET"], summary=summary, tags=[tag], dependencies=[Depends(require_key)],
                operation_id=name, responses={"200": {"description": "OK", "content": {"application/json": {
                    "schema": ref(response_type.DESCRIPTOR)}}}, **ERROR_RESPONSES})
            return fn

        return register

    call = gw.down.call

    # -- health ------------------------------------------------------------------------------------------------

    @app.get("/healthz", tags=["health"], summary="Liveness: the gateway process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: model services, job queue and object store reachable",
             responses={"503": {"description": "Not ready"}})
    async def readyz():
        ready, report = await gw.readiness()
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": report},
                            status_code=200 if ready else 503)

    # -- model services ----------------------------------------------------------------------------------------

    @get("/v1/backbones", "ListBackbones", apb.ListBackbonesResponse, "Backbones served", "activations")
    async def list_backbones():
        return await call("activations", "ListBackbones", apb.ListBackbonesRequest())

    post("/v1/activations", "GetActivations", apb.GetActivationsRequest, apb.GetActivationsResponse,
         lambda m: call("activations", "GetActivations", m), "Residual streams of images at layers", "activations")
    post("/v1/forward", "ForwardFrom", apb.ForwardFromRequest, apb.ForwardFromResponse,
         lambda m: call("activations", "ForwardFrom", m), "Final tokens from a residual stream", "activations")

    @get("/v1/saes", "ListSAEs", spb.ListSAEsResponse, "SAEs available", "sae")
    async def list_saes(backbone_id: str = Query("", max_length=512),
                        layer: Optional[int] = Query(None, ge=0, le=(1 << 31) - 1)):
        request = spb.ListSAEsRequest(backbone_id=backbone_id)
        if layer is not None:
            request.layer = layer
        return await call("sae", "ListSAEs", request)

    for path, name, req, resp, summary in (
        ("/v1/saes/encode", "Encode", spb.EncodeRequest, spb.EncodeResponse, "Activations to SAE codes"),
        ("/v1/saes/decode", "Decode", spb.DecodeRequest, spb.DecodeResponse, "SAE codes to activations"),
        ("/v1/saes/edit", "Edit", spb.EditRequest, spb.EditResponse, "Latent edits in the delta form"),
        ("/v1/saes/top-features", "TopFeatures", spb.TopFeaturesRequest, spb.TopFeaturesResponse,
         "Strongest latents per image"),
    ):
        post(path, name, req, resp, (lambda method: lambda m: call("sae", method, m))(name), summary, "sae")

    @get("/v1/heads", "ListHeads", tpb.ListHeadsResponse, "Task heads available", "taskhead")
    async def list_heads(backbone_id: str = Query("", max_length=512)):
        return await call("taskhead", "ListHeads", tpb.ListHeadsRequest(backbone_id=backbone_id))

    post("/v1/heads/predict", "Predict", tpb.PredictRequest, tpb.PredictResponse,
         lambda m: call("taskhead", "Predict", m), "Head predictions from final tokens", "taskhead")

    # -- composed services -------------------------------------------------------------------------------------

    post("/v1/interventions", "Intervene", ipb.InterveneRequest, ipb.InterveneResponse, gw.intervene,
         "Predictions before and after latent edits", "interventions")
    post("/v1/interventions/preview", "PreviewIntervention", ipb.PreviewInterventionRequest,
         ipb.PreviewInterventionResponse, gw.preview_intervention, "Edited latents' codes before and after",
         "interventions")

    @get("/v1/saes/{sae_id}/latents/{latent}", "GetLatent", fpb.GetLatentResponse, "A latent's statistics",
         "features")
    async def get_latent(sae_id: str = PathParam(max_length=256), latent: int = PathParam(ge=0, le=(1 << 62))):
        return await gw.get_latent(fpb.GetLatentRequest(sae_id=sae_id, latent=latent))

    @get("/v1/saes/{sae_id}/latents", "ListLatents", fpb.ListLatentsResponse, "Latents' statistics, paged",
         "features")
    async def list_latents(sae_id: str = PathParam(max_length=256),
                           order_by: str = Query("INDEX", pattern="^(INDEX|FREQUENCY|MAX_ACTIVATION)$"),
                           descending: bool = False, include_dead: bool = False,
                           min_frequency: Optional[float] = Query(None, ge=0, le=1),
                           max_frequency: Optional[float] = Query(None, ge=0, le=1),
                           page_size: int = Query(0, ge=0, le=1000), page_token: str = Query("", max_length=64)):
        request = fpb.ListLatentsRequest(sae_id=sae_id, order_by=fpb.LatentOrder.Value(f"LATENT_ORDER_{order_by}"),
                                         descending=descending, include_dead=include_dead, page_size=page_size,
                                         page_token=page_token)
        if min_frequency is not None:
            request.min_frequency = min_frequency
        if max_frequency is not None:
            request.max_frequency = max_frequency
        return await gw.list_latents(request)

    post("/v1/features/image-latents", "GetImageLatents", fpb.GetImageLatentsRequest, fpb.GetImageLatentsResponse,
         gw.image_latents, "The latents most active in an image", "features")

    # -- features from a committed analysis (``saevctl analyze``): 404 until there is one -------------------------

    def sae_path():
        return PathParam(max_length=SAE_ID_MAX, pattern=SAE_ID_PATTERN)

    def latent_path():
        return PathParam(ge=0, le=MAX_INDEX)

    def kind_query():
        return Query("patch", pattern="^(patch|cls)$", description="Ranking: patch (max over a view's patches) or "
                     "cls (the CLS token; only where the backbone has one)")

    @get("/v1/saes/{sae_id}/latents/{latent}/exemplars", "GetLatentExemplars", fpb.GetLatentExemplarsResponse,
         "A latent's top exemplars (tile keys or bytes, heatmaps)", "features")
    async def latent_exemplars(sae_id: str = sae_path(), latent: int = latent_path(), kind: str = kind_query(),
                               limit: int = Query(0, ge=0, le=1024), include_heatmaps: bool = False,
                               include_images: bool = False):
        return await gw.latent_exemplars(fpb.GetLatentExemplarsRequest(
            sae_id=sae_id, latent=latent, kind=kind, limit=limit, include_heatmaps=include_heatmaps,
            include_images=include_images))

    @get("/v1/saes/{sae_id}/latents/{latent}/histogram", "GetLatentHistogram", fpb.GetLatentHistogramResponse,
         "Histogram of a latent's codes on its exemplars' patches", "features")
    async def latent_histogram(sae_id: str = sae_path(), latent: int = latent_path(),
                               bins: int = Query(0, ge=0, le=256)):
        return await gw.latent_histogram(fpb.GetLatentHistogramRequest(sae_id=sae_id, latent=latent, bins=bins))

    @get("/v1/saes/{sae_id}/images", "ListAnalysedImages", fpb.ListAnalysedImagesResponse,
         "The images the analysis ran over, paged", "features")
    async def analysed_images(sae_id: str = sae_path(), offset: int = Query(0, ge=0, le=MAX_INT32),
                              limit: int = Query(0, ge=0, le=1000)):
        return await gw.analysed_images(fpb.ListAnalysedImagesRequest(sae_id=sae_id, offset=offset, limit=limit))

    @get("/v1/saes/{sae_id}/images/{image_index}/latents", "GetAnalysedImageLatents",
         fpb.GetAnalysedImageLatentsResponse, "An analysed image's strongest latents (reverse index)", "features")
    async def analysed_image_latents(sae_id: str = sae_path(), image_index: int = PathParam(ge=0, le=MAX_INDEX),
                                     k: int = Query(0, ge=0, le=MAX_INT32)):
        return await gw.analysed_image_latents(fpb.GetAnalysedImageLatentsRequest(
            sae_id=sae_id, image_index=image_index, k=k))

    async def require_key_or_query(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
                                   key: Optional[str] = Query(None, max_length=512, description=(
                                       "API key, for <img> tags that cannot send the Authorization header"))) -> None:
        if credentials is None and key is not None:
            if not gw.auth.verify(key):  # constant time, as for the header
                raise Unauthenticated("invalid API key")
            return
        gw.auth.require(f"Bearer {credentials.credentials}" if credentials else None)

    def png_route(path: str, name: str, summary: str):
        def register(fn):
            async def endpoint(*args, **kwargs):
                png = await timed(name, lambda: fn(*args, **kwargs))
                return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

            endpoint.__signature__ = _signature(fn)
            endpoint.__name__ = name
            app.add_api_route(path, endpoint, methods=["GET"], summary=summary, tags=["features"],
                              dependencies=[Depends(require_key_or_query)], operation_id=name,
                              response_class=Response, responses={"200": {"description": "PNG image", "content": {
                                  "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                                  **ERROR_RESPONSES})
            return fn

        return register

    @png_route("/v1/saes/{sae_id}/latents/{latent}/exemplars/{rank}/tile.png", "GetExemplarTile",
               "An exemplar's view with the latent's heatmap over it (PNG; rendered once, then cached)")
    async def exemplar_tile(sae_id: str = sae_path(), latent: int = latent_path(),
                            rank: int = PathParam(ge=0, le=1023), kind: str = kind_query()):
        return await features.get_tile(gw.down, sae_id, latent, rank, kind)

    @png_route("/v1/saes/{sae_id}/images/{image_index}.png", "GetAnalysedImage",
               "An analysed image's source pixels (PNG, longest side at most 2048)")
    async def analysed_image(sae_id: str = sae_path(), image_index: int = PathParam(ge=0, le=MAX_INDEX)):
        return await features.get_source_image(gw.down, sae_id, image_index)

    # -- jobs ------------------------------------------------------------------------------------------------------

    post("/v1/jobs", "SubmitJob", jpb.SubmitJobRequest, jpb.SubmitJobResponse, gw.jobs.submit, "Queue a job",
         "jobs")

    @get("/v1/jobs", "ListJobs", jpb.ListJobsResponse, "Jobs, newest first", "jobs")
    async def list_jobs(type: str = Query("", pattern="^(|RECORD|TRAIN|ANALYZE|TRAIN_HEAD|EXPERIMENT)$"),
                        state: list[str] = Query([], max_length=8),
                        page_size: int = Query(0, ge=0, le=500), page_token: str = Query("", max_length=128)):
        request = jpb.ListJobsRequest(page_size=page_size, page_token=page_token)
        if type:
            request.type = jpb.JobType.Value(f"JOB_TYPE_{type}")
        for s in state:
            name = f"JOB_STATE_{s.upper()}"
            if name not in jpb.JobState.keys() or name == "JOB_STATE_UNSPECIFIED":
                raise InvalidArgument(f"state: unknown job state {s!r}", "state")
            request.states.append(jpb.JobState.Value(name))
        return await gw.jobs.list(request)

    @get("/v1/jobs/{job_id}", "GetJob", jpb.GetJobResponse, "One job", "jobs")
    async def get_job(job_id: str = PathParam(max_length=256)):
        return await gw.jobs.get(jpb.GetJobRequest(job_id=job_id))

    async def cancel_job(job_id: str = PathParam(max_length=256)):
        async def run():
            return to_json(await gw.jobs.cancel(jpb.CancelJobRequest(job_id=job_id)))

        return JSONResponse(await timed("CancelJob", run))

    schemas.update(message_schemas(jpb.CancelJobResponse.DESCRIPTOR))
    app.add_api_route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"], tags=["jobs"], summary="Cancel a job",
                      dependencies=[Depends(require_key)], operation_id="CancelJob", responses={
                          "200": {"description": "OK", "content": {"application/json": {
                              "schema": ref(jpb.CancelJobResponse.DESCRIPTOR)}}}, **ERROR_RESPONSES})

    @app.get("/v1/jobs/{job_id}/watch", tags=["jobs"], dependencies=[Depends(require_key)], operation_id="WatchJob",
             summary="The job's state as NDJSON lines (one per change) until it ends",
             responses={"200": {"content": {"application/x-ndjson": {}}}, **ERROR_RESPONSES})
    async def watch_job(job_id: str = PathParam(max_length=256)):
        request = jpb.WatchJobRequest(job_id=job_id)
        await timed("WatchJob", lambda: gw.jobs.get(jpb.GetJobRequest(job_id=job_id)))  # 404 before streaming

        async def lines():
            try:
                async for update in gw.jobs.watch(request):
                    yield json.dumps(to_json(update)) + "\n"
            except Exception as exc:  # noqa: BLE001 - the stream ends with an error line
                yield json.dumps(to_service_error(exc, where="WatchJob").to_json()) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    # -- errors, OpenAPI, static UI ----------------------------------------------------------------------------

    @app.exception_handler(ServiceError)
    async def on_service_error(_: Request, exc: ServiceError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        msg = first.get("msg", "invalid request")
        return error_response(InvalidArgument(f"{where}: {msg}" if where else msg, where))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException):
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "INVALID_ARGUMENT")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail), "field": ""}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    if STATIC_DIR.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/ui", StaticFiles(directory=STATIC_DIR, html=True), name="ui")

        @app.get("/", include_in_schema=False)
        async def index():
            return RedirectResponse("/ui/")

    return app


async def _as_json(result: Awaitable[Any]) -> dict[str, Any]:
    return to_json(await result)


def _signature(fn):
    import inspect

    return inspect.signature(fn)
