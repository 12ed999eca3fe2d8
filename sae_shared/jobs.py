"""Job specs: what each job type needs, validated before a job is queued.

A job is submitted as ``(type, spec)``; the spec is a JSON object whose schema depends on the type (the glossary's
job types ``record``, ``train``, ``analyze``, ``train-head``, ``experiment``, plus ``count``, a small deterministic
job used by the tests and demos of the queue itself). :func:`validate_spec` turns the pair into one of the models
below or raises :class:`InvalidSpec` with a message that names each bad field and what to change.

The models are a discriminated union on ``type`` (:data:`JobSpec`). Unknown fields are refused, so a typo such as
``"stpes"`` fails at submit instead of silently taking a default. The batch types hold only what identifies their
inputs for now; the issues that bring their handlers extend them (bump nothing: specs live only in the queue).

This module imports only pydantic, so the library stays importable where Redis is not installed.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

Id = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")]
"""An identifier of an input or output (dataset, backbone, shard set, SAE, head): non-empty, no spaces."""


class InvalidSpec(ValueError):
    """A job spec that does not validate; the message lists every problem and the fix."""


class _Spec(BaseModel):
    """Common configuration of every spec: immutable, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RecordSpec(_Spec):
    """Record a backbone's activations over a dataset into a shard set (``activations/<acts_id>/``)."""

    type: Literal["record"] = "record"
    dataset: Id
    """Dataset id to read images from."""
    backbone: Id
    """Backbone id, e.g. ``dinov2:vit_small_patch14_reg4_dinov2.lvd142m``."""
    layers: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    """Transformer blocks whose outputs are recorded (0-based)."""
    batch_size: int = Field(32, gt=0, le=4096)
    """Images per forward pass."""
    images_per_shard: int = Field(1024, gt=0)
    """Images per safetensors shard."""
    max_images: int | None = Field(None, gt=0)
    """Stop after this many images (None: the whole dataset)."""

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, layers: list[int]) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {layers}")
        return sorted(layers)


class TrainSpec(_Spec):
    """Train an SAE on one layer of a shard set."""

    type: Literal["train"] = "train"
    acts_id: Id
    """Shard set to train on."""
    layer: int = Field(ge=0)
    """Layer of the shard set whose activations are the SAE's input."""
    d_sae: int = Field(gt=0)
    """Number of latents."""
    steps: int = Field(gt=0)
    """Optimiser steps."""
    batch_size: int = Field(4096, gt=0)
    """Activations (tokens) per step."""
    lr: float = Field(4e-4, gt=0, lt=1)
    """Learning rate."""
    seed: int = 0
    """Seed of initialisation and data order."""


class AnalyzeSpec(_Spec):
    """Feature analysis of an SAE over a shard set: per-latent statistics and top exemplars."""

    type: Literal["analyze"] = "analyze"
    sae_id: Id
    """SAE to analyse."""
    acts_id: Id
    """Shard set to run it over."""
    top_k: int = Field(16, gt=0, le=1024)
    """Exemplars kept per latent."""


class TrainHeadSpec(_Spec):
    """Train a task head (classifier or segmenter) on recorded activations."""

    type: Literal["train-head"] = "train-head"
    acts_id: Id
    """Shard set with the features the head reads."""
    task: Literal["classify", "segment"]
    """What the head predicts."""
    num_classes: int = Field(ge=2)
    """Number of classes."""
    epochs: int = Field(10, gt=0)
    """Passes over the training set."""
    lr: float = Field(1e-3, gt=0, lt=1)
    """Learning rate."""


class Edit(_Spec):
    """One latent edit of an experiment."""

    latent: int = Field(ge=0)
    """Latent index in the SAE."""
    op: Literal["set", "scale", "add"]
    """How the latent's activation is changed."""
    value: float
    """Operand of ``op``."""


class ExperimentSpec(_Spec):
    """Batch intervention experiment: apply edits over a dataset and aggregate the head's predictions."""

    type: Literal["experiment"] = "experiment"
    sae_id: Id
    """SAE whose latents are edited."""
    head_id: Id
    """Head whose predictions are compared before and after."""
    dataset: Id
    """Dataset the edits are applied over."""
    edits: list[Edit] = Field(min_length=1)
    """Edits applied together to every image."""
    max_images: int | None = Field(None, gt=0)
    """Stop after this many images (None: the whole dataset)."""


