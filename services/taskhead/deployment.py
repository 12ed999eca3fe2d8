"""The task-head deployment: classifiers and segmenters on final tokens (``saev.v1.TaskHead``).

Predict takes the final-normed tokens ForwardFrom returns and gives logits and argmax labels (and the top classes
of classifiers; the per-patch logits of segmenters on request). Concurrent requests for the same head are merged
into one call (``services.common.batching``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ray import serve

from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb
from sae_shared.settings import Settings
from services.common.base import MODEL_DEPLOYMENT, ModelServiceBase
from services.common.batching import Batcher
from services.common.cache import module_bytes
from services.common.config import BatchingConfig, TaskHeadArgs
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, TooLarge
from services.common.protos import check_layout, selection_name
from services.common.rpc import internal, unary

KINDS = {"classifier": tpb.HEAD_KIND_CLASSIFIER, "segmenter": tpb.HEAD_KIND_SEGMENTER}


@dataclass
class _Work:
    head: Any
    tokens_btd: Any


@serve.deployment(name="TaskHead", **MODEL_DEPLOYMENT)
class TaskHeadService(ModelServiceBase):
    """Serves the configured heads; the first is the default."""

    def __init__(self, args: TaskHeadArgs, settings: Settings):
        self._setup(args, settings, "heads", lambda h: module_bytes(h.module))
        for head_id in args.heads:
            self.cache.put(head_id, self._load(head_id), pinned=True)
        self.batcher = Batcher(_compute, self.pool, "head")
        self.reconfigure(args.batching.model_dump())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = BatchingConfig(**user_config)
        self.default = cfg.default or (self.args.heads[0] if self.args.heads else "")
        self.batcher.configure(cfg.max_batch_size, cfg.batch_wait_s)
        self.cache.set_budget(cfg.cache_bytes)

    async def check_health(self) -> None:
        """One prediction on zero tokens through every loaded head, on the model thread."""

        def probe() -> None:
            import torch

            for _, head in self.cache.items():
                rows, cols = head.grid
                tokens = torch.zeros(1, head.n_prefix_tokens + rows * cols, head.d_model, device=head.device)
                with torch.inference_mode():
                    out = head.predict(tokens).logits
                if not bool(torch.isfinite(out).all()):
                    raise RuntimeError(f"head {head.head_id} produced non-finite logits on a zero input")

        await asyncio.get_running_loop().run_in_executor(self.pool, probe)

    @internal
    async def ready(self) -> dict[str, Any]:
        return {"heads": [str(k) for k in self.cache.keys()], "default": self.default}

    @internal
    async def describe(self, head_id: str) -> dict[str, Any]:
        """The head's contract, for the gateway (kind, backbone, classes)."""
        head = await self._head(head_id)
        return {"head_id": head.head_id, "kind": head.kind, "backbone_id": head.backbone_id,
                "n_classes": head.n_classes}

    # -- RPCs ---------------------------------------------------------------------------------------------------

    @unary(tpb.ListHeadsResponse)
    async def ListHeads(self, request: tpb.ListHeadsRequest) -> tpb.ListHeadsResponse:
        """Loaded heads (optionally only those on one backbone)."""
        out = tpb.ListHeadsResponse()
        for _, head in self.cache.items():
            if request.backbone_id and request.backbone_id != head.backbone_id:
                continue
            out.heads.add(head_id=head.head_id, kind=KINDS[head.kind], backbone_id=head.backbone_id,
                          d_model=head.d_model, n_classes=head.n_classes, class_names=head.class_names)
        return out

    @unary(tpb.PredictResponse)
    async def Predict(self, request: tpb.PredictRequest) -> tpb.PredictResponse:
        """Logits and argmax labels (top classes for classifiers, patch logits for segmenters on request) from final
        tokens."""
        from sae_shared.codec import proto_to_tensor

        head = await self._head(request.head_id)
        if not request.HasField("tokens"):
            raise InvalidArgument("tokens: missing; send the final tokens ForwardFrom returned", "tokens")
        if request.top_k < 0:
            raise InvalidArgument("top_k: must be >= 0", "top_k")
        tokens = proto_to_tensor(request.tokens, field="tokens", max_bytes=self.limits.max_request_bytes,
                                 max_elements=self.limits.max_tensor_elements)
        tokens_btd = self._full_tokens(head, tokens, request)
        logits, patch_logits = await self._run(_Work(head, tokens_btd))
        if not request.patch_logits or head.kind != "segmenter":
            patch_logits = None
        nbytes = 3 * logits.numel() * 4 + (0 if patch_logits is None else patch_logits.numel() * 4)
        if nbytes > self.limits.max_request_bytes:  # logits + labels (<= 2x logits) + patch logits
            raise TooLarge(f"tokens: the predictions for {logits.shape[0]} images would exceed the response limit "
                           f"of {self.limits.max_request_bytes} bytes; send fewer images", "tokens")
        return await asyncio.to_thread(_predict_response, head, logits, patch_logits, request.top_k)

    # -- helpers ------------------------------------------------------------------------------------------------

    def _full_tokens(self, head, tokens, request: tpb.PredictRequest):
        """Validate the token tensor against the head and return every token [B, prefix + patches, D]."""
        import torch

        rows, cols = head.grid
        full = head.n_prefix_tokens + rows * cols
        if not tokens.is_floating_point() or tokens.dim() != 3 or tokens.shape[0] < 1:
            raise InvalidArgument(f"tokens: must be float [n_images, n_tokens, {head.d_model}], got {tokens.dtype} "
                                  f"{list(tokens.shape)}", "tokens")
        if tokens.shape[0] > self.limits.max_batch_images:
            raise TooLarge(f"tokens: {tokens.shape[0]} images, more than the limit of "
                           f"{self.limits.max_batch_images}", "tokens")
        if tokens.shape[2] != head.d_model:
            raise InvalidArgument(f"tokens: width {tokens.shape[2]} does not match head {head.head_id} "
                                  f"(d_model {head.d_model}, backbone {head.backbone_id})", "tokens")
        if not bool(torch.isfinite(tokens).all()):
            raise InvalidArgument("tokens: contain NaN or Inf", "tokens")
        tokens = tokens.float()
        selection = "all"
        if request.HasField("layout"):
            check_layout(request.layout, tokens.shape[1])
            lo = request.layout
            selection = selection_name(lo.selection, "layout.selection")
            if (lo.grid_height, lo.grid_width) != (rows, cols):
                raise InvalidArgument(f"layout: grid {lo.grid_height}x{lo.grid_width} does not match head "
                                      f"{head.head_id} ({rows}x{cols})", "layout")
        if selection == "patches" and tokens.shape[1] == rows * cols:
            prefix = torch.zeros(tokens.shape[0], head.n_prefix_tokens, tokens.shape[2])
            return torch.cat([prefix, tokens], dim=1) if head.n_prefix_tokens else tokens
        if selection != "all" or tokens.shape[1] != full:
            raise InvalidArgument(f"tokens: head {head.head_id} reads every token ({full} per image, layout ALL) "
                                  f"or the {rows * cols} patch tokens (layout PATCHES); got {tokens.shape[1]} "
                                  f"tokens with selection {selection!r}", "tokens")
        return tokens

    async def _head(self, head_id: str):
        head_id = head_id or self.default
        if not head_id:
            raise InvalidArgument("head_id: required (this service has no default head)", "head_id")
        try:
            return await self.cache.get(head_id, lambda: self._load(head_id))
        except LookupError as exc:
            raise NotFound(f"head_id: {exc.args[0] if exc.args else exc}", "head_id") from None
        except ValueError as exc:  # a saved head that fails validation, or one this service cannot run
            raise FailedPrecondition(f"head_id: head {head_id!r} cannot be served: {exc}", "head_id") from None

    def _load(self, head_id: str):
        from services.taskhead.heads import load_head

        return load_head(head_id, device=self.device, store_factory=self._open_store)

    async def _run(self, work: _Work):
        result = await self.batcher.submit(work)
        if isinstance(result, BaseException):
            raise result
        return result


