"""The activations deployment: a ViT's residual stream over gRPC (``saev.v1.Activations``) and to other deployments.

A thin shell over ``sae_shared.backbones``: GetActivations is ``Backbone.record`` (the residual stream after
``blocks[L]`` for each requested L), ForwardFrom is ``Backbone.forward_from`` (``blocks[L+1:]`` and the final
norm). Concurrent requests are merged into one forward per backbone (``services.common.batching``: what arrives
while a forward runs forms the next batch); forwards run one at a time on a dedicated thread so the replica's event
loop keeps accepting requests and answering health checks.

torch and the library are imported in the constructor (the module itself imports neither), so building the
application in a light process does not load torch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ray import serve

from sae_shared.proto.saev.v1 import activations_pb2 as apb
from sae_shared.proto.saev.v1 import common_pb2 as pb
from sae_shared.settings import Settings
from services.common.base import MODEL_DEPLOYMENT, ModelServiceBase
from services.common.batching import Batcher
from services.common.cache import module_bytes
from services.common.config import ActivationsArgs, BatchingConfig, ModelSpec
from services.common.errors import InvalidArgument, NotFound, TooLarge
from services.common.protos import layout_to_proto, selection_name
from services.common.rpc import internal, unary

OUTPUT_DTYPES = {pb.DTYPE_UNSPECIFIED: "float32", pb.DTYPE_FLOAT32: "float32", pb.DTYPE_FLOAT16: "float16",
                 pb.DTYPE_BFLOAT16: "bfloat16"}


@dataclass
class _Work:
    """One request's share of a batched forward."""

    backbone: Any
    op: str
    """'record' (images -> residual streams at ``layers``) or 'from' (residual after ``layer`` -> final tokens)."""
    x: Any
    """Preprocessed images [B, 3, H, W] or a residual stream [B, T, D]."""
    layers: tuple[int, ...]


