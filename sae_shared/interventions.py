"""Interventions: edit SAE latents in chosen patches and read the task head before and after (DESIGN.md §1).

The procedure, exactly, in its delta form (the SAE's error term is kept, so the model is edited, not replaced by
its reconstruction)::

    x   = backbone.forward_to(images, L)              # [B, T, D], tokens [CLS?, registers?, patches]
    f   = sae.encode(x[S])                            # codes of the selected tokens S (the union of the edits')
    f'  = edit(f)                                     # set / scale / add, latent by latent, edit by edit, in order
    x'  = x;  x'[S] = x[S] + (sae.decode(f') - sae.decode(f))
    y'  = head.predict(backbone, backbone.forward_from(x', L))

Tokens outside ``S`` are not touched at all, and within ``S`` the difference of the two decodes is computed from the
edited latents' columns alone (``SparseAutoencoder.decode_change``: ``(f' - f) W_dec · scale``, the same function),
so where ``f' == f`` it is exactly zero and ``x' == x`` bit for bit (fp32); the prediction then equals the unhooked
model's, however poor the SAE's reconstruction.

Edits (:class:`Edit`) name a latent, an operation (``set``, ``scale``, ``add``), a value (absolute, or relative to
the latent's observed maximum from the SAE's saved statistics: the paper's slider convention) and a token
selection: :class:`AllPatches`, :class:`PatchIndices`, :class:`PatchMask`, :class:`Box`, :class:`ByLabel` or raw
:class:`TokenIndices`. CLS and register tokens are edited only when a selection asks for them (``cls=True``,
``registers=True``).

:func:`intervene` is the one-call entry point (gateway, notebooks). :class:`Intervener` splits it so that a batch
experiment computes the forward to layer L once per image and shares it across every edit and baseline
(:meth:`Intervener.prepare`, then :meth:`Intervener.run` / :meth:`Intervener.run_delta` any number of times).

The result reports the off-target drift: the edited residual is re-encoded and the latents that were *not* edited
are compared with their values before the edit (the paper's pseudo-orthogonality claim, measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Sequence, Union

import torch
from torch import Tensor

from sae_shared.heads import HeadOutput, TaskHead

EditOp = Literal["set", "scale", "add"]
OPS: tuple[str, ...] = ("set", "scale", "add")


# --------------------------------------------------------------------------------------------------------------
# Token selections
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllPatches:
    """Every patch token."""

    cls: bool = False
    """Also the CLS token."""
    registers: bool = False
    """Also the register tokens."""


@dataclass(frozen=True)
class PatchIndices:
    """Patches by index in the row-major grid, ``0 .. rows * cols - 1`` (the same for every image)."""

    indices: tuple[int, ...]
    """Patch indices (row * cols + col)."""
    cls: bool = False
    """Also the CLS token."""
    registers: bool = False
    """Also the register tokens."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))


@dataclass(frozen=True, eq=False)
class PatchMask:
    """Patches by a boolean mask: ``[rows, cols]`` / ``[n_patches]`` for every image, or ``[B, rows, cols]`` /
    ``[B, n_patches]`` per image."""

    mask: Tensor
    """True where the patch is edited."""
    cls: bool = False
    """Also the CLS token."""
    registers: bool = False
    """Also the register tokens."""


