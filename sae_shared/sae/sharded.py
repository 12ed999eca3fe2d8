"""Training and statistics over a shard set in the object store (``activations/<acts_id>/``).

- :class:`ShardSetSplit`: one layer's tokens of a shard set, split **by rows** (image views): the last
  ``⌈heldout_fraction · n_rows⌉`` rows are held out, so no token of a held-out image is ever trained on (tokens of one
  image are strongly correlated, so a split by token would leak). Training batches stream from
  :class:`~sae_shared.loader.ShuffledReader` over the other rows; only full batches are used, so epoch ``e`` has
  ``⌊train_tokens / batch_size⌋`` batches and optimiser step ``s`` reads batch ``s mod that`` of epoch
  ``s div that``: the reader position is a function of the step.
- :class:`ShardSetTraining`: a resumable run of a sweep (every member trains on each batch; the batch is read once).
  The normalisation sample is the run's first batches, which are then trained on (not read twice).
  :meth:`ShardSetTraining.state_bytes` is a whole resume point (weights, optimiser states, counters, reader position)
  and ``ShardSetTraining(..., resume=those bytes)`` continues bit for bit where it was taken. Its
  ``trainer_factory`` spreads the sweep's members over Ray actors (``sae_shared.sae.groups``), with the same
  checkpoints and the same SAEs.
- :func:`sae_id_for`: the id an SAE trained from given inputs gets (a hash of the shard set, layer, tokens, the
  member's config and the shared training settings), known before training starts.
- :func:`shard_set_stats`: evaluation and per-latent statistics of any SAE (an imported one, say) over a shard set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from sae_shared.loader import ShuffledReader
from sae_shared.sae.checkpoint import pack_state, unpack_state
from sae_shared.sae.config import (
    Contract,
    SweepMember,
    TrainConfig,
    sae_config_to_dict,
    train_config_to_dict,
)
from sae_shared.sae.modeling import ContractMismatch, SparseAutoencoder
from sae_shared.sae.stats import LatentStats, compute_stats
from sae_shared.sae.training import MetricsCallback, Trainer, TrainResult, finish
from sae_shared.shards import ShardSet, ShardSetError

ID_SCHEMA = 1
"""Bump when what goes into :func:`sae_id_for` changes meaning."""
READER_OPTIONS = {"buffer_tokens": 1 << 18, "chunk_rows": 32}
"""Shuffled-reader settings of every training run (they fix the batch order, so they are part of the sae id)."""


# --------------------------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------------------------


def _shared_settings(config: TrainConfig, total_steps: int) -> dict[str, Any]:
    """The training settings every member shares that change what a member learns (not device or logging)."""
    doc = train_config_to_dict(config)
    for name in ("members", "device", "log_every", "eval_batch_size", "contract"):
        doc.pop(name, None)
    doc["total_steps"] = total_steps
    return doc


def sae_id_for(
    member: SweepMember, config: TrainConfig, *, acts_id: str, layer: int, tokens: str, total_steps: int
) -> str:
    """Id of the SAE that ``member`` of ``config`` becomes when trained on ``acts_id`` (24 hex digits).

    The same inputs give the same id (so a finished SAE is found instead of trained again); any change of the data,
    the member's architecture or lr, or the shared settings (batch size, steps, schedule, seeds, split) gives
    another. Other members of the sweep do not enter: they never influence this one.
    """
    doc = {
        "schema": ID_SCHEMA,
        "acts_id": acts_id,
        "layer": layer,
        "tokens": tokens,
        "reader": READER_OPTIONS,
        "sae": sae_config_to_dict(member.sae),
        "lr": member.lr,
        "train": _shared_settings(config, total_steps),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


class ShardSetSplit:
    """Training batches and held-out tokens of one layer and token selection of a shard set.

    ``batches_read`` / ``tokens_read`` count what the training stream has yielded and ``heldout_tokens_read`` what
    the held-out reader has, so a caller can check that a sweep read its data once.
    """

    def __init__(
        self,
        store: Any,
        acts_id: str,
        layer: int,
        tokens: str = "patches",
        *,
        batch_size: int,
        heldout_fraction: float = 0.1,
        seed: int = 0,
        prefetch: int = 4,
    ):
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.acts_id, self.layer, self.tokens, self.batch_size = acts_id, layer, tokens, batch_size
        self.shard_set = ShardSet(store, acts_id)
        meta = self.shard_set.metadata
        meta.layer_position(layer)  # ShardSetError naming the recorded layers
        n_rows = meta.n_rows
        n_heldout = max(1, math.ceil(n_rows * heldout_fraction))
        self.train_rows = n_rows - n_heldout
        if self.train_rows < 1:
            raise ShardSetError(
                f"shard set {acts_id} has {n_rows} rows: too few to hold out {heldout_fraction:.0%} and train on the rest"
            )
        self.reader = ShuffledReader(
            self.shard_set, layer, tokens, batch_size=batch_size, seed=seed, prefetch=prefetch, **READER_OPTIONS
        )
        # Keep only the chunks (parts of chunks) of the training rows.
        chunks = []
        for chunk in self.reader.chunks:
            first = meta.shard_rows(chunk.shard).start
            stop = min(chunk.rows.stop, self.train_rows - first)
            if stop > chunk.rows.start:
                chunks.append(dataclasses.replace(chunk, rows=range(chunk.rows.start, stop)))
        self.reader.chunks = chunks
        self.tokens_per_row = self.reader.tokens_per_row
        self.n_train_tokens = self.train_rows * self.tokens_per_row
        self.n_heldout_tokens = n_heldout * self.tokens_per_row
        self.batches_per_epoch = self.n_train_tokens // batch_size
        if self.batches_per_epoch < 1:
            raise ShardSetError(
                f"shard set {acts_id} has {self.n_train_tokens} training tokens ({tokens}, after holding out "
                f"{n_heldout} rows), fewer than one batch of {batch_size}; lower the batch size"
            )
        self.batches_read = 0
        self.tokens_read = 0
        self.heldout_tokens_read = 0

    @property
    def d_model(self) -> int:
        return self.shard_set.metadata.d_model

    def contract(self) -> Contract:
        """Backbone, layer and token selection of these activations."""
        return Contract(backbone_id=self.shard_set.metadata.backbone_id, layer=self.layer, tokens=self.tokens)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index in the epoch) of the batch that optimiser step ``step`` (0-based) trains on."""
        return divmod(step, self.batches_per_epoch)

    def train_batches(self, start_step: int = 0) -> Iterator[Tensor]:
        """Full ``[batch_size, d_model]`` float32 batches from step ``start_step`` on, epoch after epoch, endless."""
        epoch, batch = self.position(start_step)
        while True:
            for batch_nd in self.reader.epoch(epoch, start_batch=batch):
                if batch_nd.shape[0] < self.batch_size:
                    continue  # an epoch's last, partial batch is not trained on
                self.batches_read += 1
                self.tokens_read += batch_nd.shape[0]
                yield batch_nd
            epoch, batch = epoch + 1, 0

    def heldout_batches(self, batch_tokens: int = 8192, max_tokens: int | None = None) -> Iterator[Tensor]:
        """The held-out rows' tokens, in order, ``[<= batch_tokens, d_model]`` float32 (at most ``max_tokens``)."""
        yield from _row_batches(
            self.shard_set, self.layer, self.tokens, range(self.train_rows, self.shard_set.metadata.n_rows),
            self.tokens_per_row, batch_tokens, max_tokens, self._count_heldout,
        )

    def _count_heldout(self, n: int) -> None:
        self.heldout_tokens_read += n

    def close(self) -> None:
        self.reader.close()
        self.shard_set.close()


