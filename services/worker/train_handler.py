"""The ``train`` job: a sweep of SAEs trained on one layer of a shard set, checkpointed, evaluated and published.

- **Data**: :class:`sae_shared.sae.sharded.ShardSetTraining` streams batches from the shuffled reader over the
  shard set's training rows; every sweep member trains on each batch in turn, so the data is read once whatever the
  sweep's size. The last ``heldout_fraction`` of the rows are held out.
- **Checkpoints**: one object, ``train.state`` (weights, Adam states, dead-latent counters, metrics so far and the
  reader position: epoch and batch index), written (fenced) every ``checkpoint_every`` steps, after the last step,
  and when the worker is stopping. A later attempt (the worker was killed, or stopped) resumes from it bit for bit:
  the batch order is a function of the step, and the trainer's state dict restores everything else exactly.
- **Metrics**: each logged point goes to the job's progress (``step``, and ``fvu`` / ``l0`` / ``dead`` per member),
  to the worker's Prometheus registry (``saev_train_*`` gauges labelled by ``sae_id``) and, at the end, to
  ``metrics.jsonl`` beside each SAE (one JSON object per logged step, then the held-out evaluation).
- **Publication**: after training, every SAE is evaluated over the held-out rows with its per-latent statistics and
  staged through ``ctx.artifact("saes/<sae_id>")``: it becomes visible only if this attempt's completion is the
  accepted one. ``sae_id`` is a hash of the inputs and the member's settings, known before training; when every SAE
  of the sweep already exists, the job returns at once (``reused``).

Bad input (missing shard set, unrecorded layer, too little data, a d_sae below k) fails the job at once
(:class:`~services.worker.context.PermanentError`); other failures are retried and resume from the checkpoint.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from services.worker.context import JobContext, PermanentError

if TYPE_CHECKING:
    from sae_shared.jobs import TrainSpec
    from sae_shared.sae import TrainConfig

CHECKPOINT = "train.state"
PROGRESS_SECONDS = 0.5
"""Least time between two progress reports (each is a Redis round trip)."""
TRAIN_SHARE = 0.95
"""Part of the progress bar for training; the held-out evaluation and publication take the rest."""


def config_from_spec(spec: TrainSpec, d_model: int, device: str = "cpu") -> TrainConfig:
    """The library's ``TrainConfig`` for a ``train`` spec over ``d_model``-wide activations (raises ``ValueError``
    for inconsistent settings, e.g. k above d_sae or Matryoshka prefixes not ending at d_sae)."""
    from sae_shared.sae import BatchTopK, Matryoshka, Relu, SAEConfig, SweepMember, TopK, TrainConfig

    top = {name: getattr(spec, name) for name in spec.Member.model_fields}
    members = []
    for override in spec.sweep or [spec.Member()]:
        m = {**top, **{k: v for k, v in override.model_dump().items() if v is not None}}
        if m["variant"] == "relu":
            variant = Relu(l1_coeff=m["l1_coeff"])
        elif m["variant"] == "topk":
            variant = TopK(k=m["k"], k_aux=m["k_aux"], aux_coeff=m["aux_coeff"])
        else:
            variant = BatchTopK(k=m["k"], k_aux=m["k_aux"], aux_coeff=m["aux_coeff"])
        matryoshka = Matryoshka(prefixes=tuple(m["matryoshka"])) if m["matryoshka"] else None
        sae = SAEConfig(d_model=d_model, d_sae=m["d_sae"], variant=variant, matryoshka=matryoshka,
                        seed=m["seed"])
        members.append(SweepMember(sae, lr=m["lr"]))
    return TrainConfig(
        members=tuple(members),
        batch_size=spec.batch_size,
        n_tokens=spec.steps * spec.batch_size,
        warmup_steps=spec.warmup_steps,
        schedule=spec.schedule,
        max_grad_norm=spec.max_grad_norm,
        autocast=spec.autocast,
        device=device,
        seed=spec.seed,
        heldout_fraction=spec.heldout_fraction,
        norm_sample_tokens=spec.norm_sample_tokens,
        dead_window_tokens=spec.dead_window_tokens,
        log_every=spec.log_every,
    )


def sae_ids_for(spec: TrainSpec, d_model: int) -> list[str]:
    """The ids the spec's SAEs get (the CLI prints them at submit; they need the shard set's d_model)."""
    from sae_shared.sae.sharded import sae_id_for

    config = config_from_spec(spec, d_model)
    return [sae_id_for(m, config, acts_id=spec.acts_id, layer=spec.layer, tokens=spec.tokens, total_steps=spec.steps)
            for m in config.members]


def _device(spec: TrainSpec) -> str:
    import torch

    device = spec.device
    if device is None:
        try:
            from sae_shared.settings import get_settings

            device = get_settings().device
        except Exception:  # noqa: BLE001 - the store's settings were read already; the device is optional
            device = "cpu"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


class _Prometheus:
    """The worker's ``saev_train_*`` metrics (prometheus-client via ``sae_shared.telemetry``)."""

    def __init__(self) -> None:
        from sae_shared import telemetry as t

        self.step = t.gauge("saev_train_step", "Optimiser steps done by a training SAE.", ["sae_id"])
        self.loss = t.gauge("saev_train_loss", "Training loss of an SAE at its last logged step.", ["sae_id"])
        self.fvu = t.gauge("saev_train_fvu", "Fraction of variance unexplained (batch) at the last logged step.",
                           ["sae_id"])
        self.l0 = t.gauge("saev_train_l0", "Mean active latents per token at the last logged step.", ["sae_id"])
        self.dead = t.gauge("saev_train_dead_latents", "Latents silent for dead_window_tokens.", ["sae_id"])
        self.dense = t.gauge("saev_train_dense_latents", "Latents firing on more than 1e-2 of tokens.", ["sae_id"])
        self.tokens = t.counter("saev_train_tokens_total", "Training tokens read (once per sweep).")
        self.steps_per_s = t.gauge("saev_train_steps_per_second", "Sweep steps per second since the last log.")

    def logged(self, sae_id: str, m: Any) -> None:
        tags = {"sae_id": sae_id}
        self.step.set(m.step, tags)
        self.loss.set(m.loss, tags)
        self.fvu.set(m.fvu, tags)
        self.l0.set(m.l0, tags)
        self.dead.set(m.n_dead, tags)
        self.dense.set(m.n_dense, tags)