@dataclass(frozen=True)
class Box:
    """Patches inside a box on the patch grid: rows ``top .. bottom - 1``, columns ``left .. right - 1``."""

    top: int
    left: int
    bottom: int
    """Exclusive."""
    right: int
    """Exclusive."""
    cls: bool = False
    """Also the CLS token."""
    registers: bool = False
    """Also the register tokens."""

    def __post_init__(self) -> None:
        if not (0 <= self.top < self.bottom and 0 <= self.left < self.right):
            raise ValueError(f"a box needs 0 <= top < bottom and 0 <= left < right, got {self}")

    @classmethod
    def from_pixels(cls, x0: float, y0: float, x1: float, y1: float, layout, **flags: bool) -> Box:
        """The patches a pixel box ``[x0, x1) × [y0, y1)`` (input-image coordinates) overlaps."""
        p = layout.patch_size
        top, left = int(max(0, y0) // p), int(max(0, x0) // p)
        bottom = min(layout.grid_rows, int(math.ceil(y1 / p)))
        right = min(layout.grid_cols, int(math.ceil(x1 / p)))
        return cls(top, left, bottom, right, **flags)


@dataclass(frozen=True, eq=False)
class ByLabel:
    """The patches of one class in a patch label map (e.g. majority labels of a segmentation mask, or a head's own
    patch predictions): ``labels`` is ``[rows, cols]`` for every image or ``[B, rows, cols]`` per image."""

    label: int
    """Class whose patches are edited."""
    labels: Tensor
    """Patch label map."""
    cls: bool = False
    """Also the CLS token."""
    registers: bool = False
    """Also the register tokens."""


@dataclass(frozen=True)
class TokenIndices:
    """Raw rows of the residual stream (prefix tokens included), the same for every image."""

    indices: tuple[int, ...]
    """Token rows, ``0 .. T - 1``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))


Selection = Union[AllPatches, PatchIndices, PatchMask, Box, ByLabel, TokenIndices]
"""Which tokens an edit touches."""


def parse_selection(sel: Selection | str | Sequence[int]) -> Selection:
    """A selection from shorthand: ``"patches"`` / ``"all"`` (every patch), ``"cls"``, ``"tokens"`` (every token:
    CLS, registers and patches), a list of patch indices, or a selection object."""
    if isinstance(sel, (AllPatches, PatchIndices, PatchMask, Box, ByLabel, TokenIndices)):
        return sel
    if isinstance(sel, str):
        if sel in ("patches", "all"):
            return AllPatches()
        if sel == "cls":
            return PatchIndices((), cls=True)
        if sel == "tokens":
            return AllPatches(cls=True, registers=True)
        raise ValueError(f"unknown selection {sel!r}: use 'patches', 'cls', 'tokens', patch indices or a selection")
    if isinstance(sel, Tensor):
        return PatchMask(sel)
    return PatchIndices(tuple(sel))


def token_mask(selection: Selection, layout, batch: int, device: torch.device | str = "cpu") -> Tensor:
    """The selection as a boolean token mask ``[B, T]`` over the residual stream."""
    n_pre, n_patch, rows, cols = layout.n_prefix_tokens, layout.n_patches, layout.grid_rows, layout.grid_cols
    out = torch.zeros(batch, layout.n_tokens, dtype=torch.bool, device=device)
    if isinstance(selection, TokenIndices):
        idx = torch.tensor(selection.indices, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= layout.n_tokens):
            raise ValueError(f"token indices must be in [0, {layout.n_tokens}), got {list(selection.indices)}")
        out[:, idx.to(device)] = True
        return out
    patches = torch.zeros(batch, n_patch, dtype=torch.bool, device=device)
    if isinstance(selection, AllPatches):
        patches[:] = True
    elif isinstance(selection, PatchIndices):
        idx = torch.tensor(selection.indices, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_patch):
            raise ValueError(f"patch indices must be in [0, {n_patch}) ({rows}x{cols} grid), got "
                             f"{list(selection.indices)}")
        patches[:, idx.to(device)] = True
    elif isinstance(selection, PatchMask):
        patches |= _per_image_patches(selection.mask.to(device=device, dtype=torch.bool), layout, batch, "mask")
    elif isinstance(selection, Box):
        if selection.bottom > rows or selection.right > cols:
            raise ValueError(f"box {selection} extends past the {rows}x{cols} patch grid")
        grid = patches.view(batch, rows, cols)
        grid[:, selection.top:selection.bottom, selection.left:selection.right] = True
    elif isinstance(selection, ByLabel):
        labels = _per_image_patches(torch.as_tensor(selection.labels).to(device), layout, batch, "labels")
        patches |= labels == int(selection.label)
    else:
        raise TypeError(f"not a selection: {selection!r}")
    out[:, n_pre:] = patches
    if selection.cls:
        if layout.cls_index is None:
            raise ValueError("the selection asks for the CLS token, but this backbone has none")
        out[:, layout.cls_index] = True
    if selection.registers:
        if not layout.register_indices:
            raise ValueError("the selection asks for register tokens, but this backbone has none")
        out[:, list(layout.register_indices)] = True
    return out


def _per_image_patches(t: Tensor, layout, batch: int, what: str) -> Tensor:
    """``[rows, cols]`` / ``[n]`` / ``[B, rows, cols]`` / ``[B, n]`` -> ``[B, n_patches]``."""
    n, grid = layout.n_patches, (layout.grid_rows, layout.grid_cols)
    shape = tuple(t.shape)
    if shape in (grid, (n,)):
        return t.reshape(1, n).expand(batch, n)
    if shape in ((batch, *grid), (batch, n)):
        return t.reshape(batch, n)
    raise ValueError(f"patch {what} must have shape {list(grid)}, [{n}], [{batch}, {grid[0]}, {grid[1]}] or "
                     f"[{batch}, {n}]; got {list(shape)}")


# --------------------------------------------------------------------------------------------------------------
# Edits
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One latent edit: ``op`` the latent's codes at the selected tokens with ``value``."""

    latent: int
    """Latent index, ``0 .. d_sae - 1``."""
    op: EditOp = "set"
    """'set': f = v; 'scale': f = f * v; 'add': f = f + v."""
    value: float = 0.0
    """Operand of ``op``; with ``relative`` it is in units of the latent's observed maximum."""
    relative: bool = False
    """Multiply ``value`` by the latent's maximum activation from ``sae.require_stats()`` (for 'set' and 'add')."""
    patches: Any = field(default_factory=AllPatches)
    """Which tokens: a :data:`Selection` or shorthand accepted by :func:`parse_selection`."""

    def __post_init__(self) -> None:
        if isinstance(self.latent, bool) or not isinstance(self.latent, int) or self.latent < 0:
            raise ValueError(f"Edit.latent must be an int >= 0, got {self.latent!r}")
        if self.op not in OPS:
            raise ValueError(f"Edit.op must be one of {', '.join(OPS)}, got {self.op!r}")
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool) or not math.isfinite(self.value):
            raise ValueError(f"Edit.value must be a finite number, got {self.value!r}")
        if self.relative and self.op == "scale":
            raise ValueError("a 'scale' edit is already relative to the latent's own value; use relative=False")
        object.__setattr__(self, "patches", parse_selection(self.patches))

    def operand(self, sae) -> float:
        """The value applied, in activation units (resolving ``relative`` against the SAE's statistics)."""
        if not self.relative:
            return float(self.value)
        return float(self.value) * float(sae.require_stats().max[self.latent])


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------


