"""Training of a sweep of SAEs on the same batches in one pass, then their evaluation and per-latent statistics.

``train_sae(config, data_nd)`` is the in-memory entry point: it holds out a split, estimates the input
normalisation and ``b_dec`` from the training split, trains every sweep member on each batch in turn (so the data
is read once), and evaluates every SAE over the held-out split (``stats.compute_stats_many``), attaching the
statistics to it. ``Trainer`` is the loop underneath, fed batch by batch; it has ``state_dict`` /
``load_state_dict`` so a job can checkpoint and resume it.

Per step, per member: lr schedule → forward (autocast) → backward → remove the decoder gradient's parallel part →
clip → Adam step → renormalise decoder rows → update the dead-latent counters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sae_shared.sae.config import BatchTopK, Relu, TopK, TrainConfig
from sae_shared.sae.modeling import Normalisation, SparseAutoencoder, SparseCodes, latent_counts
from sae_shared.sae.stats import DENSE_FREQUENCY, EvalMetrics, compute_stats_many, decoder_coherence


class TrainMetrics(NamedTuple):
    """One logged point of one sweep member (batch values; errors in normalised units)."""

    member: int
    """Index of the sweep member."""
    step: int
    """Optimiser steps done (1 after the first)."""
    tokens: int
    """Training tokens seen."""
    lr: float
    """Learning rate of this step."""
    loss: float
    """Total objective."""
    mse: float
    """Mean squared error per element."""
    fvu: float
    """Normalised MSE (fraction of variance unexplained) of the batch."""
    explained_variance: float
    """1 - fvu."""
    l0: float
    """Mean active latents per token."""
    sparsity: float
    """L1 term (ReLU), else 0."""
    aux: float
    """AuxK term, else 0."""
    n_dead: int
    """Latents that have not fired in the last ``dead_window_tokens`` tokens."""
    n_dense: int
    """Latents that fired on more than 1e-2 of the tokens since the previous log (of the logged step's batch for
    dense codes, ReLU and BatchTopK, whose exact per-latent counts are taken only on logged steps)."""
    decoder_coherence: float
    """Largest |cosine| between distinct decoder rows."""


class TrainResult(NamedTuple):
    """What ``train_sae`` returns."""

    saes: tuple[SparseAutoencoder, ...]
    """The trained SAEs, in sweep order, in eval mode, each with ``stats`` (held-out statistics) attached."""
    evaluations: tuple[EvalMetrics, ...]
    """Held-out metrics of each SAE (also ``sae.stats.metrics``)."""
    history: tuple[tuple[TrainMetrics, ...], ...]
    """Logged training metrics of each member."""
    n_steps: int
    """Optimiser steps taken (the same for every member)."""


MetricsCallback = Callable[[TrainMetrics], None]


# --------------------------------------------------------------------------------------------------------------
# Initialisation from data
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def estimate_normalisation(sample_nd: Tensor, kind: str) -> Normalisation:
    """Mean and scalar scale such that, after ``(x - mean) / scale``, E‖x‖² = d (``kind``: see ``SAEConfig``)."""
    x = sample_nd.double()
    d = x.shape[1]
    if kind == "none":
        return Normalisation(torch.zeros(d), 1.0)
    mean = x.mean(0) if kind == "mean_scale" else torch.zeros(d, dtype=torch.float64)
    ms = float((x - mean).pow(2).sum(1).mean()) / d
    scale = math.sqrt(ms) if ms > 0 else 1.0
    return Normalisation(mean.float(), scale)


@torch.no_grad()
def geometric_median(x_nd: Tensor, *, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Point minimising the sum of Euclidean distances to the rows of ``x_nd`` (Weiszfeld iterations)."""
    x = x_nd.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-12)
        new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        if float((new - m).norm()) <= tol * max(1.0, float(m.norm())):
            m = new
            break
        m = new
    return m.float()


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