def run_train(ctx: JobContext) -> dict[str, Any]:
    from sae_shared.sae.checkpoint import InvalidCheckpoint
    from sae_shared.sae.modeling import ContractMismatch
    from sae_shared.sae.sharded import ShardSetTraining
    from sae_shared.shards import ShardSet, ShardSetError

    spec: TrainSpec = ctx.spec
    ctx.progress(0.0, "opening the shard set")
    try:
        shard_set = ShardSet(ctx.store, spec.acts_id)
        d_model = shard_set.metadata.d_model
        shard_set.close()
        config = config_from_spec(spec, d_model, _device(spec))
    except (ShardSetError, ValueError) as exc:
        raise PermanentError(str(exc)) from exc

    ids = sae_ids_for(spec, d_model)  # the same as ShardSetTraining's (asserted below)
    if len(set(ids)) != len(ids):
        raise PermanentError(f"two sweep members are identical (sae ids {ids}); make every member differ")
    if all(ctx.store.is_complete(f"saes/{sae_id}") for sae_id in ids):
        ctx.progress(1.0, "every SAE of this sweep exists already")
        return {"sae_ids": ids, "reused": True, "steps": spec.steps}

    prom = _Prometheus()
    resume = ctx.checkpoint_get(CHECKPOINT)
    factory: dict[str, Any] = {}
    if spec.actors:
        from sae_shared.sae.groups import ray_trainer_factory

        factory["trainer_factory"] = ray_trainer_factory(spec.actors)
    try:
        run = ShardSetTraining(config, ctx.store, spec.acts_id, layer=spec.layer, tokens=spec.tokens,
                               resume=resume, **factory)
    except InvalidCheckpoint as exc:
        ctx.log.warning("unreadable training checkpoint; starting over", extra={"job_id": ctx.job_id,
                                                                                "error": str(exc)[:300]})
        run = ShardSetTraining(config, ctx.store, spec.acts_id, layer=spec.layer, tokens=spec.tokens, **factory)
    except (ShardSetError, ContractMismatch, ValueError) as exc:
        raise PermanentError(str(exc)) from exc
    assert run.sae_ids == ids, (run.sae_ids, ids)
    try:
        return _train(ctx, spec, run, prom, resumed_from=run.step if resume is not None else None)
    finally:
        run.close()