class Predictions(NamedTuple):
    """A head's reading of a batch."""

    logits: Tensor
    """Classification ``[B, C]``; segmentation ``[B, C, H, W]``."""
    probs: Tensor
    """Softmax over the classes, same shape as ``logits``."""
    labels: Tensor
    """Predicted class: ``[B]`` or per pixel ``[B, H, W]``."""
    patch_probs: Tensor | None
    """Segmentation: per-patch class probabilities ``[B, C, rows, cols]``."""
    patch_labels: Tensor | None
    """Segmentation: per-patch predicted class ``[B, rows, cols]``."""

    @classmethod
    def from_output(cls, out: HeadOutput) -> Predictions:
        if out.patch_logits is None:
            probs = out.logits.float().softmax(-1)
            return cls(out.logits, probs, probs.argmax(-1), None, None)
        probs = out.logits.float().softmax(1)
        patch_probs = out.patch_logits.float().softmax(1)
        return cls(out.logits, probs, probs.argmax(1), patch_probs, patch_probs.argmax(1))

    def select(self, idx: Tensor) -> Predictions:
        """The predictions of images ``idx``."""
        return Predictions(*(None if t is None else t[idx] for t in self))


class Drift(NamedTuple):
    """Off-target drift per image: re-encode the edited residual and compare with the codes before the edit.

    Measured over the edited tokens (the others are untouched, so their drift is exactly zero) and the latents
    that were not edited. For a baseline without latent edits (a direction added) every latent counts.
    """

    mean_abs: Tensor
    """``[B]`` mean |encode(x') - f| over (edited token, non-edited latent) pairs."""
    max_abs: Tensor
    """``[B]`` largest such difference."""
    relative: Tensor
    """``[B]`` ‖encode(x') - f‖ / ‖f‖ over the same pairs (0 when neither moved; inf if only the change is
    non-zero)."""
    flips_per_token: Tensor
    """``[B]`` non-edited latents per edited token that switched between firing and not firing."""
    target_error: Tensor
    """``[B]`` mean |encode(x') - f'| over the edited (token, latent) pairs: how well re-encoding recovers the edit
    itself (0 when nothing was edited)."""
    n_tokens: Tensor
    """``[B]`` edited tokens."""

    def summary(self) -> dict[str, float]:
        """Means over the images that had edited tokens."""
        has = self.n_tokens > 0
        if not bool(has.any()):
            return {"mean_abs": 0.0, "max_abs": 0.0, "relative": 0.0, "flips_per_token": 0.0, "target_error": 0.0,
                    "n_tokens": 0.0}
        return {k: float(getattr(self, k)[has].double().mean()) for k in self._fields}

    def select(self, idx: Tensor) -> Drift:
        return Drift(*(t[idx] for t in self))


