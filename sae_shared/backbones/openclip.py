"""open_clip vision towers: the ``clip`` family (native ViT towers) and ``siglip`` (timm trunks with a MAP head).

Only the vision tower is kept; the text tower open_clip builds alongside it is dropped after loading.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import nn

from .base import Backbone, parse_device, parse_dtype
from .layout import Layout
from .timm_vit import TimmViTBackbone, _check_header, _load_strict, check_static_vit, timm_layout
from .transforms import INCEPTION_MEAN, INCEPTION_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform

_FAMILY_DEFAULTS = {
    # family: (model, pretrained tag, preprocessing used when no tag says otherwise)
    "clip": ("ViT-B-16", "openai", dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resize_mode="shortest")),
    "siglip": ("ViT-B-16-SigLIP", "webli", dict(mean=INCEPTION_MEAN, std=INCEPTION_STD, resize_mode="squash")),
}


class OpenClipViTBackbone(Backbone):
    """open_clip's native ``VisionTransformer`` (CLS pooling, ``ln_post`` before the pool)."""

    def __init__(self, visual: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.visual = visual
        """The open_clip VisionTransformer."""

    @property
    def module(self) -> nn.Module:
        return self.visual

    @property
    def _blocks(self) -> Sequence[nn.Module]:
        return self.visual.transformer.resblocks

    def _embed(self, imgs_bchw: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(imgs_bchw)

    def _run_blocks(self, resid_btd: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if start >= stop:
            return resid_btd
        batch_first = self.visual.transformer.batch_first
        # sequence-first towers run their blocks on a contiguous [T, B, D] copy, as open_clip's Transformer does
        x = resid_btd if batch_first else resid_btd.transpose(0, 1).contiguous()
        for block in self._blocks[start:stop]:
            x = block(x, attn_mask=None)
        return x if batch_first else x.transpose(0, 1)

    def _final_norm(self, resid_btd: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(resid_btd)

    def _pool(self, final_btd: torch.Tensor, project: bool) -> torch.Tensor:
        pooled_bd = final_btd[:, 0]  # ln_post(CLS): ln_post already ran on every token
        if project and self.visual.proj is not None:
            pooled_bd = pooled_bd @ self.visual.proj
        return pooled_bd

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        # prefixed like a full open_clip state dict, so open_clip tools can read the file too
        return {f"visual.{k}": v for k, v in self.visual.state_dict().items()}


def _load_open_clip(
    family: str,
    checkpoint: str | None = None,
    *,
    model: str | None = None,
    pretrained: str | None = "default",
    image_size: int | None = None,
    project: bool = False,
    model_overrides: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> Backbone:
    """Build an open_clip model and keep its vision tower.

    Args:
        checkpoint: local weights file: a full open_clip state dict (``visual.*`` keys are taken), a vision-tower
            state dict, or a file from :meth:`Backbone.save_checkpoint`.
        model: open_clip model name (``ViT-B-16``, ``ViT-B-16-SigLIP``, ...) or ``hf-hub:org/repo``; defaults
            ``ViT-B-16`` (clip) and ``ViT-B-16-SigLIP`` (siglip).
        pretrained: open_clip pretrained tag (downloads); "default" = ``openai`` (clip) / ``webli`` (siglip);
            None = random init. Ignored for ``hf-hub:`` names and with ``checkpoint``.
        image_size: override the tower's input size (open_clip ``force_image_size``).
        project: CLIP only: :meth:`Backbone.pool` applies the image projection by default.
        model_overrides: extra open_clip config entries (``vision_cfg``, ``text_cfg``, ``embed_dim``, ...),
            e.g. to build a small tower.
    """
    import open_clip

    default_model, default_tag, default_pp = _FAMILY_DEFAULTS[family]
    dev, dt = parse_device(device), parse_dtype(dtype)
    ckpt = None
    if checkpoint is not None:
        from .checkpoints import read_checkpoint

        ckpt = read_checkpoint(checkpoint)
        _check_header(ckpt.header, family, checkpoint)
        arch = ckpt.header.get("arch", {})
        model = model or arch.get("model")
        image_size = image_size or arch.get("image_size")
        model_overrides = model_overrides if model_overrides is not None else arch.get("model_overrides")
        pretrained = None
    model = model or default_model
    if not model.startswith(("hf-hub:", "local-dir:")):
        model = model.replace("/", "-")  # open_clip's own spelling: "ViT-B/16" is "ViT-B-16"
    if pretrained == "default":
        pretrained = default_tag
    if model.startswith("hf-hub:") or model.startswith("local-dir:"):
        pretrained = None  # the hub repo carries both config and weights
    elif open_clip.get_model_config(model) is None:
        raise ValueError(f"unknown open_clip model {model!r}; known: {open_clip.list_models()}")

    clip_model = open_clip.create_model(
        model, pretrained=pretrained, force_image_size=image_size, pretrained_image=False,
        pretrained_text=False, **(model_overrides or {}))
    visual = clip_model.visual
    preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    del clip_model  # the text tower is not needed
    trunk = getattr(visual, "trunk", None)
    if image_size is not None and trunk is not None and tuple(trunk.patch_embed.img_size) != (image_size,) * 2:
        # open_clip does not pass force_image_size to timm trunks: resample their position embeddings here
        trunk.set_input_size(img_size=image_size)

    if ckpt is not None:
        state = ckpt.state_dict
        if any(k.startswith("visual.") for k in state):
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        _load_strict(visual, state, checkpoint)
    visual.eval().to(dev)

    arch = {"model": model, "image_size": image_size, "model_overrides": model_overrides, "project": project}
    if ckpt is not None:
        model_id = f"{family}:{model}@sha256:{ckpt.sha256}"
    elif pretrained is None and not model.startswith(("hf-hub:", "local-dir:")):
        model_id = f"{family}:{model}/random-init"
    else:
        model_id = f"{family}:{model}" + (f"/{pretrained}" if pretrained else "")

    common = dict(family=family, id=model_id, device=dev, dtype=dt, arch=arch)
    if family == "clip":
        layout = _clip_layout(visual, model)
        transform = _transform(ckpt, preprocess_cfg, pretrained or model.startswith("hf-hub:"), default_pp, layout)
        return OpenClipViTBackbone(visual, layout=layout, transform=transform, **common)

    trunk = _siglip_trunk(visual, model)
    layout = timm_layout(trunk)
    transform = _transform(ckpt, preprocess_cfg, pretrained or model.startswith("hf-hub:"), default_pp, layout)

    def attention_pool(final_btd: torch.Tensor, project: bool) -> torch.Tensor:
        # exactly open_clip's TimmModel after forward_features: timm's head (MAP pool, fc_norm, head), adapter head
        return visual.head(trunk.forward_head(final_btd))

    return TimmViTBackbone(trunk, pool_fn=attention_pool, owner=visual, layout=layout, transform=transform,
                           **common)


load_clip = functools.partial(_load_open_clip, "clip")
"""CLIP vision tower from open_clip (options: see :func:`_load_open_clip`)."""
load_siglip = functools.partial(_load_open_clip, "siglip")
"""SigLIP vision tower from open_clip (options: see :func:`_load_open_clip`)."""


def _clip_layout(visual: nn.Module, model: str) -> Layout:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        hint = " (an attention-pool tower: use family 'siglip')" if hasattr(visual, "trunk") else ""
        raise ValueError(f"clip family needs an open_clip ViT tower; {model!r} has a {type(visual).__name__}{hint}")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError(f"{model!r} does not pool ln_post(CLS) (attn_pool / pool_type={visual.pool_type!r} / "
                         "final_ln_after_pool); only CLS-token CLIP towers are supported")
    rows, cols = visual.grid_size
    return Layout(
        n_blocks=len(visual.transformer.resblocks),
        d_model=visual.transformer.width,
        n_tokens=1 + rows * cols,
        cls_index=0,
        register_indices=(),
        grid_rows=rows,
        grid_cols=cols,
        patch_size=visual.patch_size[0],
        image_size=tuple(visual.image_size),
    )


def _siglip_trunk(visual: nn.Module, model: str) -> nn.Module:
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        raise ValueError(f"siglip family needs an open_clip timm tower with an attention-pool head; {model!r} "
                         f"has a {type(visual).__name__} (use family 'clip')")
    check_static_vit(trunk, f"the vision trunk of {model!r}")
    if getattr(trunk, "attn_pool", None) is None:
        raise ValueError(f"{model!r} has no attention-pool (MAP) head; it is not a SigLIP tower")
    return trunk


def _transform(ckpt: Any, preprocess_cfg: dict[str, Any], from_tag: bool, default_pp: dict[str, Any],
               layout: Layout) -> ImageTransform:
    if ckpt is not None and ckpt.header:
        return ImageTransform.from_dict(ckpt.header["transform"])
    if from_tag and preprocess_cfg:
        # the pretrained tag's own preprocessing, as open_clip resolved it
        return ImageTransform(size=layout.image_size, mean=tuple(preprocess_cfg["mean"]),
                              std=tuple(preprocess_cfg["std"]),
                              resize_mode=preprocess_cfg.get("resize_mode", "shortest"),
                              interpolation=preprocess_cfg.get("interpolation", "bicubic"),
                              fill=int(preprocess_cfg.get("fill_color", 0)))
    return ImageTransform(size=layout.image_size, interpolation="bicubic", **default_pp)
