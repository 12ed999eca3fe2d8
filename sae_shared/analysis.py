"""Feature analysis (DESIGN.md §1, "hypothesise"): the top exemplars of every latent with their patch heatmaps, and
the reverse index (image -> its strongest latents), in one streaming pass over a shard set.

The pass
--------
Rows (image views) are read in recording order, ``batch_rows`` at a time (ranged reads of the CLS and patch tokens
of the analysed layer, prefetched on threads). Each batch is encoded by the SAE (dense codes ``[B, P, S]``, P patches,
S = d_sae) and folded into

- a running **top-k per latent by patch activation** (a view's activation = the max over its patches) and one **by
  CLS activation** (when the shard set has a CLS token). Each keeps ``values [S, k]``, ``rows [S, k]`` (global row,
  -1 = empty slot) and the per-patch activation map of every kept view, ``maps [S, k, P]`` in float16. The merge is
  vectorised: only latents whose best value in the batch beats their current k-th value are touched; their k kept
  and B new candidates are sorted together (stable, descending) and the first k kept. Maps stay in fixed slots:
  only the views that enter are written (from the batch's codes), into the slots of the views they evict, so late
  batches, which change few latents, cost little beyond the encode. A stable sort of (kept, then new rows in order)
  prefers the earlier row among equal values, so the result is exactly a stable descending sort of every row's
  value, whatever the batch size: the brute force. Only positive activations are exemplars; a latent firing on
  fewer than k views has empty slots.
- the **reverse index**: per view its ``reverse_n`` strongest latents (max over patches), later merged per image
  (an image's latents are the max over its views; the union of the views' top-n holds the image's top-n exactly).
- per-latent counts: view frequency (views with at least one firing patch) and CLS frequency; and, when the SAE
  carries no statistics of its own (``sae.stats``; they cost two more passes over the dense codes), the patch-token
  firing frequency and mean value.

Memory is bounded by the state, ``2 * S * k * P`` float16 maps plus ``n_rows * reverse_n`` index entries, not by
the data. The state is a checkpoint: :meth:`ExemplarAnalysis.state_bytes` (safetensors bytes) taken between batches
resumes the pass exactly (:class:`ExemplarAnalysis` ``state=``), refused if it belongs to another analysis.

Result layout (``saes/<sae_id>/analysis/``, one artifact: complete or invisible)
-----------------------------------------------------------------------------
::

    analysis.json                  schema, analysis_id, inputs (sae, its weights' sha256, acts_id, layer, k, n),
                                   token layout (patch grid, CLS), counts, dataset spec for redrawing views, tiles
    exemplars-patch.safetensors    values f32 [S, k], rows i64 [S, k] (-1 empty), image i32 [S, k] (position in
                                   images.json), image_index i64 [S, k] (dataset index), crop i32 [S, k, 4]
                                   (left, top, right, bottom; -1 = whole image), flip u8 [S, k],
                                   maps f16 [S, k, grid_rows, grid_cols]
    exemplars-cls.safetensors      the same, ranked by CLS activation (only when the shard set has a CLS token)
    latents.safetensors            per latent: view_frequency f64, cls_frequency f64, max_patch f32, max_cls f32,
                                   scale f32 (heatmap colour scale: the max over its exemplars' maps); frequency f64
                                   and mean_value f32 over the patch tokens when computed (``token_stats``)
    reverse-index.safetensors      latents i32 [n_images, n] (-1 pad), values f16 [n_images, n], image_index i64
    images.json                    {"image_index": [...], "image_id": [...], "label": [...]}: the analysed images,
                                   in recording order; the rows of reverse-index and the ``image`` of exemplars
    tiles.json + tiles-patch.pack  pre-rendered PNG tiles (``sae_shared.tiles``), when rendered

Readers (:class:`AnalysisReader`, :func:`open_analysis`) fetch one latent's exemplars or one image's latents with
ranged GETs (safetensors keeps every tensor contiguous, row-major: latent ``i``'s slots are one byte range).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from sae_shared.datasets import View
from sae_shared.shards import ShardSet, ShardSetError

if TYPE_CHECKING:
    from sae_shared.sae import SparseAutoencoder

SCHEMA = 1
FORMAT = "saev-platform/analysis"
ANALYSIS_JSON = "analysis.json"
EXEMPLAR_FILES = {"patch": "exemplars-patch.safetensors", "cls": "exemplars-cls.safetensors"}
LATENTS_FILE = "latents.safetensors"
REVERSE_FILE = "reverse-index.safetensors"
IMAGES_FILE = "images.json"
KINDS = ("patch", "cls")
FP16_MAX = 65504.0
STATE_FORMAT = "saev-platform/analysis-state"
MAX_STATE_BYTES = 16 << 30
"""Refuse an analysis whose running state (mostly the float16 heatmaps of every kept view) would exceed this."""


class LatentOutOfRange(IndexError):
    """A latent index beyond the analysed SAE's ``d_sae`` (the caller's mistake; any other IndexError while reading
    is a damaged analysis)."""


class AnalysisError(ValueError):
    """The analysis cannot run on these inputs, or a stored analysis / state is not what it should be."""


class NotAnalysed(LookupError):
    """The SAE has no (complete) feature analysis; the message names the command that makes one."""


def analysis_prefix(sae_id: str) -> str:
    """Where the analysis of ``sae_id`` lives: ``saes/<sae_id>/analysis``."""
    return f"saes/{sae_id}/analysis"


def cache_prefix(sae_id: str, analysis_id: str) -> str:
    """Where on-demand renderings of one analysis are cached (outside the artifact, keyed by its id)."""
    return f"saes/{sae_id}/analysis-cache/{analysis_id}"


def compute_analysis_id(*, sae_sha256: str, acts_id: str, layer: int, top_k: int, reverse_n: int,
                        max_rows: int | None, tiles: dict | None = None) -> str:
    """Name an analysis by its inputs: the same inputs give the same id (a second run reuses the first)."""
    doc = {"schema": SCHEMA, "sae": sae_sha256, "acts": acts_id, "layer": layer, "k": top_k, "n": reverse_n,
           "max_rows": max_rows, "tiles": tiles or {}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------------ the pass


class _TopSet:
    """A running top-k per latent: values and rows ranked (value descending, then row ascending), and the per-patch
    maps of the kept views. Maps sit in fixed slots (``slot[s, j]`` = where the map of rank ``j`` is): a merge
    reorders only the small value / row / slot tables and writes the maps of the views that enter, into the slots of
    the ones they evict, so a batch that changes little costs little."""

    def __init__(self, d_sae: int, k: int, n_patches: int, device: torch.device, maps: bool):
        self.k = k
        self.values = torch.zeros(d_sae, k, dtype=torch.float32, device=device)
        self.rows = torch.full((d_sae, k), -1, dtype=torch.int64, device=device)
        self.slot = torch.arange(k, device=device).repeat(d_sae, 1)
        self.maps = torch.zeros(d_sae, k, n_patches, dtype=torch.float16, device=device) if maps else None

    @torch.no_grad()
    def merge(self, values_bs: torch.Tensor, row0: int, codes_bps: torch.Tensor | None) -> int:
        """Fold a batch's per-row values ``[B, S]`` (rows ``row0..row0+B-1``) in; ``codes_bps`` gives the maps.
        Returns the number of latents whose top-k changed."""
        k = self.k
        b = values_bs.shape[0]
        best_s = values_bs.amax(0)
        changed = (best_s > self.values[:, -1]).nonzero().squeeze(1)
        m = changed.numel()
        if m == 0:
            return 0
        # Kept entries (ranked) then the batch's rows (in order): a stable sort ranks by value, then by row.
        cand_v = torch.cat([self.values[changed], values_bs[:, changed].t()], 1)  # [m, k + B]
        order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]  # [m, k]
        batch_rows = torch.arange(row0, row0 + b, device=order.device).expand(m, b)
        self.values[changed] = cand_v.gather(1, order)
        self.rows[changed] = torch.cat([self.rows[changed], batch_rows], 1).gather(1, order)
        # Slots: survivors keep theirs; entering views take the slots of the evicted ones. (Every entering view
        # has a positive value: the kept zeros of empty slots rank before the batch's zeros.)
        old_slot = self.slot[changed]
        from_old = order < k
        kept = torch.zeros(m, k + 1, dtype=torch.int32, device=order.device)  # column k collects the batch's
        kept = kept.scatter_add_(1, torch.where(from_old, order, k), torch.ones_like(order, dtype=torch.int32))
        kept = kept[:, :k] > 0  # old ranks that survive
        freed = torch.where(kept, k, old_slot).sort(dim=1).values  # evicted slots first (k: sentinel)
        enter = ~from_old
        nth = (enter.cumsum(1) - 1).clamp(min=0)  # entering view j is the nth of its latent
        self.slot[changed] = torch.where(from_old, old_slot.gather(1, order.clamp(max=k - 1)), freed.gather(1, nth))
        if self.maps is not None and codes_bps is not None:
            li, ji = enter.nonzero(as_tuple=True)
            if li.numel():
                lat = changed[li]
                brow = order[li, ji] - k
                self.maps[lat, self.slot[lat, ji]] = codes_bps[brow, :, lat].clamp(max=FP16_MAX).to(torch.float16)
        return m

    def ranked_maps(self) -> torch.Tensor | None:
        """``[S, k, P]`` maps in rank order."""
        if self.maps is None:
            return None
        return self.maps.gather(1, self.slot.unsqueeze(2).expand_as(self.maps))


class ExemplarAnalysis:
    """The streaming pass of one SAE over one layer of a shard set (see the module docs).

    ``sae`` must have been trained on the shard set's backbone and ``layer`` (default: its contract's); it is
    applied to the patch tokens and to the CLS token, whatever token selection it was trained on. ``state`` resumes
    from :meth:`state_bytes`. Iterate :meth:`batches` (one step per batch) and then call :meth:`finish`.
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        shard_set: ShardSet,
        *,
        top_k: int = 16,
        reverse_n: int = 16,
        layer: int | None = None,
        max_rows: int | None = None,
        batch_rows: int | None = None,
        max_codes_elements: int | None = None,
        prefetch: int = 2,
        device: str | torch.device | None = None,
        state: bytes | None = None,
        identity: dict | None = None,
        token_stats: bool | None = None,
    ):
        meta = shard_set.metadata
        contract = sae.contract
        if layer is None:
            if contract is None:
                raise AnalysisError("this SAE records no contract: pass the layer to analyse")
            layer = contract.layer
        if contract is not None:
            from sae_shared.sae import ContractMismatch

            if contract.backbone_id != meta.backbone_id:
                raise ContractMismatch(f"SAE contract mismatch: the SAE reads {contract.backbone_id!r}, shard set "
                                       f"{shard_set.acts_id} comes from {meta.backbone_id!r}")
            if contract.layer != layer:
                raise ContractMismatch(f"SAE contract mismatch: the SAE reads layer {contract.layer}, not {layer}")
        meta.layer_position(layer)
        if meta.d_model != sae.d_model:
            raise ShardSetError(f"shard set {shard_set.acts_id} holds d_model={meta.d_model}; the SAE reads "
                                f"{sae.d_model}")
        if not 1 <= top_k <= 1024:
            raise AnalysisError(f"top_k must be in [1, 1024], got {top_k}")
        if reverse_n < 1:
            raise AnalysisError(f"reverse_n must be >= 1, got {reverse_n}")
        lay = meta.token_layout
        self.grid = tuple(lay.patch_grid)
        self.n_patches = self.grid[0] * self.grid[1]
        self.has_patches = self.n_patches > 0
        self.has_cls = lay.cls_index is not None
        if not (self.has_patches or self.has_cls):
            raise AnalysisError(f"shard set {shard_set.acts_id} recorded neither patch tokens nor a CLS token "
                                f"(tokens={meta.tokens!r}); record it with tokens 'all' or 'patches'")
        self.positions = ([lay.cls_index] if self.has_cls else []) + (
            lay.select("patches") if self.has_patches else [])
        self.patch_offset = 1 if self.has_cls else 0

        self.sae, self.shard_set, self.meta, self.layer = sae, shard_set, meta, layer
        self.top_k, self.d_sae = top_k, sae.d_sae
        self.reverse_n = min(reverse_n, sae.d_sae)
        self.max_rows = max_rows
        self.n_rows = meta.n_rows if max_rows is None else min(max_rows, meta.n_rows)
        self.device = torch.device(device) if device is not None else sae.W_enc.device
        if self.device != sae.W_enc.device:
            sae = sae.to(self.device)
            self.sae = sae
        sae.eval()
        if max_codes_elements is None:
            max_codes_elements = 1 << (28 if self.device.type == "cuda" else 25)
        per_row = max(self.n_patches, 1) * self.d_sae
        self.batch_rows = batch_rows or max(1, min(512, max_codes_elements // per_row))
        self.prefetch = max(1, prefetch)
        # Firing counts and sums over every patch token cost two more passes over the dense codes (a third of
        # the encode on a CPU); they are only needed when the SAE has no statistics of its own.
        self.token_stats = (sae.stats is None) if token_stats is None else bool(token_stats)
        self.identity = dict(identity or {})
        self.identity.update({"acts_id": shard_set.acts_id, "layer": layer, "top_k": top_k,
                              "reverse_n": self.reverse_n, "n_rows": self.n_rows, "d_sae": self.d_sae,
                              "token_stats": self.token_stats})

        n_sets = int(self.has_patches) + int(self.has_cls)
        need = n_sets * self.d_sae * top_k * (2 * self.n_patches + 24)
        if need > MAX_STATE_BYTES:
            raise AnalysisError(f"the running top-k would hold {need / 2**30:.1f} GiB (d_sae={self.d_sae} x top_k="
                                f"{top_k} x {self.n_patches} patches x {n_sets} rankings); lower top_k")
        dev = self.device
        self.patch = _TopSet(self.d_sae, top_k, self.n_patches, dev, maps=True) if self.has_patches else None
        self.cls = _TopSet(self.d_sae, top_k, self.n_patches, dev, maps=self.has_patches) if self.has_cls else None
        self.token_count = torch.zeros(self.d_sae, dtype=torch.int64, device=dev)
        self.token_sum = torch.zeros(self.d_sae, dtype=torch.float64, device=dev)
        self.view_count = torch.zeros(self.d_sae, dtype=torch.int64, device=dev)
        self.cls_count = torch.zeros(self.d_sae, dtype=torch.int64, device=dev)
        self._rev_idx: list[torch.Tensor] = []
        self._rev_val: list[torch.Tensor] = []
        self.next_row = 0
        self.latents_updated = 0
        self.seconds = 0.0
        if state is not None:
            self.load_state(state)

    # -- state ------------------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, s in (("patch", self.patch), ("cls", self.cls)):
            if s is None:
                continue
            out[f"{name}_values"], out[f"{name}_rows"], out[f"{name}_slot"] = s.values, s.rows, s.slot
            if s.maps is not None:
                out[f"{name}_maps"] = s.maps
        out.update(token_count=self.token_count, token_sum=self.token_sum, view_count=self.view_count,
                   cls_count=self.cls_count, rev_idx=self._rev_cat(self._rev_idx, torch.int32),
                   rev_val=self._rev_cat(self._rev_val, torch.float32))
        return out

    def _rev_cat(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if len(parts) != 1:
            joined = torch.cat(parts) if parts else torch.zeros(0, self.reverse_n, dtype=dtype)
            parts[:] = [joined]
        return parts[0]

    def state_bytes(self) -> bytes:
        """The whole resume point (safetensors bytes): running top-k, maps, counts, reverse index so far, position."""
        from safetensors.torch import save

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self._tensors().items()}
        meta = {"format": STATE_FORMAT, "schema": str(SCHEMA), "next_row": str(self.next_row),
                "seconds": repr(self.seconds), "identity": json.dumps(self.identity, sort_keys=True)}
        return save(tensors, metadata=meta)

    def load_state(self, data: bytes) -> None:
        """Restore :meth:`state_bytes`; :class:`AnalysisError` if it is unreadable or of another analysis."""
        try:
            tensors = _load_safetensors(data)
            header_meta = _safetensors_metadata(data)
        except Exception as exc:  # noqa: BLE001 - any malformed file
            raise AnalysisError(f"unreadable analysis state: {exc}") from None
        if header_meta.get("format") != STATE_FORMAT or header_meta.get("schema") != str(SCHEMA):
            raise AnalysisError("not an analysis state of this schema")
        identity = json.loads(header_meta.get("identity", "{}"))
        if identity != json.loads(json.dumps(self.identity, sort_keys=True)):
            raise AnalysisError(f"the state belongs to another analysis ({identity} != {self.identity})")
        expected = {k: (tuple(v.shape), v.dtype) for k, v in self._tensors().items() if not k.startswith("rev_")}
        for name, (shape, dtype) in expected.items():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                raise AnalysisError(f"analysis state: tensor {name} missing or of the wrong shape/dtype")
        next_row = int(header_meta["next_row"])
        if not 0 <= next_row <= self.n_rows or tensors["rev_idx"].shape != (next_row, self.reverse_n):
            raise AnalysisError("analysis state: inconsistent position")
        dev = self.device
        for name, s in (("patch", self.patch), ("cls", self.cls)):
            if s is None:
                continue
            s.values, s.rows = tensors[f"{name}_values"].to(dev), tensors[f"{name}_rows"].to(dev)
            s.slot = tensors[f"{name}_slot"].to(dev)
            if s.maps is not None:
                s.maps = tensors[f"{name}_maps"].to(dev)
        self.token_count = tensors["token_count"].to(dev)
        self.token_sum = tensors["token_sum"].to(dev)
        self.view_count = tensors["view_count"].to(dev)
        self.cls_count = tensors["cls_count"].to(dev)
        self._rev_idx, self._rev_val = [tensors["rev_idx"]], [tensors["rev_val"]]
        self.next_row = next_row
        self.seconds = float(header_meta.get("seconds", "0"))

    # -- reading ----------------------------------------------------------------------------------------------

    def _plan(self, start: int) -> list[tuple[int, int, range]]:
        out = []
        meta = self.meta
        for shard in range(meta.n_shards):
            rows = meta.shard_rows(shard)
            for r0 in range(rows.start, min(rows.stop, self.n_rows), self.batch_rows):
                r1 = min(r0 + self.batch_rows, rows.stop, self.n_rows)
                if r1 <= start:
                    continue
                r0 = max(r0, start)
                out.append((r0, shard, range(r0 - rows.start, r1 - rows.start)))
        return out

    def _read(self, shard: int, rows: range) -> torch.Tensor:
        return self.shard_set.read(shard, rows, self.layer, self.positions)

    def batches(self, check: Callable[[], None] | None = None) -> Iterator[int]:
        """Process the remaining batches; yields the number of rows done after each (a safe point to checkpoint,
        report progress or stop)."""
        plan = self._plan(self.next_row)
        pool = ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="analysis-read")
        pending: deque[tuple[int, Future]] = deque()
        i = 0
        try:
            while i < len(plan) or pending:
                while i < len(plan) and len(pending) < 2 * self.prefetch:
                    row0, shard, rows = plan[i]
                    pending.append((row0, pool.submit(self._read, shard, rows)))
                    i += 1
                row0, fut = pending.popleft()
                acts = fut.result()
                if check is not None:
                    check()
                t0 = time.perf_counter()
                self.update(row0, acts)
                self.seconds += time.perf_counter() - t0
                yield self.next_row
        finally:
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def run(self, check: Callable[[], None] | None = None) -> None:
        for _ in self.batches(check):
            pass

    # -- one batch --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, row0: int, acts_btd: torch.Tensor) -> None:
        """Fold rows ``row0 .. row0 + B - 1`` (``[B, tokens, d]`` of ``self.positions``: CLS first, then patches)."""
        if row0 != self.next_row:
            raise AnalysisError(f"rows must come in order: expected row {self.next_row}, got {row0}")
        b = acts_btd.shape[0]
        x = acts_btd.to(self.device, torch.float32, non_blocking=True)
        s = self.d_sae
        codes_bps = None
        if self.has_patches:
            p = self.n_patches
            xp = x[:, self.patch_offset:self.patch_offset + p].reshape(b * p, -1)
            codes_bps = self.sae.encode(xp).view(b, p, s)
            view_bs = codes_bps.amax(1)
            if self.token_stats:
                self.token_count += (codes_bps > 0).sum((0, 1))
                self.token_sum += codes_bps.sum((0, 1)).double()
            self.view_count += (view_bs > 0).sum(0)
            self.latents_updated += self.patch.merge(view_bs, row0, codes_bps)
        if self.has_cls:
            cls_bs = self.sae.encode(x[:, 0])
            self.cls_count += (cls_bs > 0).sum(0)
            self.cls.merge(cls_bs, row0, codes_bps)
        rank_bs = view_bs if self.has_patches else cls_bs
        val, idx = rank_bs.topk(self.reverse_n, dim=1)
        self._rev_idx.append(idx.to("cpu", torch.int32))
        self._rev_val.append(val.to("cpu", torch.float32))
        self.next_row = row0 + b

    # -- the end ----------------------------------------------------------------------------------------------

    def finish(self) -> AnalysisResult:
        """The result, once every row is done: provenance of every exemplar, the per-image reverse index, stats."""
        if self.next_row != self.n_rows:
            raise AnalysisError(f"the pass is not finished: {self.next_row} of {self.n_rows} rows done")
        meta = self.meta
        # Provenance of every analysed row, from the shards' row records (small next to the activations).
        image_pos: dict[int, int] = {}
        images: dict[str, list] = {"image_index": [], "image_id": [], "label": []}
        n = self.n_rows
        row_image = np.full(n, -1, dtype=np.int32)
        row_index = np.full(n, -1, dtype=np.int64)
        row_crop = np.full((n, 4), -1, dtype=np.int32)
        row_flip = np.zeros(n, dtype=np.uint8)
        for shard in range(meta.n_shards):
            rows = meta.shard_rows(shard)
            if rows.start >= n:
                break
            for r, rec in enumerate(self.shard_set.rows(shard)):
                g = rows.start + r
                if g >= n:
                    break
                index = rec.get("image_index")
                index = g if index is None else int(index)
                if index not in image_pos:
                    image_pos[index] = len(images["image_index"])
                    images["image_index"].append(index)
                    images["image_id"].append(str(rec.get("image_id", index)))
                    images["label"].append(rec.get("label"))
                row_image[g], row_index[g] = image_pos[index], index
                view = rec.get("view")
                if view:
                    row_crop[g] = [int(c) for c in view["crop"]]
                    row_flip[g] = 1 if view.get("flip") else 0

        prov = (torch.from_numpy(row_image), torch.from_numpy(row_index), torch.from_numpy(row_crop),
                torch.from_numpy(row_flip))
        exemplars = {}
        for kind, s in (("patch", self.patch), ("cls", self.cls)):
            if s is not None:
                exemplars[kind] = _exemplar_tensors(s, prov, self.grid)

        # Reverse index per image: the max over its views of each latent, top-n.
        rev_idx = self._rev_cat(self._rev_idx, torch.int32).long()
        rev_val = self._rev_cat(self._rev_val, torch.float32)
        rev = _per_image_top(rev_idx, rev_val, torch.from_numpy(row_image).long(), len(images["image_index"]),
                             self.reverse_n, self.d_sae)

        n_tokens = n * self.n_patches
        count = self.token_count.cpu()
        stats = {} if not self.token_stats else {
            "frequency": count.double() / max(n_tokens, 1),
            "mean_value": torch.where(count > 0, self.token_sum.cpu() / count.clamp(min=1), 0.0).float(),
        }
        stats.update({
            "view_frequency": self.view_count.cpu().double() / max(n, 1),
            "cls_frequency": self.cls_count.cpu().double() / max(n, 1),
            "max_patch": (exemplars["patch"]["values"][:, 0] if "patch" in exemplars
                          else torch.zeros(self.d_sae)).float(),
            "max_cls": (exemplars["cls"]["values"][:, 0] if "cls" in exemplars else torch.zeros(self.d_sae)).float(),
        })
        scale = torch.zeros(self.d_sae)
        for ex in exemplars.values():
            if "maps" in ex:
                scale = torch.maximum(scale, ex["maps"].float().flatten(1).amax(1))
        stats["scale"] = scale
        info = {
            "n_rows": n, "n_images": len(images["image_index"]), "n_tokens": n_tokens, "patch_grid": list(self.grid),
            "has_cls": self.has_cls, "has_patches": self.has_patches, "top_k": self.top_k,
            "token_stats": self.token_stats,
            "reverse_n": self.reverse_n, "layer": self.layer, "acts_id": self.shard_set.acts_id,
            "d_sae": self.d_sae, "seconds": round(self.seconds, 3),
        }
        return AnalysisResult(exemplars=exemplars, stats=stats, reverse=rev, images=images, info=info)


def _exemplar_tensors(s: _TopSet, prov: tuple[torch.Tensor, ...], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    row_image, row_index, row_crop, row_flip = prov
    rows = s.rows.cpu()
    empty = rows < 0
    r = rows.clamp(min=0)
    out = {
        "values": s.values.cpu().float(),
        "rows": rows,
        "image": torch.where(empty, -1, row_image[r]).to(torch.int32),
        "image_index": torch.where(empty, -1, row_index[r]),
        "crop": torch.where(empty.unsqueeze(-1), -1, row_crop[r]).to(torch.int32),
        "flip": torch.where(empty, 0, row_flip[r]).to(torch.uint8),
    }
    maps = s.ranked_maps()
    if maps is not None:
        out["maps"] = maps.cpu().reshape(rows.shape[0], rows.shape[1], grid[0], grid[1])
    return out


def _per_image_top(idx_rn: torch.Tensor, val_rn: torch.Tensor, image_r: torch.Tensor, n_images: int, n: int,
                   d_sae: int) -> dict[str, torch.Tensor]:
    """Per image, its ``n`` latents with the largest max over its views (from each view's top-n)."""
    keep = val_rn > 0
    rows, _ = keep.nonzero(as_tuple=True)
    img_m = image_r[rows]
    lat_m = idx_rn[keep]
    val_m = val_rn[keep]
    out_idx = torch.full((n_images, n), -1, dtype=torch.int32)
    out_val = torch.zeros(n_images, n, dtype=torch.float32)
    if val_m.numel():
        key = img_m * d_sae + lat_m
        uniq, inverse = torch.unique(key, return_inverse=True)
        best = torch.zeros(uniq.numel(), dtype=torch.float32).scatter_reduce(0, inverse, val_m, "amax")
        img_u, lat_u = uniq // d_sae, uniq % d_sae
        order = torch.sort(best, descending=True, stable=True).indices  # by value, then by (image, latent)
        order = order[torch.sort(img_u[order], stable=True).indices]  # grouped by image, value order kept
        img_o = img_u[order]
        starts = torch.searchsorted(img_o, img_o, right=False)
        rank = torch.arange(img_o.numel()) - starts
        sel = rank < n
        out_idx[img_o[sel], rank[sel]] = lat_u[order][sel].to(torch.int32)
        out_val[img_o[sel], rank[sel]] = best[order][sel]
    return {"latents": out_idx, "values": out_val}


# ------------------------------------------------------------------------------------------------ the result


@dataclass
class AnalysisResult:
    """What a finished pass produced, in memory (CPU tensors). ``write`` puts it into an artifact writer."""

    exemplars: dict[str, dict[str, torch.Tensor]]
    """kind ("patch", "cls") -> values, rows, image, image_index, crop, flip, maps (see the module docs)."""
    stats: dict[str, torch.Tensor]
    """Per latent: frequency, mean_value, view_frequency, cls_frequency, max_patch, max_cls, scale."""
    reverse: dict[str, torch.Tensor]
    """latents i32 [n_images, n] (-1 pad), values f32 [n_images, n]; rows are the images of ``images``."""
    images: dict[str, list]
    """image_index, image_id, label of every analysed image, in recording order."""
    info: dict[str, Any] = field(default_factory=dict)

    def exemplar(self, kind: str, latent: int, rank: int) -> Exemplar:
        """One exemplar (with its heatmap), as the readers return it."""
        ex = self.exemplars.get(kind)
        if ex is None:
            raise KeyError(f"this analysis has no {kind!r} exemplars")
        return _make_exemplar(kind, latent, rank, {k: v[latent, rank] for k, v in ex.items()}, self.images)

    def files(self) -> dict[str, bytes]:
        """The artifact's data files (everything but analysis.json and tiles), name -> bytes."""
        from sae_shared.storage import encode_json, encode_tensors

        out = {}
        for kind, ex in self.exemplars.items():
            out[EXEMPLAR_FILES[kind]] = encode_tensors({k: v.contiguous() for k, v in ex.items()})
        out[LATENTS_FILE] = encode_tensors(self.stats)
        out[REVERSE_FILE] = encode_tensors({
            "latents": self.reverse["latents"],
            "values": self.reverse["values"].clamp(max=FP16_MAX).to(torch.float16),
            "image_index": torch.tensor(self.images["image_index"], dtype=torch.int64),
        })
        out[IMAGES_FILE] = encode_json(self.images)
        return out


@dataclass(frozen=True)
class Exemplar:
    """One exemplar view of a latent."""

    latent: int
    kind: str
    """"patch" (ranked by the max over the view's patches) or "cls" (by the CLS token's activation)."""
    rank: int
    """0 = strongest."""
    value: float
    """The activation it was ranked by."""
    row: int
    """Global row in the shard set."""
    image_index: int
    """Index of the source image in its dataset."""
    image_id: str
    label: int | None
    view: View | None
    """How the view was drawn from the image (None: the whole image)."""
    heatmap: np.ndarray | None = None
    """float32 ``[grid_rows, grid_cols]``: the latent's activation on every patch of the view."""

    def to_json(self) -> dict[str, Any]:
        return {"latent": self.latent, "kind": self.kind, "rank": self.rank, "value": self.value, "row": self.row,
                "image_index": self.image_index, "image_id": self.image_id, "label": self.label,
                "view": None if self.view is None else self.view.to_json(),
                "heatmap": None if self.heatmap is None else self.heatmap.tolist()}


def _make_exemplar(kind: str, latent: int, rank: int, slot: dict[str, Any], images: dict[str, list]) -> Exemplar:
    row = int(slot["rows"])
    if row < 0:
        raise KeyError(f"latent {latent} has no {kind} exemplar of rank {rank} (it fired on fewer views)")
    pos = int(slot["image"])
    crop = [int(c) for c in slot["crop"]]
    view = None if crop[0] < 0 else View(tuple(crop), bool(int(slot["flip"])))  # type: ignore[arg-type]
    heat = slot.get("maps")
    return Exemplar(
        latent=latent, kind=kind, rank=rank, value=float(slot["values"]), row=row,
        image_index=int(slot["image_index"]), image_id=str(images["image_id"][pos]), label=images["label"][pos],
        view=view, heatmap=None if heat is None else np.asarray(torch.as_tensor(heat).float().numpy()),
    )


def write_analysis(writer: Any, result: AnalysisResult, doc: dict[str, Any], *,
                   extra_files: dict[str, bytes] | None = None, files: dict[str, str] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``result`` + ``analysis.json`` (``doc``, completed here) + any tile files into an artifact writer
    (a store's ``ArtifactWriter`` or a job's ``StagedArtifact``) and commit it. ``files``: name -> local path (put
    with ``put_file``, e.g. a tile pack). Returns ``analysis.json``'s content."""
    for name, data in result.files().items():
        writer.put_bytes(name, data, content_type="application/json" if name.endswith(".json") else
                         "application/octet-stream")
    for name, data in (extra_files or {}).items():
        writer.put_bytes(name, data)
    for name, path in (files or {}).items():
        writer.put_file(name, path)
    doc = {"schema": SCHEMA, "format": FORMAT, **doc, **result.info,
           "files": sorted([*writer.files, ANALYSIS_JSON])}
    writer.put_json(ANALYSIS_JSON, doc)
    writer.commit({"kind": "analysis", "analysis_id": doc.get("analysis_id"), "sae_id": doc.get("sae_id"),
                   **(extra or {})})
    return doc


# ------------------------------------------------------------------------------------------------ the driver


@dataclass
class AnalyzeOptions:
    """What an ``analyze`` run does (the job spec's fields, library side)."""

    top_k: int = 16
    reverse_n: int = 16
    layer: int | None = None
    max_rows: int | None = None
    batch_rows: int | None = None
    dataset: str | None = None
    """Dataset spec (``open_dataset``) to redraw exemplar views for tiles; None: the shard set's own when it can
    be opened by its id (bundled or stored datasets)."""
    tiles: bool = True
    max_tiles: int = 256
    tiles_per_latent: int | None = None
    device: str | None = None
    force: bool = False
    checkpoint_seconds: float = 30.0

    def tile_identity(self) -> dict[str, Any] | None:
        if not self.tiles or self.max_tiles == 0:
            return None
        return {"dataset": self.dataset, "max": self.max_tiles, "per_latent": self.tiles_per_latent}


def sae_sha256(store, sae_id: str) -> str:
    """sha256 of the SAE's weights file, from its manifest (IncompleteArtifact when it does not exist)."""
    manifest = store.read_manifest(f"saes/{sae_id}")
    entry = manifest["files"].get("sae.safetensors")
    if entry is None:
        raise AnalysisError(f"saes/{sae_id} has no sae.safetensors")
    return entry["sha256"]


def existing_analysis(store, sae_id: str) -> dict[str, Any] | None:
    """``analysis.json`` of the committed analysis of ``sae_id``, or None."""
    from sae_shared.storage import IncompleteArtifact, NotFound

    prefix = analysis_prefix(sae_id)
    try:
        store.read_manifest(prefix)
        return store.get_json(f"{prefix}/{ANALYSIS_JSON}")
    except (IncompleteArtifact, NotFound):
        return None


def analyze(
    store,
    sae_id: str,
    acts_id: str,
    options: AnalyzeOptions | None = None,
    *,
    artifact: Callable[[str], Any] | None = None,
    resume: bytes | None = None,
    checkpoint: Callable[[bytes], None] | None = None,
    stopping: Callable[[], bool] | None = None,
    check: Callable[[], None] | None = None,
    on_progress: Callable[[float, str, dict], None] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Analyse SAE ``sae_id`` over shard set ``acts_id`` and publish ``saes/<sae_id>/analysis/``.

    The same inputs as the committed analysis -> nothing is computed (``reused``), unless ``options.force``.
    ``artifact(prefix)`` gives the writer (default ``store.artifact(prefix, overwrite=True)``; a job passes its
    fenced ``ctx.artifact``). ``resume`` / ``checkpoint(bytes)`` carry the pass's state between attempts;
    ``checkpoint`` is called every ``options.checkpoint_seconds`` and whenever ``stopping()`` turns true, before
    ``check()`` (which raises to stop). Returns a summary (JSON-ready).
    """
    from sae_shared.sae import load_sae

    opts = options or AnalyzeOptions()
    progress = on_progress or (lambda *_: None)
    t_start = time.perf_counter()
    sha = sae_sha256(store, sae_id)
    contract = store.get_json(f"saes/{sae_id}/cfg.json").get("contract") or {}  # small: the weights load later
    shard_set = ShardSet(store, acts_id)
    try:
        meta = shard_set.metadata
        layer = opts.layer if opts.layer is not None else contract.get("layer")
        if layer is None:
            raise AnalysisError("this SAE records no contract: give the layer")
        dataset = opts.dataset if opts.dataset is not None else default_dataset_spec(meta)
        tiles_id = opts.tile_identity()
        if tiles_id is not None:  # which latents get tiles depends on the SAE's statistics too
            stats_entry = store.read_manifest(f"saes/{sae_id}")["files"].get("stats.safetensors") or {}
            tiles_id = {**tiles_id, "dataset": dataset, "stats": stats_entry.get("sha256")}
        aid = compute_analysis_id(sae_sha256=sha, acts_id=acts_id, layer=layer, top_k=opts.top_k,
                                  reverse_n=opts.reverse_n, max_rows=opts.max_rows, tiles=tiles_id)
        prior = existing_analysis(store, sae_id)
        if prior is not None and prior.get("analysis_id") == aid and not opts.force:
            progress(1.0, "reusing the existing analysis", {})
            return {"sae_id": sae_id, "analysis_id": aid, "reused": True, "prefix": analysis_prefix(sae_id),
                    "n_rows": prior.get("n_rows"), "tiles": len((prior.get("tiles") or {}).get("latents") or [])}

        sae = load_sae(f"saes/{sae_id}", store=store, device=_device(opts.device))
        identity = {"analysis_id": aid}
        run = None
        if resume is not None:
            try:
                run = ExemplarAnalysis(sae, shard_set, top_k=opts.top_k, reverse_n=opts.reverse_n, layer=layer,
                                       max_rows=opts.max_rows, batch_rows=opts.batch_rows, state=resume,
                                       identity=identity)
            except AnalysisError as exc:
                if log is not None:
                    log.warning("unusable analysis checkpoint; starting over", extra={"error": str(exc)[:300]})
        resumed_from = run.next_row if run is not None else None
        if run is None:
            run = ExemplarAnalysis(sae, shard_set, top_k=opts.top_k, reverse_n=opts.reverse_n, layer=layer,
                                   max_rows=opts.max_rows, batch_rows=opts.batch_rows, identity=identity)
        n_rows = run.n_rows
        last_ckpt = time.monotonic()
        last_report = 0.0
        progress(0.0, f"analysing {n_rows} views" + (f" from row {resumed_from}" if resumed_from else ""),
                 {"rows": run.next_row, "n_rows": n_rows})
        rows_at_start, t_pass = run.next_row, time.perf_counter()
        for done in run.batches():
            now = time.monotonic()
            if checkpoint is not None and (now - last_ckpt >= opts.checkpoint_seconds or done == n_rows
                                           or (stopping is not None and stopping())):
                checkpoint(run.state_bytes())
                last_ckpt = now
            if now - last_report >= 0.5 or done == n_rows:
                last_report = now
                rate = (done - rows_at_start) / max(time.perf_counter() - t_pass, 1e-9)
                progress(0.9 * done / max(n_rows, 1), f"analysed {done}/{n_rows} views",
                         {"rows": done, "n_rows": n_rows, "rows_per_s": round(rate, 2),
                          "tokens_per_s": round(rate * max(run.n_patches, 1), 1)})
            if check is not None:
                check()
        pass_s = time.perf_counter() - t_pass
        result = run.finish()

        # Tiles for the latents worth looking at.
        from sae_shared import tiles as tiles_mod

        tile_doc: dict[str, Any] = {"latents": [], "kinds": [], "skipped": None}
        tile_files: dict[str, str] = {}
        extra_files: dict[str, bytes] = {}
        tmpdir = None
        if tiles_id is None:
            tile_doc["skipped"] = "tiles not requested"
        elif dataset is None:
            tile_doc["skipped"] = (f"the views cannot be redrawn: dataset {meta.dataset_id!r} cannot be opened by its "
                                   "id; give the dataset spec (e.g. imagefolder:<dir>) to render tiles")
        elif "patch" not in result.exemplars:
            tile_doc["skipped"] = "no patch tokens: no heatmaps"
        else:
            import tempfile

            progress(0.9, "rendering tiles", {})
            latents = tiles_mod.select_latents(sae.stats, result.stats, max_latents=opts.max_tiles)
            latents = [i for i in latents if int(result.exemplars["patch"]["rows"][i, 0]) >= 0]
            tmpdir = tempfile.TemporaryDirectory(prefix="saev-tiles-")
            pack = f"{tmpdir.name}/tiles-patch.pack"
            try:
                ds = tiles_mod.open_view_dataset(dataset, store, meta)
                index = tiles_mod.render_pack(result, ds, meta, latents, pack, kind="patch",
                                              per_latent=opts.tiles_per_latent, check=check)
            except tiles_mod.TileError as exc:
                if opts.dataset is not None:  # the caller's dataset is wrong: say so
                    raise
                tile_doc["skipped"] = str(exc)  # the recording's own dataset changed: publish without tiles
            else:
                tile_files[tiles_mod.PACK_FILES["patch"]] = pack
                extra_files[tiles_mod.TILES_JSON] = json.dumps(
                    {"kinds": {"patch": {"file": tiles_mod.PACK_FILES["patch"], "latents": index}}}).encode()
                tile_doc.update(latents=latents, kinds=["patch"],
                                per_latent=min(opts.tiles_per_latent or opts.top_k, opts.top_k),
                                selection=tiles_mod.SELECTION_DOC, max_tiles=opts.max_tiles)
        progress(0.98, "publishing", {})
        doc = {
            "analysis_id": aid, "sae_id": sae_id, "sae_sha256": sha, "backbone_id": meta.backbone_id,
            "sae_tokens": sae.contract.tokens if sae.contract else None, "dataset_id": meta.dataset_id,
            "dataset_hash": meta.dataset_hash, "dataset": dataset, "transform": meta.transform,
            "augmentation": meta.augmentation,
            "max_rows": opts.max_rows, "tiles": tile_doc, "resumed_from": resumed_from,
            "pass_seconds": round(pass_s, 3),
        }
        writer = artifact(analysis_prefix(sae_id)) if artifact is not None else store.artifact(
            analysis_prefix(sae_id), overwrite=True)
        try:
            write_analysis(writer, result, doc, extra_files=extra_files, files=tile_files)
        finally:
            if tmpdir is not None:
                tmpdir.cleanup()
        rows_done = n_rows - rows_at_start
        return {
            "sae_id": sae_id, "analysis_id": aid, "reused": False, "prefix": analysis_prefix(sae_id),
            "acts_id": acts_id, "layer": layer, "n_rows": n_rows, "n_images": result.info["n_images"],
            "top_k": opts.top_k, "has_cls": run.has_cls, "tiles": len(tile_doc["latents"]),
            "tiles_skipped": tile_doc["skipped"], "resumed_from": resumed_from,
            "rows_per_s": round(rows_done / pass_s, 2) if pass_s > 0 else None,
            "tokens_per_s": round(rows_done * max(run.n_patches, 1) / pass_s, 1) if pass_s > 0 else None,
            "seconds": round(time.perf_counter() - t_start, 3),
        }
    finally:
        shard_set.close()


def default_dataset_spec(meta) -> str | None:
    """The dataset spec that reopens a shard set's dataset from its id, when the id says enough (bundled and
    stored datasets); folders on disk need the caller's spec."""
    from sae_shared.datasets import BUNDLED

    ds = meta.dataset_id.split("[:", 1)[0]
    if ds in BUNDLED or ds.startswith("stored:"):
        return ds
    return None


def _device(device: str | None) -> str:
    if device is None:
        try:
            from sae_shared.settings import get_settings

            device = get_settings().device
        except Exception:  # noqa: BLE001 - no settings: CPU
            device = "cpu"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ------------------------------------------------------------------------------------------------ reading


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "F64": torch.float64, "I64": torch.int64,
              "I32": torch.int32, "U8": torch.uint8, "BF16": torch.bfloat16, "BOOL": torch.bool}


def _load_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(bytes(data))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


class _RangedTensors:
    """The tensors of one safetensors object in the store, read a leading-axis slice at a time (ranged GETs)."""

    def __init__(self, store, key: str):
        self.store, self.key = store, key
        (n,) = struct.unpack("<Q", store.get_bytes(key, 0, 8))
        if n > 1 << 24:
            raise AnalysisError(f"{key}: implausible safetensors header ({n} bytes)")
        header = json.loads(store.get_bytes(key, 8, n))
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.entries = {name: (_ST_DTYPES[e["dtype"]], tuple(e["shape"]), tuple(e["data_offsets"]))
                        for name, e in header.items()}

    def slice(self, name: str, i: int, j: int | None = None) -> torch.Tensor:
        """``tensor[i:j]`` (``j`` default ``i + 1``) along the first axis."""
        dtype, shape, (b0, _) = self.entries[name]
        j = i + 1 if j is None else j
        if not 0 <= i < j <= shape[0]:  # callers check latents and images first: a short table is a bad file
            raise AnalysisError(f"{self.key}: {name} has {shape[0]} entries, asked for [{i}, {j})")
        inner = math.prod(shape[1:])
        item = torch.empty((), dtype=dtype).element_size()
        data = self.store.get_bytes(self.key, self.start + b0 + i * inner * item, (j - i) * inner * item)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(j - i, *shape[1:])

    def full(self, name: str) -> torch.Tensor:
        return self.slice(name, 0, self.entries[name][1][0]) if self.entries[name][1][0] else torch.zeros(
            self.entries[name][1], dtype=self.entries[name][0])


class AnalysisReader:
    """A committed analysis, read lazily: what the Features API and the tiles need, one latent or image at a time.

    Opening costs a few small GETs (manifest, analysis.json, safetensors headers); the small per-slot tables
    (values, rows, provenance: ~40 bytes per latent and slot) and ``images.json`` are read once on first use; a
    latent's heatmaps are one ranged GET.
    """

    def __init__(self, store, sae_id: str):
        from sae_shared.storage import IncompleteArtifact

        self.store, self.sae_id = store, sae_id
        self.prefix = analysis_prefix(sae_id)
        try:
            self.manifest = store.read_manifest(self.prefix)
        except IncompleteArtifact:
            raise NotAnalysed(f"SAE {sae_id} has no feature analysis yet: run `saevctl analyze {sae_id} --acts "
                              "<acts_id>`") from None
        self.doc = store.get_json(f"{self.prefix}/{ANALYSIS_JSON}")
        if self.doc.get("schema") != SCHEMA or self.doc.get("format") != FORMAT:
            raise AnalysisError(f"{self.prefix}/{ANALYSIS_JSON}: not a schema-{SCHEMA} analysis")
        self.analysis_id: str = self.doc["analysis_id"]
        self.grid = tuple(self.doc["patch_grid"])
        self.kinds = [k for k in KINDS if EXEMPLAR_FILES[k] in self.manifest["files"]]
        self._files: dict[str, _RangedTensors] = {}
        self._tables: dict[str, dict[str, torch.Tensor]] = {}
        self._images: dict[str, list] | None = None
        self._image_pos: dict[str, int] | None = None
        self._stats: dict[str, torch.Tensor] | None = None
        self._tiles: dict | None = None
        self._lock = threading.Lock()

    @property
    def d_sae(self) -> int:
        return int(self.doc["d_sae"])

    @property
    def top_k(self) -> int:
        return int(self.doc["top_k"])

    def _file(self, name: str) -> _RangedTensors:
        with self._lock:
            if name not in self._files:
                self._files[name] = _RangedTensors(self.store, f"{self.prefix}/{name}")
            return self._files[name]

    def images(self) -> dict[str, list]:
        """``images.json``: image_index, image_id, label of every analysed image."""
        if self._images is None:
            self._images = self.store.get_json(f"{self.prefix}/{IMAGES_FILE}")
        return self._images

    def _table(self, kind: str) -> dict[str, torch.Tensor]:
        if kind not in self.kinds:
            raise KeyError(f"analysis of {self.sae_id} has no {kind!r} exemplars (kinds: {self.kinds})")
        if kind not in self._tables:
            f = self._file(EXEMPLAR_FILES[kind])
            self._tables[kind] = {n: f.full(n) for n in ("values", "rows", "image", "image_index", "crop", "flip")}
        return self._tables[kind]

    def _check_latent(self, latent: int) -> int:
        latent = int(latent)
        if not 0 <= latent < self.d_sae:
            raise LatentOutOfRange(f"latent {latent} out of range [0, {self.d_sae})")
        return latent

    def exemplars(self, latent: int, kind: str = "patch", *, limit: int | None = None,
                  heatmaps: bool = True) -> list[Exemplar]:
        """The latent's exemplars, strongest first (empty slots left out)."""
        latent = self._check_latent(latent)
        table = self._table(kind)
        n = int((table["rows"][latent] >= 0).sum())
        n = n if limit is None else min(n, max(0, limit))
        maps = None
        if heatmaps and n and "maps" in self._file(EXEMPLAR_FILES[kind]).entries:
            maps = self._file(EXEMPLAR_FILES[kind]).slice("maps", latent)[0]
        images = self.images()
        out = []
        for rank in range(n):
            slot = {k: v[latent, rank] for k, v in table.items()}
            if maps is not None:
                slot["maps"] = maps[rank]
            out.append(_make_exemplar(kind, latent, rank, slot, images))
        return out

    def latent_stats(self) -> dict[str, torch.Tensor]:
        """Per-latent tensors of ``latents.safetensors`` (frequency, mean_value, view_frequency, ..., scale)."""
        if self._stats is None:
            self._stats = _load_safetensors(self.store.get_bytes(f"{self.prefix}/{LATENTS_FILE}"))
        return self._stats

    def scale(self, latent: int) -> float:
        """The latent's heatmap colour scale: the max over its exemplars' maps."""
        return float(self.latent_stats()["scale"][self._check_latent(latent)])

    def latent_histogram(self, latent: int, bins: int = 32) -> dict[str, Any]:
        """A histogram of the latent's codes on every patch of its top exemplar views (the heatmaps kept for it:
        at most ``top_k * n_patches`` values, the high end of its distribution; the analysis keeps no histogram
        over all tokens). Linear bins from 0 to the largest value; zeros are counted apart. With the latent's
        frequencies and maximum over the whole analysed set."""
        latent = self._check_latent(latent)
        if not 1 <= bins <= 4096:
            raise ValueError(f"bins must be in [1, 4096], got {bins}")
        values = torch.zeros(0)
        kind = "patch" if "patch" in self.kinds else None
        if kind is not None and "maps" in self._file(EXEMPLAR_FILES[kind]).entries:
            n = int((self._table(kind)["rows"][latent] >= 0).sum())
            values = self._file(EXEMPLAR_FILES[kind]).slice("maps", latent)[0][:n].float().flatten()
        positive = values[values > 0]
        top = float(positive.max()) if positive.numel() else 1.0
        counts = torch.histc(positive, bins=bins, min=0.0, max=top) if positive.numel() else torch.zeros(bins)
        stats = self.latent_stats()
        return {
            "latent": latent, "source": "exemplar_patches",
            "edges": torch.linspace(0.0, top, bins + 1, dtype=torch.float64).tolist(),
            "counts": [int(c) for c in counts.tolist()], "zeros": int(values.numel() - positive.numel()),
            "n_values": int(values.numel()),
            "frequency": float(stats["frequency"][latent]) if "frequency" in stats else None,
            "view_frequency": float(stats["view_frequency"][latent]),
            "max_activation": float(stats["max_patch"][latent]),
        }

    def image_position(self, image_id: str | None = None, image_index: int | None = None) -> int:
        """Row of an image in images.json / the reverse index, by id or by dataset index."""
        images = self.images()
        if self._image_pos is None:
            self._image_pos = {str(i): p for p, i in enumerate(images["image_id"])}
            self._index_pos = {int(i): p for p, i in enumerate(images["image_index"])}
        pos = self._image_pos.get(str(image_id)) if image_id is not None else self._index_pos.get(int(image_index))
        if pos is None:
            raise KeyError(f"image {image_id if image_id is not None else image_index!r} is not in the analysed set")
        return pos

    def image_latents(self, image_id: str | None = None, *, image_index: int | None = None,
                      position: int | None = None) -> list[tuple[int, float]]:
        """An image's strongest latents (latent, value = max over its patches and views), strongest first."""
        pos = position if position is not None else self.image_position(image_id, image_index)
        f = self._file(REVERSE_FILE)
        lat = f.slice("latents", pos)[0]
        val = f.slice("values", pos)[0].float()
        return [(int(i), float(v)) for i, v in zip(lat.tolist(), val.tolist()) if i >= 0]

    def tiles_index(self) -> dict:
        """``tiles.json`` (kind -> {file, latents: {latent: [[offset, length] | null per rank]}}), or empty."""
        if self._tiles is None:
            from sae_shared.tiles import TILES_JSON

            if TILES_JSON in self.manifest["files"]:
                self._tiles = self.store.get_json(f"{self.prefix}/{TILES_JSON}")
            else:
                self._tiles = {"kinds": {}}
        return self._tiles


_READERS: OrderedDict[tuple[int, str], AnalysisReader] = OrderedDict()
_READERS_LOCK = threading.Lock()


def open_analysis(store, sae_id: str, *, cache_size: int = 16) -> AnalysisReader:
    """An :class:`AnalysisReader` for ``sae_id``, reused while the analysis is unchanged (one manifest GET per call
    checks that); :class:`NotAnalysed` when there is none."""
    from sae_shared.storage import IncompleteArtifact

    key = (id(store), sae_id)
    with _READERS_LOCK:
        reader = _READERS.get(key)
    if reader is not None:
        try:
            manifest = store.read_manifest(analysis_prefix(sae_id))
        except IncompleteArtifact:
            manifest = None
        if manifest is not None and manifest.get("committed_at") == reader.manifest.get("committed_at") and \
                manifest["files"].get(ANALYSIS_JSON) == reader.manifest["files"].get(ANALYSIS_JSON):
            with _READERS_LOCK:
                _READERS.move_to_end(key)
            return reader
    reader = AnalysisReader(store, sae_id)
    with _READERS_LOCK:
        _READERS[key] = reader
        _READERS.move_to_end(key)
        while len(_READERS) > cache_size:
            _READERS.popitem(last=False)
    return reader


__all__ = [
    "ANALYSIS_JSON", "AnalysisError", "AnalysisReader", "AnalysisResult", "AnalyzeOptions", "Exemplar",
    "ExemplarAnalysis", "LatentOutOfRange", "NotAnalysed", "analysis_prefix", "analyze", "cache_prefix",
    "compute_analysis_id",
    "default_dataset_spec", "existing_analysis", "open_analysis", "write_analysis",
]