class InterventionResult(NamedTuple):
    """What an intervention did to the head's predictions, and to the SAE's other latents."""

    before: Predictions
    """Predictions of the unedited model."""
    after: Predictions
    """Predictions after the edit."""
    prob_delta: Tensor
    """``after.probs - before.probs`` (same shape)."""
    changed: Tensor
    """Bool: images (``[B]``, classification) or pixels (``[B, H, W]``, segmentation) whose class changed."""
    changed_patches: Tensor | None
    """Segmentation: bool ``[B, rows, cols]``, patches whose class changed."""
    edited_tokens: Tensor
    """Bool ``[B, T]``: tokens whose residual the edit touched."""
    delta_norm: Tensor
    """``[B, T]`` ‖x' - x‖ per token (0 outside ``edited_tokens``)."""
    drift: Drift | None
    """Off-target drift (None when not measured)."""


class Prepared(NamedTuple):
    """The shared part of a batch's interventions: the forward to layer L and the unedited predictions."""

    resid_btd: Tensor
    """Residual stream after ``blocks[L]``, ``[B, T, D]``."""
    before: Predictions
    """The head's predictions on the unedited model."""

    def select(self, idx: Tensor) -> Prepared:
        """The same for a subset of the images. ``before`` is sliced from the whole batch's predictions; a forward
        over the sub-batch may differ from it in the last bits (BLAS results depend on the batch size), so to
        compare with edits run on the sub-batch use ``Intervener.prepare(resid_btd=self.resid_btd[idx])``."""
        return Prepared(self.resid_btd[idx], self.before.select(idx))


class EditedResidual(NamedTuple):
    """The residual after the edits, and what was needed to build it."""

    resid_btd: Tensor
    """x', ``[B, T, D]`` (a new tensor; x itself is not modified)."""
    tokens_bt: Tensor
    """Bool ``[B, T]``: the tokens S whose codes were computed (the union of the edits' selections)."""
    delta_nd: Tensor
    """``decode(f') - decode(f)`` at those tokens, fp32 ``[n, D]``, rows in ``tokens_bt.nonzero()`` order."""
    codes_ns: Tensor
    """f at those tokens, ``[n, d_sae]``."""
    edited_ns: Tensor
    """f' at those tokens."""
    pairs_m2: Tensor
    """``[m, 2]`` distinct (row, latent) pairs an edit touched (rows index ``delta_nd``)."""