class CountSpec(_Spec):
    """A small deterministic job for tests and demos of the queue: ``steps`` steps, each hashing the step number
    into a running value, with a checkpoint and a progress report per step. Its result is the same whatever
    interruptions and resumptions happened on the way, and records which attempt (lease epoch) ran which step."""

    type: Literal["count"] = "count"
    steps: int = Field(5, gt=0, le=100_000)
    """Number of steps."""
    step_seconds: float = Field(0.0, ge=0, le=60)
    """Time each step sleeps (to give tests a window to interrupt a worker)."""
    seed: str = Field("", max_length=256)
    """Mixed into the value, so jobs with the same steps can be told apart."""
    fail_attempts: int = Field(0, ge=0)
    """Raise a retryable error on each of the first N attempts (retry and dead-letter tests)."""
    fail_permanently: bool = False
    """Raise a non-retryable error at once."""
    artifact_prefix: str | None = Field(None, min_length=1, max_length=512)
    """Also commit the result as an artifact folder at this object-store prefix."""
    ignore_lease_loss: bool = False
    """Test only: keep going after a refused progress, checkpoint or commit, as a stalled worker that does not
    notice would; proves that the fence, not the handler's good manners, keeps the job consistent."""


JobSpec = Annotated[
    Union[RecordSpec, TrainSpec, AnalyzeSpec, TrainHeadSpec, ExperimentSpec, CountSpec],
    Field(discriminator="type"),
]
"""Any job spec; the ``type`` field selects the model."""

SPEC_MODELS: dict[str, type[_Spec]] = {
    "record": RecordSpec,
    "train": TrainSpec,
    "analyze": AnalyzeSpec,
    "train-head": TrainHeadSpec,
    "experiment": ExperimentSpec,
    "count": CountSpec,
}
"""Job type -> spec model."""

JOB_TYPES: tuple[str, ...] = tuple(SPEC_MODELS)
"""Every job type, in the glossary's order (then ``count``)."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)


def _describe(exc: ValidationError, job_type: str) -> str:
    """One line per problem: where, what is wrong, and the value given."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"][1:] if p != job_type) or "(spec)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(f for f in SPEC_MODELS[job_type].model_fields if f != "type")
            msg = f"unknown field (allowed: {allowed})"
        elif err["type"] == "string_pattern_mismatch":
            msg = f"must be an id of letters, digits and ._:/@+- without spaces (got {json.dumps(err.get('input'))[:80]})"
        elif err["type"] != "missing":
            msg += f" (got {json.dumps(err.get('input'), default=str)[:80]})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate_spec(job_type: str, spec: dict[str, Any] | str | BaseModel) -> _Spec:
    """The validated spec model for a ``job_type`` and a spec (dict, JSON text or model), or :class:`InvalidSpec`.

    The ``type`` field may be left out of ``spec``; when present it must equal ``job_type``.
    """
    if job_type not in SPEC_MODELS:
        raise InvalidSpec(f"unknown job type {job_type!r}: choose one of {', '.join(JOB_TYPES)}")
    if isinstance(spec, BaseModel):
        spec = spec.model_dump(mode="json")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise InvalidSpec(f"{job_type} spec is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise InvalidSpec(f"{job_type} spec must be a JSON object, got {type(spec).__name__}")
    given = spec.get("type", job_type)
    if given != job_type:
        raise InvalidSpec(f"spec says type {given!r} but the job is submitted as {job_type!r}: make them agree")
    try:
        return _ADAPTER.validate_python({**spec, "type": job_type})
    except ValidationError as exc:
        raise InvalidSpec(f"invalid {job_type} spec:\n{_describe(exc, job_type)}") from None


def spec_json(spec: _Spec) -> str:
    """Canonical JSON of a validated spec (sorted keys, defaults filled in), as stored in the queue."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