def _train(ctx: JobContext, spec: TrainSpec, run: Any, prom: _Prometheus, resumed_from: int | None) -> dict[str, Any]:
    total = run.total_steps
    started_at, started_step = time.monotonic(), run.step
    last_progress = 0.0
    latest: dict[int, Any] = {}
    if resumed_from is not None:
        ctx.log.info("resuming training", extra={"job_id": ctx.job_id, "step": resumed_from, "steps": total})

    def report(force: bool = False) -> None:
        nonlocal last_progress
        now = time.monotonic()
        if not force and now - last_progress < PROGRESS_SECONDS:
            return
        last_progress = now
        rate = (run.step - started_step) / max(now - started_at, 1e-9)
        metrics: dict[str, float] = {"step": run.step, "steps": total, "steps_per_s": round(rate, 3)}
        for i, m in sorted(latest.items()):
            suffix = f"_{i}" if len(run.sae_ids) > 1 else ""
            metrics.update({f"fvu{suffix}": round(m.fvu, 5), f"l0{suffix}": round(m.l0, 2),
                            f"dead{suffix}": m.n_dead})
        ctx.progress(TRAIN_SHARE * run.step / total, f"training step {run.step}/{total}", **metrics)

    for logged in run:
        prom.tokens.inc(run.config.batch_size)
        for m in logged:
            latest[m.member] = m
            prom.logged(run.sae_ids[m.member], m)
        if logged:
            prom.steps_per_s.set((run.step - started_step) / max(time.monotonic() - started_at, 1e-9))
        if run.step % spec.checkpoint_every == 0 or run.done or ctx.stopping:
            ctx.checkpoint_put(CHECKPOINT, run.state_bytes())
        report(force=bool(logged) or run.done)
        ctx.check_cancelled()

    ctx.progress(TRAIN_SHARE, "evaluating on the held-out rows")
    result = run.finish(max_eval_tokens=spec.max_eval_tokens, check=ctx.check_cancelled)
    ctx.progress(0.98, "publishing")
    published = []
    for sae_id, sae, history, evaluation in zip(run.sae_ids, result.saes, result.history, result.evaluations):
        _stage(ctx, spec, sae_id, sae, history, evaluation, run, result.n_steps, resumed_from)
        published.append({"sae_id": sae_id, "variant": sae.cfg.variant.kind, "d_sae": sae.d_sae,
                          **_json_floats(evaluation._asdict())})
    ctx.progress(1.0, f"trained {len(published)} SAE(s) for {result.n_steps} steps")
    return {
        "sae_ids": list(run.sae_ids),
        "reused": False,
        "steps": result.n_steps,
        "resumed_from": resumed_from,
        "tokens_read": run.data.tokens_read,
        "batches_read": run.data.batches_read,
        "heldout_tokens": run.data.heldout_tokens_read,
        "saes": published,
    }


def _stage(ctx: JobContext, spec: TrainSpec, sae_id: str, sae: Any, history: Any, evaluation: Any, run: Any,
           n_steps: int, resumed_from: int | None) -> None:
    """Stage ``saes/<sae_id>/``: the SAE's files (``sae_shared.sae.io``), ``metrics.jsonl`` and ``train.json``."""
    from sae_shared.sae.io import to_files

    files = to_files(sae)
    lines = [json.dumps({"kind": "train", **_json_floats(m._asdict())}) for m in history]
    lines.append(json.dumps({"kind": "eval", "split": f"{spec.acts_id}:heldout", "step": n_steps,
                             **_json_floats(evaluation._asdict())}))
    writer = ctx.artifact(f"saes/{sae_id}", overwrite=True)
    for name, data in files.items():
        if name != "cfg.json":
            writer.put_bytes(name, data)
    writer.put_bytes("metrics.jsonl", ("\n".join(lines) + "\n").encode(), content_type="application/x-ndjson")
    writer.put_json("train.json", {
        "job_id": ctx.job_id,
        "sae_id": sae_id,
        "spec": spec.model_dump(mode="json"),
        "member": run.sae_ids.index(sae_id),
        "sweep": list(run.sae_ids),
        "steps": n_steps,
        "tokens": n_steps * spec.batch_size,
        "resumed_from": resumed_from,
    })
    writer.put_bytes("cfg.json", files["cfg.json"], content_type="application/json")
    writer.commit({"kind": "sae", "sae_id": sae_id})


def _json_floats(d: dict[str, Any]) -> dict[str, Any]:
    import math

    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