# --------------------------------------------------------------------------------------------------------------
# The procedure
# --------------------------------------------------------------------------------------------------------------


def _rows_in(union_bt: Tensor, sel_bt: Tensor) -> Tensor:
    """Positions, among the rows of ``union_bt.nonzero()``, of the tokens in ``sel_bt`` (a subset)."""
    pos_bt = torch.cumsum(union_bt.reshape(-1).long(), 0).reshape(union_bt.shape) - 1
    return pos_bt[sel_bt]


@torch.inference_mode()
def edit_residual(sae, resid_btd: Tensor, edits: Sequence[Edit], layout) -> EditedResidual:
    """Apply ``edits`` to a residual stream in the delta form (module docs); x is left unmodified."""
    b = resid_btd.shape[0]
    dev = resid_btd.device
    sels = [token_mask(e.patches, layout, b, dev) for e in edits]
    for e in edits:
        if e.latent >= sae.d_sae:
            raise ValueError(f"latent {e.latent} is out of range: this SAE has {sae.d_sae} latents")
    union_bt = torch.zeros(b, layout.n_tokens, dtype=torch.bool, device=dev)
    for s in sels:
        union_bt |= s
    sae_dev = sae.W_dec.device
    x_nd = resid_btd[union_bt].to(sae_dev)
    codes_ns = sae.encode(x_nd)
    edited_ns = codes_ns.clone()
    pairs = []
    for e, s in zip(edits, sels):
        rows = _rows_in(union_bt, s).to(sae_dev)
        if rows.numel() == 0:
            continue
        v = e.operand(sae)
        col = edited_ns[rows, e.latent]
        if e.op == "set":
            col = torch.full_like(col, v)
        elif e.op == "scale":
            col = col * v
        else:
            col = col + v
        edited_ns[rows, e.latent] = col
        pairs.append(torch.stack([rows, torch.full_like(rows, e.latent)], 1))
    pairs_m2 = torch.unique(torch.cat(pairs), dim=0) if pairs else torch.empty(0, 2, dtype=torch.long, device=sae_dev)
    # decode(f') - decode(f), from the edited latents' columns only: exactly 0 wherever f' == f.
    delta_nd = sae.decode_change(codes_ns, edited_ns, [e.latent for e in edits])
    return EditedResidual(add_at(resid_btd, union_bt, delta_nd), union_bt, delta_nd, codes_ns, edited_ns, pairs_m2)


def add_at(resid_btd: Tensor, tokens_bt: Tensor, delta_nd: Tensor) -> Tensor:
    """``x'`` = x with ``x[tokens] + delta`` (fp32 sum, cast back to x's dtype) at the selected tokens."""
    out = resid_btd.clone()
    if delta_nd.shape[0]:
        rows_nd = resid_btd[tokens_bt]
        out[tokens_bt] = (rows_nd.float() + delta_nd.to(rows_nd.device)).to(resid_btd.dtype)
    return out


