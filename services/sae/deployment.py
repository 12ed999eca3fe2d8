"""The SAE deployment: encode, decode, edit (delta form) and rank latents (``saev.v1.SAE``), plus the latent
statistics the gateway's Features service reads.

SAEs load from ``saes/<sae_id>/`` in the object store (``sae_shared.sae.load_sae``) into an LRU cache bounded in
bytes; those named in the application's args load at start and stay. Encoding, the bulk of the work, is batched
across concurrent requests for the same SAE (``services.common.batching``); the rest of each request runs on the same
model thread, after its batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ray import serve

from sae_shared.proto.saev.v1 import common_pb2 as pb
from sae_shared.proto.saev.v1 import sae_pb2 as spb
from sae_shared.settings import Settings
from services.common.base import MODEL_DEPLOYMENT, ModelServiceBase
from services.common.batching import Batcher
from services.common.cache import module_bytes
from services.common.config import BatchingConfig, SAEArgs
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, TooLarge
from services.common.protos import SELECTION_ENUMS, check_layout, patch_mask, selection_name
from services.common.rpc import internal, unary
from services.sae.catalog import SAE_ID, describe_sae, latent_stats_dict, list_saes

AGGREGATIONS = {spb.TOKEN_AGGREGATION_UNSPECIFIED: "max", spb.TOKEN_AGGREGATION_MAX: "max",
                spb.TOKEN_AGGREGATION_MEAN: "mean", spb.TOKEN_AGGREGATION_SUM: "sum"}


@dataclass
class _Encode:
    sae: Any
    x_nd: Any


@serve.deployment(name="SAE", **MODEL_DEPLOYMENT)
class SAEService(ModelServiceBase):
    """Serves SAEs from the object store."""

    def __init__(self, args: SAEArgs, settings: Settings):
        self._setup(args, settings, "saes", module_bytes)
        for sae_id in args.saes:
            self.cache.put(sae_id, self._load(sae_id), pinned=True)
        self.batcher = Batcher(_encode_all, self.pool, "sae_encode")
        self.reconfigure(args.batching.model_dump())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = BatchingConfig(**user_config)
        self.default = cfg.default or (self.args.saes[0] if self.args.saes else "")
        self.batcher.configure(cfg.max_batch_size, cfg.batch_wait_s)
        self.cache.set_budget(cfg.cache_bytes)

    async def check_health(self) -> None:
        """Encode and decode a zero vector with every loaded SAE, on the model thread."""

        def probe() -> None:
            import torch

            for _, sae in self.cache.items():
                with torch.inference_mode():
                    out = sae.decode(sae.encode(torch.zeros(1, sae.d_model, device=sae.W_dec.device)))
                if not bool(torch.isfinite(out).all()):
                    raise RuntimeError("an SAE produced non-finite output on a zero input")

        await self._in_pool(probe)

    @internal
    async def ready(self) -> dict[str, Any]:
        return {"saes": [str(k) for k in self.cache.keys()], "store": self.settings.storage_url or "s3"}

    # -- internal calls (the gateway) ---------------------------------------------------------------------------

    @internal
    async def describe(self, sae_id: str) -> dict[str, Any]:
        """The SAE's contract: backbone id, layer, tokens, widths, and whether it has statistics."""
        sae = await self._sae(sae_id)
        return describe_sae(sae_id or self.default, sae)

    @internal
    async def latent_stats(self, sae_id: str, latents: list[int]) -> list[dict[str, Any]]:
        """Statistics of the given latents (FAILED_PRECONDITION when the SAE has none)."""
        sae = await self._sae(sae_id)
        stats = sae.require_stats()
        out = []
        for latent in latents:
            if not 0 <= latent < sae.d_sae:
                raise InvalidArgument(f"latent: {latent} is out of range [0, d_sae = {sae.d_sae})", "latent")
            out.append(latent_stats_dict(stats, latent))
        return out

    @internal
    async def all_latent_stats(self, sae_id: str) -> dict[str, list[float]]:
        """Every latent's frequency, max and mean (for listing and sorting in the gateway)."""
        sae = await self._sae(sae_id)
        stats = sae.require_stats()
        return {"frequency": stats.frequency.tolist(), "max": stats.max.tolist(),
                "mean": stats.mean_when_firing.tolist()}

    @internal
    async def image_latents(self, sae_id: str, activations, layout, k: int, patches, include_heatmaps: bool):
        """Features.GetImageLatents for one image's activations ``[1, T, D]`` (every token): the k latents with the
        highest max code over the selected patches, with their patch heatmaps and statistics."""
        from sae_shared.proto.saev.v1 import features_pb2 as fpb

        sae = await self._sae(sae_id)
        request = spb.TopFeaturesRequest(sae_id=sae_id, activations=activations, layout=layout)
        x_btd = self._activations(request, sae)
        n_prefix, grid = self._layout(request, x_btd.shape[1], require_all=True)
        k = k or min(10, sae.d_sae)
        if not 1 <= k <= sae.d_sae:
            raise InvalidArgument(f"k: must be in [1, d_sae = {sae.d_sae}]", "k")
        mask = patch_mask(patches, grid)
        codes = await self._encode(sae, x_btd.reshape(-1, sae.d_model))

        def run():
            import torch

            from sae_shared.codec import tensor_to_proto

            patches_ps = codes.reshape(x_btd.shape[1], sae.d_sae)[n_prefix:]  # [n_patches, d_sae]
            values, latents = patches_ps[torch.from_numpy(mask)].amax(0).topk(k)
            out = fpb.GetImageLatentsResponse(layout=layout)
            for latent, value in zip(latents.tolist(), values.tolist()):
                item = out.latents.add(latent=latent, value=value)
                if include_heatmaps:
                    heat = patches_ps[:, latent].reshape(grid).contiguous()
                    item.heatmap.CopyFrom(tensor_to_proto(heat, field="heatmap"))
                if sae.stats is not None:
                    item.stats.CopyFrom(fpb.LatentStats(**latent_stats_dict(sae.stats, latent)))
            return out

        return await self._in_pool(run)

    # -- internal calls: reads of a committed feature analysis (services.sae.analysis_reads) ---------------------

    async def _analysis(self, fn, *args):
        """``fn(store, *args)`` on a worker thread (store reads and PNG rendering; the model thread stays free)."""
        from services.sae.analysis_reads import mapped

        store = self._open_store()
        return await asyncio.to_thread(mapped, fn, store, *args)

    @internal
    async def latent_exemplars(self, request):
        """Features.GetLatentExemplars."""
        from services.sae.analysis_reads import latent_exemplars

        return await self._analysis(latent_exemplars, request)

    @internal
    async def tile(self, sae_id: str, latent: int, rank: int, kind: str) -> bytes:
        """One exemplar's tile, PNG bytes."""
        from services.sae.analysis_reads import tile_png

        return await self._analysis(tile_png, sae_id, latent, rank, kind)

    @internal
    async def latent_histogram(self, request):
        """Features.GetLatentHistogram (the SAE's statistics give the frequency when the analysis has none)."""
        from services.sae.analysis_reads import latent_histogram

        try:
            stats = (await self._sae(request.sae_id)).stats if request.sae_id else None
        except NotFound:  # the analysis may outlive its SAE's folder; then the analysis answers alone
            stats = None
        return await self._analysis(latent_histogram, request, stats)

    @internal
    async def analysed_images(self, request):
        """Features.ListAnalysedImages."""
        from services.sae.analysis_reads import list_images

        return await self._analysis(list_images, request)

    @internal
    async def analysed_image_latents(self, request):
        """Features.GetAnalysedImageLatents."""
        from services.sae.analysis_reads import image_latents

        return await self._analysis(image_latents, request)

    @internal
    async def source_image(self, sae_id: str, image_index: int) -> bytes:
        """An analysed image's source pixels, PNG bytes."""
        from services.sae.analysis_reads import source_image

        return await self._analysis(source_image, sae_id, image_index)

    @internal
    async def preview(self, sae_id: str, activations, layout, edits):
        """Interventions.PreviewIntervention: each edited latent's codes on the patch grid before and after."""
        from sae_shared.proto.saev.v1 import interventions_pb2 as ipb

        sae = await self._sae(sae_id)
        request = spb.EditRequest(sae_id=sae_id, activations=activations, layout=layout, edits=edits)
        x_btd = self._activations(request, sae)
        if x_btd.dim() != 3:
            raise InvalidArgument(f"activations: must be [n_images, n_tokens, {sae.d_model}]", "activations")
        n_prefix, grid = self._layout(request, x_btd.shape[1], require_all=True)
        self._check_elements(x_btd.shape[0] * x_btd.shape[1] * sae.d_sae, "activations")
        max_act = sae.stats.max if sae.stats is not None else None
        codes = await self._encode(sae, x_btd.reshape(-1, sae.d_model))

        def run():
            from sae_shared.codec import tensor_to_proto
            from services.sae.edits import apply_edits

            codes_bts = codes.reshape(*x_btd.shape[:2], sae.d_sae)
            edited_bts = apply_edits(codes_bts, edits, n_prefix=n_prefix, grid=grid, max_activation=max_act)
            out = ipb.PreviewInterventionResponse(layout=layout)
            latents = list(dict.fromkeys(int(e.latent) for e in edits))
            for i in range(x_btd.shape[0]):
                for latent in latents:
                    before = codes_bts[i, n_prefix:, latent].reshape(grid).contiguous()
                    after = edited_bts[i, n_prefix:, latent].reshape(grid).contiguous()
                    out.previews.add(image_index=i, latent=latent,
                                     codes_before=tensor_to_proto(before, field="codes_before"),
                                     codes_after=tensor_to_proto(after, field="codes_after"))
            return out

        return await self._in_pool(run)

    # -- RPCs ---------------------------------------------------------------------------------------------------

    @unary(spb.ListSAEsResponse)
    async def ListSAEs(self, request: spb.ListSAEsRequest) -> spb.ListSAEsResponse:
        """SAEs in the object store (committed ones) and those loaded, optionally filtered."""
        infos = await asyncio.to_thread(self._list_infos)
        out = spb.ListSAEsResponse()
        for info in infos:
            if request.backbone_id and info["backbone_id"] != request.backbone_id:
                continue
            if request.HasField("layer") and info["layer"] != request.layer:
                continue
            out.saes.add(sae_id=info["sae_id"], backbone_id=info["backbone_id"], layer=info["layer"],
                         d_model=info["d_model"], d_sae=info["d_sae"], architecture=info["architecture"],
                         tokens=SELECTION_ENUMS.get(info["tokens"], pb.TOKEN_SELECTION_UNSPECIFIED),
                         analyzed=info["analyzed"], has_statistics=info["has_statistics"])
        return out

    @unary(spb.EncodeResponse)
    async def Encode(self, request: spb.EncodeRequest) -> spb.EncodeResponse:
        """Activations ``[..., d_model]`` -> codes, sparse (CSR, token_shape = leading shape) or dense."""
        sae = await self._sae(request.sae_id)
        x = self._activations(request, sae)
        lead = tuple(x.shape[:-1])
        n_tokens = x.reshape(-1, sae.d_model).shape[0]
        if n_tokens * sae.d_sae > self.limits.max_tensor_elements:
            raise TooLarge(f"activations: {n_tokens} tokens x {sae.d_sae} latents exceed the limit of "
                           f"{self.limits.max_tensor_elements} code elements; send fewer tokens", "activations")
        codes_ns = await self._encode(sae, x.reshape(-1, sae.d_model))
        return await self._in_pool(self._encode_response, codes_ns, lead, sae.d_sae, request.dense)

    @unary(spb.DecodeResponse)
    async def Decode(self, request: spb.DecodeRequest) -> spb.DecodeResponse:
        """Codes (CSR or dense ``[..., d_sae]``) -> reconstruction ``[..., d_model]``."""
        from sae_shared.codec import csr_to_dense, proto_to_sparse, proto_to_tensor, tensor_to_proto

        sae = await self._sae(request.sae_id)
        kind = request.WhichOneof("codes")
        lim = dict(max_bytes=self.limits.max_request_bytes, max_elements=self.limits.max_tensor_elements)
        if kind is None:
            raise InvalidArgument("codes: send sparse or dense codes", "codes")
        if kind == "sparse":
            csr = proto_to_sparse(request.sparse, field="sparse", **lim)
            if csr.d_sae != sae.d_sae:
                raise InvalidArgument(f"sparse.d_sae: {csr.d_sae} does not match the SAE's d_sae = {sae.d_sae}",
                                      "sparse.d_sae")
            self._check_elements(csr.n_tokens * sae.d_sae, "sparse")
            codes = csr_to_dense(csr).float()
            lead = tuple(csr.token_shape) if csr.token_shape is not None else (csr.n_tokens,)
        else:
            codes = proto_to_tensor(request.dense, field="dense", **lim)
            if not codes.is_floating_point() or codes.dim() < 1 or codes.shape[-1] != sae.d_sae:
                raise InvalidArgument(f"dense: must be float [..., d_sae = {sae.d_sae}], got {codes.dtype} "
                                      f"{list(codes.shape)}", "dense")
            lead = tuple(codes.shape[:-1])
            codes = codes.float()
        if (_numel(lead) * sae.d_model) * 4 > self.limits.max_request_bytes:
            raise TooLarge("the reconstruction would exceed the response limit; send fewer tokens", "codes")

        def run():
            import torch

            with torch.inference_mode():
                recon = sae.decode(codes.reshape(-1, sae.d_sae).to(sae.W_dec.device)).cpu().reshape(*lead, sae.d_model)
            return spb.DecodeResponse(reconstruction=tensor_to_proto(recon.contiguous(), field="reconstruction"))

        return await self._in_pool(run)

    @unary(spb.EditResponse)
    async def Edit(self, request: spb.EditRequest) -> spb.EditResponse:
        """Activations + edits -> ``x + (decode(f') - decode(f))`` at the edited tokens (bit-exact ``x`` wherever no
        code changes): ``sae_shared.interventions.edit_residual``."""
        sae = await self._sae(request.sae_id)
        x_btd = self._activations(request, sae)
        if x_btd.dim() != 3:
            raise InvalidArgument(f"activations: must be [n_images, n_tokens, {sae.d_model}]", "activations")
        _, grid = self._layout(request, x_btd.shape[1], require_all=True)
        self._check_elements(x_btd.shape[0] * x_btd.shape[1] * sae.d_sae, "activations")
        from services.sae.edits import layout_from_proto, to_library_edits

        edits = to_library_edits(request.edits, n_images=x_btd.shape[0], grid=grid, d_sae=sae.d_sae)
        layout = layout_from_proto(request.layout, sae.d_model)
        codes = await self._encode(sae, x_btd.reshape(-1, sae.d_model)) if request.return_codes else None

        def run():
            from sae_shared.codec import dense_to_csr, sparse_to_proto, tensor_to_proto
            from sae_shared.interventions import edit_residual

            result = edit_residual(sae, x_btd, edits, layout) if edits else None
            x_new = result.resid_btd if result is not None else x_btd
            out = spb.EditResponse(edited_activations=tensor_to_proto(x_new.contiguous(), field="edited_activations"))
            if request.return_drift:
                out.drift.extend(_drift_messages(sae, result, x_btd.shape[0]))
            if codes is not None:
                before = codes.reshape(*x_btd.shape[:2], sae.d_sae).clone()
                after = before.clone()
                if result is not None:  # the edited tokens' codes as the library computed them
                    before[result.tokens_bt] = result.codes_ns.cpu()
                    after[result.tokens_bt] = result.edited_ns.cpu()
                out.codes_before.CopyFrom(sparse_to_proto(dense_to_csr(before), field="codes_before"))
                out.codes_after.CopyFrom(sparse_to_proto(dense_to_csr(after), field="codes_after"))
            return out

        return await self._in_pool(run)

    @unary(spb.TopFeaturesResponse)
    async def TopFeatures(self, request: spb.TopFeaturesRequest) -> spb.TopFeaturesResponse:
        """The k latents with the highest aggregated code per image, over the selected patches (or all tokens)."""
        sae = await self._sae(request.sae_id)
        x_btd = self._activations(request, sae)
        if x_btd.dim() != 3:
            raise InvalidArgument(f"activations: must be [n_images, n_tokens, {sae.d_model}]", "activations")
        k = request.k or min(10, sae.d_sae)
        if not 1 <= k <= sae.d_sae:
            raise InvalidArgument(f"k: must be in [1, d_sae = {sae.d_sae}], got {request.k}", "k")
        how = AGGREGATIONS.get(request.aggregation)
        if how is None:
            raise InvalidArgument("aggregation: choose MAX, MEAN or SUM", "aggregation")
        rows = self._rows(request, x_btd.shape[1])
        self._check_elements(x_btd.shape[0] * len(rows) * sae.d_sae, "activations")
        x_sel = x_btd[:, rows]
        codes = await self._encode(sae, x_sel.reshape(-1, sae.d_model))

        def run():
            codes_bts = codes.reshape(x_sel.shape[0], x_sel.shape[1], sae.d_sae)
            score_bs = {"max": lambda c: c.amax(1), "mean": lambda c: c.mean(1), "sum": lambda c: c.sum(1)}[how](
                codes_bts)
            values, latents = score_bs.topk(k, dim=1)
            out = spb.TopFeaturesResponse()
            for v_row, l_row in zip(values.tolist(), latents.tolist()):
                img = out.images.add()
                for latent, value in zip(l_row, v_row):
                    img.latents.add(latent=latent, value=value)
            return out

        return await self._in_pool(run)

    # -- helpers ------------------------------------------------------------------------------------------------

    def _activations(self, request, sae):
        from sae_shared.codec import proto_to_tensor

        if not request.HasField("activations"):
            raise InvalidArgument(f"activations: missing; send float [..., {sae.d_model}]", "activations")
        x = proto_to_tensor(request.activations, field="activations", max_bytes=self.limits.max_request_bytes,
                            max_elements=self.limits.max_tensor_elements)
        if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != sae.d_model or x.numel() == 0:
            raise InvalidArgument(f"activations: must be a non-empty float tensor [..., d_model = {sae.d_model}], "
                                  f"got {x.dtype} {list(x.shape)}", "activations")
        return x.float()

    def _layout(self, request, n_tokens: int, *, require_all: bool) -> tuple[int, tuple[int, int]]:
        """(prefix tokens, patch grid) from the request's layout, checked against the token axis."""
        if not request.HasField("layout"):
            raise InvalidArgument("layout: missing; send the TokenLayout GetActivations returned", "layout")
        lo = request.layout
        check_layout(lo, n_tokens)
        if require_all and selection_name(lo.selection, "layout.selection") != "all":
            raise InvalidArgument("layout.selection: edits need every token (ALL), as GetActivations returns with "
                                  "tokens=ALL", "layout.selection")
        return lo.n_cls + lo.n_registers, (lo.grid_height, lo.grid_width)

    def _rows(self, request: spb.TopFeaturesRequest, n_tokens: int) -> list[int]:
        """Token rows TopFeatures aggregates over: the selected patches, or every token when unset."""
        import numpy as np

        if not request.HasField("patches"):
            return list(range(n_tokens))
        if not request.HasField("layout"):
            raise InvalidArgument("layout: needed to resolve a patch selection", "layout")
        lo = request.layout
        check_layout(lo, n_tokens)
        sel = selection_name(lo.selection, "layout.selection")
        if sel not in ("all", "patches"):
            raise InvalidArgument("patches: a patch selection needs activations with patch tokens (ALL or PATCHES)",
                                  "patches")
        offset = lo.n_cls + lo.n_registers if sel == "all" else 0
        mask = patch_mask(request.patches, (lo.grid_height, lo.grid_width))
        return (np.flatnonzero(mask) + offset).tolist()

    def _check_elements(self, n: int, field: str) -> None:
        if n > self.limits.max_tensor_elements:
            raise TooLarge(f"{field}: the codes would have {n} elements, more than the limit of "
                           f"{self.limits.max_tensor_elements}; send fewer tokens", field)

    async def _sae(self, sae_id: str):
        sae_id = sae_id or self.default
        if not sae_id:
            raise InvalidArgument("sae_id: required", "sae_id")
        if not SAE_ID.match(sae_id):
            raise InvalidArgument(f"sae_id: {sae_id[:80]!r} is not an SAE id (letters, digits and ._:@+-)", "sae_id")
        return await self.cache.get(sae_id, lambda: self._load(sae_id))

    def _load(self, sae_id: str):
        from sae_shared.sae import load_sae
        from sae_shared.storage import IncompleteArtifact, NotFound as StoreNotFound

        try:
            sae = load_sae(f"saes/{sae_id}", store=self._open_store(), device=self.device)
        except (IncompleteArtifact, StoreNotFound):
            raise NotFound(f"sae_id: no SAE {sae_id!r} (nothing committed under saes/{sae_id}/)", "sae_id") from None
        except ValueError as exc:  # InvalidSAEFile: the artifact is broken, not the request
            raise FailedPrecondition(f"sae_id: SAE {sae_id!r} cannot be loaded: {exc}", "sae_id") from None
        return sae.eval()

    def _list_infos(self) -> list[dict[str, Any]]:
        try:
            store = self._open_store()
        except Exception:  # noqa: BLE001 - no store configured: list what is loaded
            store = None
        return list_saes(store, {str(k): sae for k, sae in self.cache.items()})

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _encode_response(self, codes_ns, lead, d_sae, dense: bool) -> spb.EncodeResponse:
        from sae_shared.codec import dense_to_csr, sparse_to_proto, tensor_to_proto

        codes = codes_ns.reshape(*lead, d_sae)
        if dense:
            if codes.numel() * 4 > self.limits.max_request_bytes:
                raise TooLarge("dense codes would exceed the response limit; ask for sparse codes or send fewer "
                               "tokens", "dense")
            return spb.EncodeResponse(dense=tensor_to_proto(codes.contiguous(), field="dense"))
        csr = dense_to_csr(codes if codes.dim() >= 2 else codes.reshape(1, d_sae))
        return spb.EncodeResponse(sparse=sparse_to_proto(csr, field="sparse",
                                                         max_bytes=self.limits.max_request_bytes))

    async def _encode(self, sae, x_nd):
        result = await self.batcher.submit(_Encode(sae, x_nd))
        if isinstance(result, BaseException):
            raise result
        return result