class Trainer:
    """Trains every member of ``config.members`` on each batch given to ``step``.

    ``init_sample_nd`` (raw training activations, e.g. the first ``norm_sample_tokens``) sets each SAE's input
    normalisation and ``b_dec``; ``total_steps`` drives the cosine schedule and the last log.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        total_steps: int,
        init_sample_nd: Tensor,
        on_metrics: MetricsCallback | None = None,
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        _check_data(init_sample_nd, config.d_model, "init_sample_nd")
        self.config = config
        self.total_steps = total_steps
        self.on_metrics = on_metrics
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            # Adam's second moments of rarely-used weights decay into subnormal floats, which make CPU kernels
            # ~5x slower (measured on the planted-dictionary test). Process-wide, and harmless to accuracy.
            torch.set_flush_denormal(True)
        self.step_count = 0
        self.tokens = 0
        self.history: list[list[TrainMetrics]] = [[] for _ in config.members]

        sample = init_sample_nd[: config.norm_sample_tokens].to(self.device).float()
        norms: dict[str, Normalisation] = {}
        self.saes: list[SparseAutoencoder] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        for member in config.members:
            cfg = member.sae
            sae = SparseAutoencoder(cfg, contract=config.contract).to(self.device)
            if cfg.input_norm not in norms:
                norms[cfg.input_norm] = estimate_normalisation(sample, cfg.input_norm)
            norm = norms[cfg.input_norm]
            sae.set_normalisation(norm.mean, norm.scale)
            with torch.no_grad():
                if cfg.b_dec_init == "mean":
                    sae.b_dec.copy_(sae.normalise(sample).mean(0))
                elif cfg.b_dec_init == "geometric_median":
                    sae.b_dec.copy_(geometric_median(sae.normalise(sample)))
            sae.train()
            self.saes.append(sae)
            self.optimizers.append(_adam(sae, member.lr, config))
        # Per member: tokens since each latent last fired (dead detection) and fires since the last log (dense).
        self.since_fired = [torch.zeros(m.sae.d_sae, dtype=torch.int64, device=self.device) for m in config.members]
        self.window_fires = [torch.zeros(m.sae.d_sae, dtype=torch.int64, device=self.device) for m in config.members]
        self.window_tokens = 0
        self.window_counted = [0 for _ in config.members]  # tokens whose fires were counted, per member

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at 0-based ``step``: linear warmup, then constant or cosine to 0."""
        cfg = self.config
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(1, self.total_steps - cfg.warmup_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _autocast(self):
        if self.config.autocast == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch_nd: Tensor) -> list[TrainMetrics]:
        """One optimiser step of every member on raw activations ``batch_nd``; returns the metrics logged."""
        batch_nd = batch_nd.to(self.device, non_blocking=True).float()
        n = batch_nd.shape[0]
        step = self.step_count
        factor = self.lr_factor(step)
        log_now = (step + 1) % self.config.log_every == 0 or step + 1 == self.total_steps
        outs = []
        for i, (member, sae, opt) in enumerate(zip(self.config.members, self.saes, self.optimizers)):
            cfg = member.sae
            lr = member.lr * factor
            for group in opt.param_groups:
                group["lr"] = lr
            dead_mask = None
            if isinstance(cfg.variant, (TopK, BatchTopK)) and cfg.variant.aux_coeff > 0:
                dead_mask = self.since_fired[i] >= self.config.dead_window_tokens
            sparsity_scale = 1.0
            if isinstance(cfg.variant, Relu) and cfg.variant.l1_warmup_steps:
                sparsity_scale = min(1.0, (step + 1) / cfg.variant.l1_warmup_steps)

            with self._autocast():
                out = sae(batch_nd, dead_mask=dead_mask, sparsity_scale=sparsity_scale, metrics=log_now)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.remove_parallel_grad:
                sae.remove_parallel_grad_()
            if self.config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.config.max_grad_norm)
            opt.step()
            if cfg.normalize_decoder:
                sae.normalize_decoder_()

            fired_s = out.fired if out.fired is not None else _fire_counts(out.codes, cfg.d_sae) > 0
            self.since_fired[i] += n
            self.since_fired[i].masked_fill_(fired_s, 0)  # not `[fired_s] = 0`: a boolean index waits for the GPU
            if out.fires is not None:
                self.window_fires[i] += out.fires
                self.window_counted[i] += n
            outs.append((out, lr))

        self.step_count += 1
        self.tokens += n
        self.window_tokens += n
        logged: list[TrainMetrics] = []
        if log_now:
            for i, (sae, (out, lr)) in enumerate(zip(self.saes, outs)):
                fvu = float(out.fvu)
                coherence, _ = decoder_coherence(sae.W_dec.detach())
                m = TrainMetrics(
                    member=i,
                    step=self.step_count,
                    tokens=self.tokens,
                    lr=lr,
                    loss=float(out.loss.detach()),
                    mse=float(out.mse.detach()),
                    fvu=fvu,
                    explained_variance=1.0 - fvu,
                    l0=float(out.l0),
                    sparsity=float(out.sparsity.detach()),
                    aux=float(out.aux.detach()),
                    n_dead=int((self.since_fired[i] >= self.config.dead_window_tokens).sum()),
                    n_dense=int((self.window_fires[i].double() / max(1, self.window_counted[i]) > DENSE_FREQUENCY)
                                .sum()),
                    decoder_coherence=coherence,
                )
                self.history[i].append(m)
                logged.append(m)
                if self.on_metrics is not None:
                    self.on_metrics(m)
                self.window_fires[i].zero_()
                self.window_counted[i] = 0
            self.window_tokens = 0
        return logged

    # ---- checkpoint / resume ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, optimiser states, counters (the data position is the caller's)."""
        return {
            "step_count": self.step_count,
            "tokens": self.tokens,
            "window_tokens": self.window_tokens,
            "members": [
                {
                    "sae": {k: v.detach().clone() for k, v in sae.state_dict().items()},
                    "threshold_updates": sae.threshold_updates,
                    "optimizer": opt.state_dict(),
                    "since_fired": since.clone(),
                    "window_fires": window.clone(),
                    "window_counted": counted,
                    "history": [m._asdict() for m in hist],
                }
                for sae, opt, since, window, counted, hist in zip(
                    self.saes, self.optimizers, self.since_fired, self.window_fires, self.window_counted, self.history
                )
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["members"]) != len(self.saes):
            raise ValueError(f"checkpoint has {len(state['members'])} members, this sweep {len(self.saes)}")
        self.step_count = int(state["step_count"])
        self.tokens = int(state["tokens"])
        self.window_tokens = int(state["window_tokens"])
        for i, member in enumerate(state["members"]):
            self.saes[i].load_state_dict(member["sae"])
            self.saes[i].threshold_updates = int(member["threshold_updates"])
            self.optimizers[i].load_state_dict(member["optimizer"])
            _match_state_layout(self.optimizers[i])
            self.since_fired[i].copy_(member["since_fired"])
            self.window_fires[i].copy_(member["window_fires"])
            self.window_counted[i] = int(member.get("window_counted", self.window_tokens))
            self.history[i] = [TrainMetrics(**m) for m in member["history"]]


def _match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give each restored optimiser state tensor its parameter's memory layout: a fused kernel walks parameter,
    gradient and moments as flat memory, so moments restored contiguous beside a parameter with other strides
    would pair the wrong elements."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _adam(sae: SparseAutoencoder, lr: float, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam, fused where torch has the kernel (CPU and CUDA): one pass over each parameter instead of ~8 (measured
    here at d=768, d_sae=12288: 15 ms a step against 170 ms)."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=config.adam_betas, eps=config.adam_eps, fused=True)
    except (RuntimeError, ValueError):  # a device without the fused kernel
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=config.adam_betas, eps=config.adam_eps)