@torch.inference_mode()
def off_target_drift(sae, resid_after_nd: Tensor, edited_ns: Tensor, pairs_m2: Tensor, row_image_n: Tensor,
                     batch: int) -> Drift:
    """Re-encode the edited tokens ``[n, D]`` and compare with the intended codes f' ``[n, S]`` (equal to f on
    every latent not in ``pairs_m2``); per-image reductions over ``row_image_n``."""
    dev = edited_ns.device
    s = edited_ns.shape[1]
    row_image_n = row_image_n.to(dev)
    n_rows_b = torch.bincount(row_image_n, minlength=batch).double()
    re_ns = sae.encode(resid_after_nd.to(dev))
    flips_ns = (re_ns > 0) != (edited_ns > 0)
    diff_ns = re_ns.sub_(edited_ns)  # in place: [n, S] buffers are the cost here (GPU: ~0.8 GB each at 16k x 12k)
    ref_ns = edited_ns.square()
    target_err_b = torch.zeros(batch, dtype=torch.float64, device=dev)
    n_pairs_b = torch.zeros(batch, dtype=torch.float64, device=dev)
    if pairs_m2.numel():
        r, c = pairs_m2[:, 0], pairs_m2[:, 1]
        img = row_image_n[r]
        target_err_b.index_add_(0, img, diff_ns[r, c].abs().double())
        n_pairs_b.index_add_(0, img, torch.ones_like(img, dtype=torch.float64))
        diff_ns[r, c] = 0
        ref_ns[r, c] = 0
        flips_ns[r, c] = False

    def per_image(values_n: Tensor) -> Tensor:
        """Sum of per-row values over each image's rows: ``[B]`` float64."""
        return torch.zeros(batch, dtype=torch.float64, device=dev).index_add_(0, row_image_n, values_n.double())

    # Row sums in fp32 (the results are reported in fp32), summed over each image's rows in fp64.
    abs_ns = diff_ns.abs_()
    sum_abs_b = per_image(abs_ns.sum(1))
    max_b = torch.zeros(batch, dtype=torch.float32, device=dev)
    if abs_ns.shape[0]:
        max_b = max_b.scatter_reduce(0, row_image_n, abs_ns.max(1).values, reduce="amax", include_self=True)
    sq_b = per_image(abs_ns.square_().sum(1))
    ref_b = per_image(ref_ns.sum(1))
    flips_b = per_image(flips_ns.sum(1))
    n_other_b = n_rows_b * s - n_pairs_b
    num, den = sq_b.sqrt(), ref_b.sqrt()
    relative = torch.where(den > 0, num / den.clamp_min(1e-300),
                           torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)))
    return Drift(
        mean_abs=(sum_abs_b / n_other_b.clamp_min(1)).float().cpu(),
        max_abs=max_b.cpu(),
        relative=relative.float().cpu(),
        flips_per_token=(flips_b / n_rows_b.clamp_min(1)).float().cpu(),
        target_error=(target_err_b / n_pairs_b.clamp_min(1)).float().cpu(),
        n_tokens=n_rows_b.long().cpu(),
    )


