"""The ``record`` job: :func:`sae_shared.recording.record` driven by the queue.

- Resume state is one checkpoint, ``record.json`` = ``{"done": {file: {size, sha256}}}``, saved after every shard
  (fenced); a new attempt passes it back and records only the missing shards, byte-identical to an undisturbed run.
- Progress (fraction, ``images_per_s``, ``shards_done``) is reported after every shard; ``check_cancelled`` runs
  between forward batches' results (about every half second).
- Shard files go straight to ``activations/<acts_id>/``, not through the job's staging folder: their bytes are a
  function of the job's inputs (``acts_id`` names those inputs), so a stale attempt that writes a shard writes the
  same bytes, and resuming across attempts needs the files of earlier attempts where they are. What must not race
  is the commit (the manifest, which makes the set visible): it runs after a fenced lease check. A finished
  recording is reused, so running the job again costs one lookup.
- Bad input (unknown backbone or dataset, layer out of range, no readable image) fails the job at once
  (:class:`~services.worker.context.PermanentError`); other failures are retried.

Spec fields (:class:`sae_shared.jobs.RecordSpec`): ``dataset``, ``backbone``, ``layers``, ``batch_size``,
``images_per_shard``, ``max_images``; read when the spec has them: ``tokens``, ``dtype``, ``views_per_image``,
``seed``, ``checkpoint``, ``backbone_options``, ``workers``.
"""

from __future__ import annotations

import time
from typing import Any

from services.worker.context import JobContext, PermanentError

CHECKPOINT = "record.json"
CHECKPOINT_EVERY_S = 5.0
"""Least time between two resume checkpoints (each lists every finished file, so one per shard would cost O(n²)
bytes over a long recording); a killed job redoes at most this much work, plus the shards in flight."""


def _field(spec: Any, name: str, default: Any) -> Any:
    value = getattr(spec, name, None)
    return default if value is None else value


def record_arguments(spec: Any, device: str | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`sae_shared.recording.record` for a record spec (everything but the store and
    the callbacks)."""
    from sae_shared.datasets import Augmentation
    from sae_shared.recording import parse_backbone

    options = dict(_field(spec, "backbone_options", {}))
    workers = int(_field(spec, "workers", 0))
    if device and device != "auto" and not workers:  # Ray actors pick their own device (a GPU when they have one)
        options.setdefault("device", device)
    views = int(_field(spec, "views_per_image", 1))
    return dict(
        dataset=spec.dataset,
        backbone=parse_backbone(spec.backbone, _field(spec, "checkpoint", None), **options),
        layers=list(spec.layers),
        tokens=_field(spec, "tokens", "all"),
        dtype=_field(spec, "dtype", "float32"),
        augmentation=Augmentation(seed=int(_field(spec, "seed", 0)), views_per_image=views),
        rows_per_shard=int(spec.images_per_shard) * views,
        batch_size=int(spec.batch_size),
        max_images=spec.max_images,
        workers=workers,
    )


def run_record(ctx: JobContext) -> dict[str, Any]:
    from sae_shared.datasets import DatasetError
    from sae_shared.recording import InvalidRecording, record
    from sae_shared.settings import get_settings
    from sae_shared.shards import ShardSetError

    try:
        device = get_settings().device
    except Exception:  # noqa: BLE001 - settings for the store were read already; the device is optional
        device = None
    state = ctx.checkpoint_get(CHECKPOINT) or {}
    done = state.get("done") or None

    last = [float("-inf")]

    def on_shard(shard: int, files: dict) -> None:
        now = time.monotonic()
        if now - last[0] >= CHECKPOINT_EVERY_S:
            ctx.checkpoint_put(CHECKPOINT, {"done": files, "last_shard": shard})
            last[0] = now

    def on_progress(p: dict) -> None:
        ctx.progress(0.99 * p["fraction"], p["message"], images_per_s=round(p["rows_per_s"], 2),
                     shards_done=p["shards_done"], n_shards=p["n_shards"])

    def fence() -> None:
        ctx.fenced("record commit", lambda: ctx.queue.check_lease(ctx.lease))

    try:
        args = record_arguments(ctx.spec, device)
        ctx.progress(0.0, "loading the backbone and the dataset")
        result = record(ctx.store, **args, done=done, on_shard=on_shard, on_progress=on_progress,
                        check=ctx.check_cancelled, fence=fence)
    except (InvalidRecording, DatasetError, ShardSetError) as exc:
        raise PermanentError(str(exc)) from exc
    out = result.to_json()
    ctx.progress(1.0, "reused an existing recording" if result.reused else
                 f"recorded {result.n_rows} views in {result.n_shards} shards"
                 + (f", {result.n_skipped} unreadable images skipped" if result.n_skipped else ""),
                 images_per_s=round(result.rows_per_s, 2), shards_done=result.n_shards, n_shards=result.n_shards)
    return out