def _fire_counts(codes: Tensor | SparseCodes, d_sae: int) -> Tensor:
    """Tokens of the batch on which each latent fired, ``[d_sae]`` int64."""
    with torch.no_grad():
        if isinstance(codes, SparseCodes):
            return latent_counts(codes.indices, d_sae, codes.values > 0)
        return (codes > 0).sum(0)


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------


def train_on_batches(
    config: TrainConfig,
    batches: Iterable[Tensor],
    *,
    total_steps: int,
    init_sample_nd: Tensor,
    heldout: Tensor | Iterable[Tensor],
    on_metrics: MetricsCallback | None = None,
    heldout_source: str = "heldout",
) -> TrainResult:
    """Train the sweep on ``total_steps`` batches drawn from ``batches`` (each read once, shared by all members),
    then evaluate every SAE over ``heldout``."""
    trainer = Trainer(config, total_steps=total_steps, init_sample_nd=init_sample_nd, on_metrics=on_metrics)
    it = iter(batches)
    for _ in range(total_steps):
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(f"batches ran out after {trainer.step_count} of {total_steps} steps") from None
        trainer.step(batch)
    return finish(trainer, heldout, source=heldout_source)


def finish(trainer: Trainer, heldout: Tensor | Iterable[Tensor], *, source: str = "heldout") -> TrainResult:
    """Evaluate every SAE of ``trainer`` over ``heldout`` (one pass), attach the statistics, switch to eval mode."""
    saes = list(trainer.saes)  # read once: trainer groups return copies
    for sae in saes:
        sae.eval()
    stats = compute_stats_many(saes, heldout, batch_size=trainer.config.eval_batch_size, source=source, attach=True)
    return TrainResult(
        saes=tuple(saes),
        evaluations=tuple(s.metrics for s in stats),
        history=tuple(tuple(h) for h in trainer.history),
        n_steps=trainer.step_count,
    )