class Intervener:
    """Interventions with one backbone, SAE and head, sharing the forward to layer L across edits.

    ``layer`` defaults to the SAE's contract layer; with ``check_contract`` the SAE's and the head's contracts are
    checked against the backbone (``ContractMismatch`` / ``HeadContractMismatch``).
    """

    def __init__(self, backbone, sae, head: TaskHead, *, layer: int | None = None, check_contract: bool = True):
        if layer is None:
            if sae.contract is None:
                raise ValueError("the SAE records no contract; pass layer= explicitly")
            layer = sae.contract.layer
        if check_contract:
            sae.check_contract(backbone.id, layer, sae.contract.tokens if sae.contract is not None else "patches")
            head.check_contract(backbone)
        self.backbone, self.sae, self.head, self.layer = backbone, sae, head.eval(), layer
        self.sae.eval()

    @property
    def layout(self):
        return self.backbone.layout

    def images_tensor(self, images) -> Tensor:
        """Preprocessed ``[B, 3, H, W]`` from a tensor, or from PIL images / uint8 tensors (the backbone's
        transform)."""
        if isinstance(images, Tensor) and images.dim() == 4:
            return images
        return self.backbone.preprocess_batch(list(images))

    @torch.inference_mode()
    def predict(self, resid_btd: Tensor) -> Predictions:
        """The head's predictions from a residual stream after ``blocks[L]``."""
        final_btd = self.backbone.forward_from(resid_btd, self.layer)
        return Predictions.from_output(self.head.predict(self.backbone, final_btd))

    @torch.inference_mode()
    def prepare(self, images=None, *, resid_btd: Tensor | None = None) -> Prepared:
        """Forward to layer L (or take ``resid_btd`` already computed) and the unedited predictions."""
        if resid_btd is None:
            if images is None:
                raise ValueError("prepare() needs images or resid_btd")
            resid_btd = self.backbone.forward_to(self.images_tensor(images), self.layer)
        return Prepared(resid_btd, self.predict(resid_btd))

    @torch.inference_mode()
    def run(self, prepared: Prepared, edits: Sequence[Edit], *, drift: bool = True) -> InterventionResult:
        """Apply ``edits`` (all together, in order) to a prepared batch."""
        edits = [e if isinstance(e, Edit) else Edit(**e) for e in edits]
        edited = edit_residual(self.sae, prepared.resid_btd, edits, self.layout)
        d = None
        if drift:
            rows_n = edited.tokens_bt.nonzero()[:, 0]
            d = off_target_drift(self.sae, edited.resid_btd[edited.tokens_bt], edited.edited_ns, edited.pairs_m2,
                                 rows_n, prepared.resid_btd.shape[0])
        return self._result(prepared, edited.resid_btd, edited.tokens_bt, edited.delta_nd, d)

    @torch.inference_mode()
    def run_delta(self, prepared: Prepared, tokens_bt: Tensor, delta_nd: Tensor, *,
                  drift: bool = True) -> InterventionResult:
        """Add arbitrary vectors ``delta_nd`` (rows in ``tokens_bt.nonzero()`` order) to the residual instead of a
        latent edit: the random-direction baseline. Drift compares every latent with its unedited value."""
        resid_after = add_at(prepared.resid_btd, tokens_bt, delta_nd)
        d = None
        if drift:
            x_nd = prepared.resid_btd[tokens_bt].to(self.sae.W_dec.device)
            codes_ns = self.sae.encode(x_nd)
            d = off_target_drift(self.sae, resid_after[tokens_bt], codes_ns,
                                 torch.empty(0, 2, dtype=torch.long, device=codes_ns.device),
                                 tokens_bt.nonzero()[:, 0], prepared.resid_btd.shape[0])
        return self._result(prepared, resid_after, tokens_bt, delta_nd, d)

    def _result(self, prepared: Prepared, resid_after: Tensor, tokens_bt: Tensor, delta_nd: Tensor,
                d: Drift | None) -> InterventionResult:
        after = self.predict(resid_after)
        before = prepared.before
        changed_patches = None
        if before.patch_labels is not None:
            changed_patches = before.patch_labels != after.patch_labels
        norm_bt = torch.zeros(tokens_bt.shape, dtype=torch.float32, device=tokens_bt.device)
        norm_bt[tokens_bt] = delta_nd.norm(dim=-1).to(norm_bt.device)
        return InterventionResult(before, after, after.probs - before.probs, before.labels != after.labels,
                                  changed_patches, tokens_bt, norm_bt, d)


def intervene(backbone, sae, head: TaskHead, images, edits: Sequence[Edit] = (), *, layer: int | None = None,
              drift: bool = True, check_contract: bool = True) -> InterventionResult:
    """Edit SAE latents in chosen tokens and read the head before and after (DESIGN.md §1, delta form).

    ``images``: preprocessed ``[B, 3, H, W]`` or a list of PIL images. ``edits``: :class:`Edit` s (or dicts of
    their fields), applied together in order. ``layer`` defaults to the SAE's contract layer. Runs under
    ``torch.inference_mode``. With no edits (or edits that leave every code as it was) ``after`` equals the
    unhooked model's prediction bit for bit in fp32.
    """
    iv = Intervener(backbone, sae, head, layer=layer, check_contract=check_contract)
    return iv.run(iv.prepare(images), edits, drift=drift)


__all__ = [
    "AllPatches", "Box", "ByLabel", "Drift", "Edit", "EditOp", "EditedResidual", "InterventionResult", "Intervener",
    "PatchIndices", "PatchMask", "Predictions", "Prepared", "Selection", "TokenIndices", "add_at", "edit_residual",
    "intervene", "off_target_drift", "parse_selection", "token_mask",
]