def _compute(works: list[_Work]) -> list[Any]:
    import torch

    results: list[Any] = [None] * len(works)
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(works):
        groups.setdefault(id(w.head), []).append(i)
    for members in groups.values():
        head = works[members[0]].head
        try:
            x = torch.cat([works[i].tokens_btd for i in members]) if len(members) > 1 else works[members[0]].tokens_btd
            with torch.inference_mode():
                out = head.predict(x.to(head.device))
            logits = out.logits.float().cpu()
            patch = None if out.patch_logits is None else out.patch_logits.float().cpu()
            start = 0
            for i in members:
                n = works[i].tokens_btd.shape[0]
                results[i] = (logits[start:start + n], None if patch is None else patch[start:start + n])
                start += n
        except Exception as exc:  # noqa: BLE001
            for i in members:
                results[i] = exc
    return results


def _predict_response(head, logits, patch_logits, top_k: int) -> tpb.PredictResponse:
    import torch

    from sae_shared.codec import tensor_to_proto

    # labels in the smallest type that holds every class: a 224 x 224 label map is 50 KB instead of 400 KB
    labels = logits.argmax(dim=1).to(torch.uint8 if head.n_classes <= 256 else torch.int32)
    out = tpb.PredictResponse(kind=KINDS[head.kind], logits=tensor_to_proto(logits.contiguous(), field="logits"),
                              labels=tensor_to_proto(labels.contiguous(), field="labels"))
    if patch_logits is not None:
        out.patch_logits.CopyFrom(tensor_to_proto(patch_logits.contiguous(), field="patch_logits"))
    if head.kind == "classifier" and top_k > 0:
        probs = torch.softmax(logits, dim=1)
        values, classes = probs.topk(min(top_k, head.n_classes), dim=1)
        for v, c in zip(values.tolist(), classes.tolist()):
            out.top.add(classes=c, scores=v)
    return out