def _encode_all(works: list[_Encode]) -> list[Any]:
    """Dense codes per request; requests for the same SAE share one encode."""
    import torch

    results: list[Any] = [None] * len(works)
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(works):
        groups.setdefault(id(w.sae), []).append(i)
    for members in groups.values():
        sae = works[members[0]].sae
        try:
            x = torch.cat([works[i].x_nd for i in members]) if len(members) > 1 else works[members[0]].x_nd
            with torch.inference_mode():
                codes = sae.encode(x.to(sae.W_dec.device)).cpu()
            start = 0
            for i in members:
                n = works[i].x_nd.shape[0]
                results[i] = codes[start:start + n]
                start += n
        except Exception as exc:  # noqa: BLE001
            for i in members:
                results[i] = exc
    return results


def _drift_messages(sae, result, n_images: int) -> list[pb.OffTargetDrift]:
    """Per image, the library's off-target drift of an edit (``sae_shared.interventions.off_target_drift``)."""
    if result is None:  # no edits: nothing moved
        return [pb.OffTargetDrift() for _ in range(n_images)]
    from sae_shared.interventions import off_target_drift

    rows_n = result.tokens_bt.nonzero()[:, 0]
    d = off_target_drift(sae, result.resid_btd[result.tokens_bt], result.edited_ns, result.pairs_m2, rows_n,
                         n_images)
    return [pb.OffTargetDrift(mean_abs=float(d.mean_abs[i]), max_abs=float(d.max_abs[i]),
                              relative=float(d.relative[i]), flips_per_token=float(d.flips_per_token[i]),
                              target_error=float(d.target_error[i]), n_tokens=int(d.n_tokens[i]))
            for i in range(n_images)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