def _row_batches(
    shard_set: ShardSet,
    layer: int,
    tokens: str,
    rows: range,
    tokens_per_row: int,
    batch_tokens: int,
    max_tokens: int | None,
    count: Callable[[int], None] | None = None,
) -> Iterator[Tensor]:
    """Tokens of global ``rows`` in order, read shard by shard with ranged GETs, as float32 ``[n, d]`` batches."""
    meta = shard_set.metadata
    rows_per_read = max(1, batch_tokens // tokens_per_row)
    left = max_tokens if max_tokens is not None else math.inf
    for shard in range(meta.n_shards):
        span = meta.shard_rows(shard)
        lo, hi = max(rows.start, span.start), min(rows.stop, span.stop)
        for start in range(lo, hi, rows_per_read):
            if left <= 0:
                return
            stop = min(hi, start + rows_per_read)
            block = shard_set.read(shard, range(start - span.start, stop - span.start), layer, tokens)
            batch_nd = block.reshape(-1, block.shape[-1]).to(torch.float32)
            if batch_nd.shape[0] > left:
                batch_nd = batch_nd[: int(left)]
            left -= batch_nd.shape[0]
            if count is not None:
                count(batch_nd.shape[0])
            yield batch_nd


# --------------------------------------------------------------------------------------------------------------
# A resumable training run
# --------------------------------------------------------------------------------------------------------------


class ShardSetTraining:
    """Trains ``config``'s sweep on ``acts_id`` (layer ``layer``, tokens ``tokens``) one step per iteration.

    ::

        run = ShardSetTraining(config, store, acts_id, layer=11, resume=saved_bytes_or_None)
        for logged in run:                  # one optimiser step of every member per iteration
            if due: save(run.state_bytes())  # a whole resume point
        result = run.finish()               # held-out evaluation + per-latent statistics attached to each SAE

    ``config.contract`` is set from the shard set (a contract given in the config must agree with it), and
    ``total_steps`` is ``config.n_tokens // batch_size``, or one epoch of the training rows when ``n_tokens`` is
    None.
    """

    def __init__(
        self,
        config: TrainConfig,
        store: Any,
        acts_id: str,
        *,
        layer: int,
        tokens: str = "patches",
        resume: bytes | None = None,
        on_metrics: MetricsCallback | None = None,
        prefetch: int = 4,
        trainer_factory: Callable[..., Any] = Trainer,
    ):
        self.data = ShardSetSplit(
            store, acts_id, layer, tokens, batch_size=config.batch_size, heldout_fraction=config.heldout_fraction,
            seed=config.seed, prefetch=prefetch,
        )
        try:
            if self.data.d_model != config.d_model:
                raise ShardSetError(
                    f"shard set {acts_id} holds d_model={self.data.d_model} activations; the SAEs read "
                    f"d_model={config.d_model}"
                )
            contract = self.data.contract()
            if config.contract is not None and config.contract != contract:
                raise ContractMismatch(f"config.contract {config.contract} disagrees with the shard set's {contract}")
            self.config = config = dataclasses.replace(config, contract=contract)
            self.total_steps = (
                max(1, config.n_tokens // config.batch_size) if config.n_tokens is not None else self.data.batches_per_epoch
            )
            self.acts_id, self.layer, self.tokens = acts_id, layer, tokens
            self._make_trainer = trainer_factory
            self.sae_ids = [
                sae_id_for(m, config, acts_id=acts_id, layer=layer, tokens=tokens, total_steps=self.total_steps)
                for m in config.members
            ]
            self.fingerprint = hashlib.sha256(
                json.dumps({"ids": self.sae_ids, "log_every": config.log_every}, sort_keys=True).encode()
            ).hexdigest()
            if resume is not None:
                self._resume(resume, on_metrics)
            else:
                self._start(on_metrics)
        except BaseException:
            self.close()  # the reader, and trainer groups' Ray actors if they were started
            raise

    def _start(self, on_metrics: MetricsCallback | None) -> None:
        cfg = self.config
        self._batches = self.data.train_batches(0)
        head: list[Tensor] = []
        n = 0
        while n < cfg.norm_sample_tokens and len(head) < self.total_steps:
            head.append(next(self._batches))
            n += head[-1].shape[0]
        sample_nd = torch.cat(head)[: cfg.norm_sample_tokens]
        self.trainer = self._make_trainer(cfg, total_steps=self.total_steps, init_sample_nd=sample_nd,
                                          on_metrics=on_metrics)
        self._head = head  # trained on first: the sample is not read twice

    def _resume(self, resume: bytes, on_metrics: MetricsCallback | None) -> None:
        state = unpack_state(resume)
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "the training checkpoint belongs to another run (different shard set, layer, tokens or settings); "
                "start without it"
            )
        placeholder_nd = torch.zeros(1, self.config.d_model)  # weights and normalisation come from the state
        self.trainer = self._make_trainer(self.config, total_steps=self.total_steps, init_sample_nd=placeholder_nd,
                                          on_metrics=on_metrics)
        self.trainer.load_state_dict(state["trainer"])
        step = self.trainer.step_count
        if tuple(state["position"][k] for k in ("epoch", "batch")) != self.data.position(step):
            raise ValueError(f"training checkpoint position {state['position']} does not match step {step}")
        self.data.batches_read, self.data.tokens_read = step, step * self.config.batch_size  # consumed before
        self._batches = self.data.train_batches(step)
        self._head = []

    # ---- the loop ----------------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimiser steps done."""
        return self.trainer.step_count

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def __iter__(self):
        while not self.done:
            batch_nd = self._head.pop(0) if self._head else next(self._batches)
            yield self.trainer.step(batch_nd)

    def state_bytes(self) -> bytes:
        """A whole resume point: weights, optimiser states, counters, metrics so far and the reader position."""
        epoch, batch = self.data.position(self.step)
        return pack_state({
            "fingerprint": self.fingerprint,
            "position": {"step": self.step, "epoch": epoch, "batch": batch},
            "trainer": self.trainer.state_dict(),
        })

    def finish(self, *, max_eval_tokens: int | None = None, check: Callable[[], None] | None = None) -> TrainResult:
        """Evaluate every SAE over the held-out rows (read once for the whole sweep) and attach the statistics.

        ``check`` is called between held-out batches (a job's cancellation check)."""
        if not self.done:
            raise RuntimeError(f"training stopped at step {self.step} of {self.total_steps}; iterate the run first")

        def heldout() -> Iterator[Tensor]:
            for batch_nd in self.data.heldout_batches(self.config.eval_batch_size, max_eval_tokens):
                if check is not None:
                    check()
                yield batch_nd

        return finish(self.trainer, heldout(), source=f"{self.acts_id}:heldout")

    def close(self) -> None:
        self.data.close()
        close = getattr(getattr(self, "trainer", None), "close", None)
        if close is not None:  # trainer groups in Ray actors
            close()


# --------------------------------------------------------------------------------------------------------------
# Statistics of any SAE over a shard set
# --------------------------------------------------------------------------------------------------------------


def shard_set_stats(
    sae: SparseAutoencoder,
    store: Any,
    acts_id: str,
    *,
    layer: int | None = None,
    tokens: str | None = None,
    max_tokens: int | None = None,
    batch_tokens: int = 8192,
    check: Callable[[], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> LatentStats:
    """Evaluation metrics and per-latent statistics of ``sae`` over every row of ``acts_id`` (or its first
    ``max_tokens`` tokens), attached to the SAE.

    ``layer`` / ``tokens`` default to the SAE's contract; the shard set must come from the contract's backbone
    (``ContractMismatch`` otherwise). ``on_batch(tokens_done, tokens_total)`` reports progress.
    """
    shard_set = ShardSet(store, acts_id)
    try:
        meta = shard_set.metadata
        contract = sae.contract
        if contract is not None:
            layer = contract.layer if layer is None else layer
            tokens = contract.tokens if tokens is None else tokens
            sae.check_contract(meta.backbone_id, layer, tokens)
        if layer is None or tokens is None:
            raise ValueError("this SAE records no contract: pass layer and tokens")
        if meta.d_model != sae.d_model:
            raise ShardSetError(f"shard set {acts_id} holds d_model={meta.d_model}; the SAE reads {sae.d_model}")
        meta.layer_position(layer)
        per_row = len(meta.token_layout.select(tokens))
        total = meta.n_rows * per_row if max_tokens is None else min(max_tokens, meta.n_rows * per_row)
        done = 0

        def batches() -> Iterator[Tensor]:
            nonlocal done
            for batch_nd in _row_batches(shard_set, layer, tokens, range(meta.n_rows), per_row, batch_tokens, max_tokens):
                if check is not None:
                    check()
                yield batch_nd
                done += batch_nd.shape[0]
                if on_batch is not None:
                    on_batch(done, total)

        return compute_stats(sae, batches(), batch_size=batch_tokens, source=acts_id, attach=True)
    finally:
        shard_set.close()