@serve.deployment(name="Activations", **MODEL_DEPLOYMENT)
class ActivationsService(ModelServiceBase):
    """Serves the configured backbones: the first preloaded one is the default."""

    def __init__(self, args: ActivationsArgs, settings: Settings):
        self._setup(args, settings, "backbones", lambda bb: module_bytes(bb.module))
        self.specs: dict[str, ModelSpec] = {s.name: s for s in args.backbones}
        if not self.specs:
            raise ValueError("the activations service needs at least one backbone in args.backbones")
        self.aliases: dict[str, str] = {}
        """Loaded backbone id -> spec name, so clients may use either."""
        for spec in args.backbones:
            if spec.preload:
                self.cache.put(spec.name, self._load(spec), pinned=True)
        self.batcher = Batcher(_compute, self.pool, "backbone")
        self.reconfigure(args.batching.model_dump())

    # -- configuration and health ----------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = BatchingConfig(**user_config)
        if cfg.default is not None and cfg.default not in self.specs:
            raise ValueError(f"user_config.default {cfg.default!r} is not a configured backbone: {list(self.specs)}")
        self.default = cfg.default or next(iter(self.specs))
        self.batcher.configure(cfg.max_batch_size, cfg.batch_wait_s)
        self.cache.set_budget(cfg.cache_bytes)

    async def check_health(self) -> None:
        """A tiny forward (the last block and the final norm) through every loaded backbone, on the model thread
        (behind at most one batch)."""

        def probe() -> None:
            import torch

            for _, bb in self.cache.items():
                lo = bb.layout
                with torch.inference_mode():
                    out = bb.forward_from(torch.zeros(1, lo.n_tokens, lo.d_model, device=bb.device),
                                          max(lo.n_blocks - 2, 0))
                if not bool(torch.isfinite(out).all()):
                    raise RuntimeError(f"backbone {bb.id} produced non-finite output on a zero input")

        await asyncio.get_running_loop().run_in_executor(self.pool, probe)

    @internal
    async def ready(self) -> dict[str, Any]:
        """What the gateway's /readyz reports for this service."""
        return {"backbones": [bb.id for _, bb in self.cache.items()], "default": self.default}

    # -- RPCs ---------------------------------------------------------------------------------------------------

    @unary(apb.ListBackbonesResponse)
    async def ListBackbones(self, request: apb.ListBackbonesRequest) -> apb.ListBackbonesResponse:
        """The configured backbones (layouts of those loaded) and the default."""
        out = apb.ListBackbonesResponse()
        for name, spec in self.specs.items():
            bb = self.cache.peek(name)
            if bb is None:
                out.backbones.add(backbone_id=name, family=spec.family, checkpoint=spec.checkpoint or "")
                continue
            lo = bb.layout
            out.backbones.add(
                backbone_id=bb.id, family=bb.family, checkpoint=bb.id.partition(":")[2], n_layers=lo.n_blocks,
                d_model=lo.d_model, image_size=lo.image_size[0], layout=layout_to_proto(lo, "all"))
        default = self.cache.peek(self.default)
        out.default_backbone_id = default.id if default is not None else self.default
        return out

    @unary(apb.GetActivationsResponse)
    async def GetActivations(self, request: apb.GetActivationsRequest) -> apb.GetActivationsResponse:
        """Residual streams after ``blocks[L]`` for each requested L, for a batch of images."""
        from services.activations.images import decode_images

        bb = await self._backbone(request.backbone_id)
        lo = bb.layout
        layers = list(request.layers) or [lo.n_blocks - 1]
        for i, layer in enumerate(layers):
            if not 0 <= layer < lo.n_blocks:
                raise InvalidArgument(f"layers[{i}]: layer {layer} is out of range; {bb.id} has blocks "
                                      f"0..{lo.n_blocks - 1}", f"layers[{i}]")
        if len(set(layers)) != len(layers):
            raise InvalidArgument(f"layers: {layers} has duplicates; list each layer once", "layers")
        tokens = selection_name(request.tokens)
        rows = _token_rows(lo, tokens)
        out_dtype = OUTPUT_DTYPES.get(request.dtype)
        if out_dtype is None:
            raise InvalidArgument("dtype: activations come as FLOAT32, FLOAT16 or BFLOAT16", "dtype")
        n = len(request.images)
        nbytes = n * len(layers) * (rows.stop - rows.start) * lo.d_model * (4 if out_dtype == "float32" else 2)
        if nbytes > self.limits.max_request_bytes:
            raise TooLarge(f"the response would hold {nbytes} bytes, more than the limit of "
                           f"{self.limits.max_request_bytes}; ask for fewer images, layers or tokens")
        def prepare():
            return bb.preprocess_batch(decode_images(request.images, self.limits, self.args.max_image_pixels,
                                                     self._read_object))

        imgs_bchw = await asyncio.to_thread(prepare)
        acts_bltd = await self._run(_Work(bb, "record", imgs_bchw, tuple(layers)))
        return await asyncio.to_thread(self._activations_response, bb, layers, acts_bltd, rows, tokens, out_dtype)

    @unary(apb.ForwardFromResponse)
    async def ForwardFrom(self, request: apb.ForwardFromRequest) -> apb.ForwardFromResponse:
        """Final tokens from the residual stream after ``blocks[layer]``: runs ``blocks[layer+1:]`` + final norm."""
        import torch

        from sae_shared.codec import proto_to_tensor

        bb = await self._backbone(request.backbone_id)
        lo = bb.layout
        if not 0 <= request.layer < lo.n_blocks:
            raise InvalidArgument(f"layer: {request.layer} is out of range; {bb.id} has blocks 0..{lo.n_blocks - 1}",
                                  "layer")
        if not request.HasField("residual"):
            raise InvalidArgument("residual: missing; send float [n_images, n_tokens, d_model]", "residual")
        resid = proto_to_tensor(request.residual, field="residual", max_bytes=self.limits.max_request_bytes,
                                max_elements=self.limits.max_tensor_elements)
        expected = f"[n_images, {lo.n_tokens}, {lo.d_model}]"
        if not resid.is_floating_point():
            raise InvalidArgument(f"residual: must be a float tensor {expected}, got {resid.dtype}", "residual")
        if resid.dim() != 3 or tuple(resid.shape[1:]) != (lo.n_tokens, lo.d_model) or resid.shape[0] < 1:
            raise InvalidArgument(f"residual: shape must be {expected} (every token of {bb.id}), got "
                                  f"{list(resid.shape)}", "residual")
        if resid.shape[0] > self.limits.max_batch_images:
            raise TooLarge(f"residual: {resid.shape[0]} images, more than the limit of "
                           f"{self.limits.max_batch_images}", "residual")
        tokens = selection_name(request.tokens)
        rows = _token_rows(lo, tokens)
        final_btd = await self._run(_Work(bb, "from", resid.to(torch.float32), (request.layer,)))
        return await asyncio.to_thread(self._forward_response, lo, final_btd, rows, tokens)

    # -- batching -----------------------------------------------------------------------------------------------

    async def _run(self, work: _Work):
        result = await self.batcher.submit(work)
        if isinstance(result, BaseException):
            raise result
        return result

    # -- helpers ------------------------------------------------------------------------------------------------

    async def _backbone(self, backbone_id: str):
        name = self._resolve(backbone_id)
        return await self.cache.get(name, lambda: self._load(self.specs[name]))

    def _resolve(self, backbone_id: str) -> str:
        if not backbone_id:
            return self.default
        if backbone_id in self.specs:
            return backbone_id
        if backbone_id in self.aliases:
            return self.aliases[backbone_id]
        served = sorted(set(self.specs) | set(self.aliases))
        raise NotFound(f"backbone_id: unknown backbone {backbone_id!r}; this service serves {served}",
                       "backbone_id")

    def _load(self, spec: ModelSpec):
        from sae_shared.backbones import load_backbone

        bb = load_backbone(spec.family or spec.name, spec.checkpoint, device=self.device,
                           dtype=self.settings.dtype, **spec.options)
        self.aliases[bb.id] = spec.name
        return bb

    def _read_object(self, key: str, max_bytes: int) -> bytes:
        from services.activations.images import store_reader

        return store_reader(self._open_store())(key, max_bytes)

    def _activations_response(self, bb, layers, acts_bltd, rows, tokens, out_dtype):
        import torch

        from sae_shared.codec import tensor_to_proto

        dtype = getattr(torch, out_dtype)
        out = apb.GetActivationsResponse(backbone_id=bb.id, layout=layout_to_proto(bb.layout, tokens))
        for i, layer in enumerate(layers):
            acts_btd = acts_bltd[:, i, rows].to(dtype).contiguous()
            out.layers.add(layer=layer, activations=tensor_to_proto(acts_btd, field="activations"))
        return out

    def _forward_response(self, lo, final_btd, rows, tokens):
        from sae_shared.codec import tensor_to_proto

        tokens_btd = final_btd[:, rows].float().contiguous()
        return apb.ForwardFromResponse(tokens=tensor_to_proto(tokens_btd, field="tokens"),
                                       layout=layout_to_proto(lo, tokens))


