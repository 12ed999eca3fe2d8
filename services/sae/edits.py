"""``saev.v1.LatentEdit`` messages -> the intervention library's edits, and the codes a preview shows.

The Edit RPC is ``sae_shared.interventions.edit_residual`` (DESIGN.md §1 in the delta form, the error term kept;
bit-exact ``x`` wherever no code changes). This module only validates the untrusted messages and translates them:
a message's patch selection and image indices become one per-image :class:`~sae_shared.interventions.PatchMask`.
CLS and register tokens are never edited through the API.

:func:`apply_edits` applies the same edits to the full dense codes of every token; PreviewIntervention shows those
(each edited latent on the patch grid, before and after) without decoding anything.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from sae_shared.proto.saev.v1 import common_pb2 as pb
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.protos import patch_mask

OPS = {pb.EDIT_OP_SET: "set", pb.EDIT_OP_SCALE: "scale", pb.EDIT_OP_ADD: "add"}


def layout_from_proto(lo: pb.TokenLayout, d_model: int):
    """A backbone ``Layout`` for a ``TokenLayout`` of every token (what the library's token selections need)."""
    from sae_shared.backbones import Layout

    n_prefix = lo.n_cls + lo.n_registers
    return Layout(n_blocks=1, d_model=d_model, n_tokens=n_prefix + lo.grid_height * lo.grid_width,
                  cls_index=0 if lo.n_cls else None, register_indices=tuple(range(lo.n_cls, n_prefix)),
                  grid_rows=lo.grid_height, grid_cols=lo.grid_width, patch_size=max(lo.patch_size, 1),
                  image_size=(lo.grid_height * max(lo.patch_size, 1), lo.grid_width * max(lo.patch_size, 1)))


def _checked(edit: pb.LatentEdit, j: int, *, n_images: int, grid: tuple[int, int], d_sae: int):
    """(op, value, per-image patch mask [B, n_patches]) of a validated edit message."""
    field = f"edits[{j}]"
    if not 0 <= edit.latent < d_sae:
        raise InvalidArgument(f"{field}.latent: {edit.latent} is out of range [0, d_sae = {d_sae})", f"{field}.latent")
    op = OPS.get(edit.op)
    if op is None:
        raise InvalidArgument(f"{field}.op: choose SET, SCALE or ADD", f"{field}.op")
    if not math.isfinite(edit.value):
        raise InvalidArgument(f"{field}.value: must be finite, got {edit.value}", f"{field}.value")
    if edit.relative_to_max and op == "scale":
        raise InvalidArgument(f"{field}.relative_to_max: a SCALE edit is already relative to the code itself",
                              f"{field}.relative_to_max")
    mask = patch_mask(edit.patches if edit.HasField("patches") else None, grid, f"{field}.patches")
    images = list(edit.image_indices) or list(range(n_images))
    bad = [i for i in images if not 0 <= i < n_images]
    if bad:
        raise InvalidArgument(f"{field}.image_indices: {bad[0]} is out of range [0, {n_images})",
                              f"{field}.image_indices")
    per_image = np.zeros((n_images, mask.size), dtype=bool)
    per_image[sorted(set(images))] = mask
    return op, float(edit.value), torch.from_numpy(per_image)


def to_library_edits(edits: Sequence[pb.LatentEdit], *, n_images: int, grid: tuple[int, int], d_sae: int) -> list:
    """Validated ``sae_shared.interventions.Edit`` s, in order."""
    from sae_shared.interventions import Edit, PatchMask

    out = []
    for j, edit in enumerate(edits):
        op, value, per_image = _checked(edit, j, n_images=n_images, grid=grid, d_sae=d_sae)
        out.append(Edit(latent=int(edit.latent), op=op, value=value, relative=edit.relative_to_max,
                        patches=PatchMask(per_image)))
    return out


def apply_edits(codes_bts: torch.Tensor, edits: Sequence[pb.LatentEdit], *, n_prefix: int, grid: tuple[int, int],
                max_activation: torch.Tensor | None) -> torch.Tensor:
    """Edited copy of dense codes ``[B, T, d_sae]`` (T = prefix tokens + patches, row-major), for previews."""
    n_images, _, d_sae = codes_bts.shape
    edited = codes_bts.clone()
    for j, edit in enumerate(edits):
        op, value, per_image = _checked(edit, j, n_images=n_images, grid=grid, d_sae=d_sae)
        if edit.relative_to_max:
            if max_activation is None:
                raise FailedPrecondition(f"edits[{j}].relative_to_max: this SAE has no per-latent statistics (max "
                                         "activations); compute them first, or send an absolute value", f"edits[{j}]")
            value *= float(max_activation[edit.latent])
        column = edited[:, n_prefix:, edit.latent]  # [B, n_patches], a view
        current = column[per_image]
        column[per_image] = {"set": torch.full_like(current, value), "scale": current * value,
                             "add": current + value}[op]
    return edited