def train_sae(
    config: TrainConfig,
    data: Tensor | str,
    *,
    on_metrics: MetricsCallback | None = None,
    store: Any = None,
    layer: int | None = None,
    tokens: str = "patches",
) -> TrainResult:
    """Train ``config``'s sweep and evaluate it on a held-out split.

    ``data`` is either raw activations ``[n, d_model]`` in memory, or the id of a shard set in ``store`` (an
    ``sae_shared.storage.ObjectStore``), read layer ``layer`` (default: the set's only layer) and token selection
    ``tokens``.

    In memory, a seeded permutation holds out ``heldout_fraction`` of the rows and batches are drawn from the rest in
    a fresh seeded order each epoch. From a shard set, the last ``heldout_fraction`` of its rows (images) are held
    out and batches stream from the shuffled reader over the others (``sae_shared.sae.sharded``); the contract is
    the set's backbone, ``layer`` and ``tokens``. Steps = ``n_tokens // batch_size`` (one epoch when ``n_tokens`` is
    None). For checkpoints and resumption use ``sharded.ShardSetTraining`` (what the ``train`` job runs).
    """
    if isinstance(data, str):
        from sae_shared.sae.sharded import ShardSetTraining

        if store is None:
            raise ValueError(f"training from shard set {data!r} needs store= (an sae_shared.storage.ObjectStore)")
        if layer is None:
            from sae_shared.shards import ShardSet

            shard_set = ShardSet(store, data)
            layers = shard_set.metadata.layers
            shard_set.close()
            if len(layers) != 1:
                raise ValueError(f"shard set {data!r} holds layers {list(layers)}: pass layer= to choose one")
            layer = layers[0]
        run = ShardSetTraining(config, store, data, layer=layer, tokens=tokens, on_metrics=on_metrics)
        try:
            for _ in run:
                pass
            return run.finish()
        finally:
            run.close()
    _check_data(data, config.d_model, "data")
    gen = torch.Generator().manual_seed(config.seed)
    n = data.shape[0]
    n_heldout = max(1, int(round(n * config.heldout_fraction)))
    if n - n_heldout < config.batch_size:
        raise ValueError(
            f"{n - n_heldout} training tokens (after holding out {n_heldout}) are fewer than batch_size="
            f"{config.batch_size}; pass more data or lower batch_size"
        )
    perm = torch.randperm(n, generator=gen)
    heldout_nd = data[perm[:n_heldout]]
    train_nd = data[perm[n_heldout:]]
    n_tokens = config.n_tokens if config.n_tokens is not None else train_nd.shape[0]
    total_steps = max(1, n_tokens // config.batch_size)
    return train_on_batches(
        config,
        _epoch_batches(train_nd, config.batch_size, config.seed),
        total_steps=total_steps,
        init_sample_nd=train_nd[: config.norm_sample_tokens],
        heldout=heldout_nd,
        on_metrics=on_metrics,
    )


def _epoch_batches(train_nd: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless full batches: each epoch is a fresh permutation (seeded by ``seed`` and the epoch number)."""
    n = train_nd.shape[0]
    carry = torch.empty(0, dtype=torch.int64)
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1))
        order = torch.cat([carry, order])
        full = (order.numel() // batch_size) * batch_size
        for start in range(0, full, batch_size):
            yield train_nd[order[start : start + batch_size]]
        carry = order[full:]
        epoch += 1


def _check_data(data: Tensor, d_model: int, name: str) -> None:
    if not isinstance(data, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [n, d_model], got {type(data).__name__}")
    if data.ndim != 2 or data.shape[1] != d_model:
        raise ValueError(f"{name} must be [n, {d_model}] (the config's d_model), got shape {tuple(data.shape)}")
    if not data.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {data.dtype}")
    if data.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(data).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