def _token_rows(layout, tokens: str) -> slice:
    """Rows of the token axis for a selection; 'registers' on a backbone without any is empty (proto contract)."""
    if tokens == "registers" and not layout.register_indices:
        return slice(0, 0)
    try:
        return layout.token_slice(tokens)
    except ValueError as exc:
        raise InvalidArgument(f"tokens: {exc}", "tokens") from None


def _compute(works: list[_Work]) -> list[Any]:
    """Run a batch: one forward per (backbone, op, layer) group, results split back per request."""
    import torch

    results: list[Any] = [None] * len(works)
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(works):
        key = (id(w.backbone), w.op) if w.op == "record" else (id(w.backbone), w.op, w.layers[0])
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        first = works[members[0]]
        try:
            x = torch.cat([works[i].x for i in members]) if len(members) > 1 else first.x
            with torch.inference_mode():
                if first.op == "record":
                    union = sorted({layer for i in members for layer in works[i].layers})
                    out = first.backbone.record(x, union, "all")  # [B, len(union), T, D] float32
                else:
                    out = first.backbone.forward_from(x, first.layers[0]).float()  # [B, T, D]
            start = 0
            for i in members:
                n = works[i].x.shape[0]
                part = out[start:start + n].cpu()
                if first.op == "record":
                    part = part[:, [union.index(layer) for layer in works[i].layers]]
                results[i] = part
                start += n
        except Exception as exc:  # noqa: BLE001 - handed to each request of the group, mapped there
            for i in members:
                results[i] = exc
    return results
