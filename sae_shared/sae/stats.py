"""Evaluation metrics and per-latent statistics of an SAE over a split of activations.

Computed in one streaming pass (any number of tokens, bounded memory) and saved with the SAE
(``stats.safetensors`` + the ``statistics`` block of ``cfg.json``). Later stages read them: the interventions'
"relative to the latent's maximum" and the services' TopFeatures.

Per latent: firing frequency, mean activation when firing, maximum, and a streaming estimate of the 99th
percentile of its *positive* activations; over latents: the histogram of log10 firing frequency.

The percentile uses a per-latent log-spaced histogram whose window of ``n_bins`` bins follows the latent's running
maximum (bins that fall below the window are only counted): a high quantile lands in the window unless the
activations span more than ``bin_ratio ** n_bins`` (≈ 2·10⁴ by default), and its relative error is below
``bin_ratio`` (2%).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from sae_shared.sae.modeling import SparseAutoencoder, SparseCodes

DENSE_FREQUENCY = 1e-2
"""A latent firing on more than this fraction of tokens is dense."""
LOG_FREQ_EDGES = torch.linspace(-10.0, 0.0, 41, dtype=torch.float64)
"""Bin edges (log10 of frequency) of the log-frequency histogram; never-firing latents are counted apart."""


class EvalMetrics(NamedTuple):
    """Quality of an SAE over a split. Errors are in the SAE's normalised input space."""

    n_tokens: int
    """Tokens evaluated."""
    l0: float
    """Mean number of active latents per token."""
    mse: float
    """Mean squared reconstruction error per element."""
    fvu: float
    """Normalised MSE: fraction of variance unexplained, Σ‖x - x̂‖² / Σ‖x - x̄‖²."""
    explained_variance: float
    """1 - fvu."""
    n_dead: int
    """Latents that never fired on the split."""
    n_dense: int
    """Latents firing on more than 1e-2 of the tokens."""
    decoder_coherence: float
    """Largest |cosine| between two distinct decoder rows."""
    decoder_coherence_mean: float
    """Mean over latents of the largest |cosine| with any other decoder row."""


@dataclass(frozen=True)
class LatentStats:
    """Per-latent statistics of an SAE over a split (all tensors on the CPU)."""

    n_tokens: int
    """Tokens the statistics were computed over."""
    frequency: Tensor
    """``[d_sae]`` float64 fraction of tokens on which the latent fired (activation > 0)."""
    mean_when_firing: Tensor
    """``[d_sae]`` mean activation over the tokens where it fired (0 if it never fired)."""
    max: Tensor
    """``[d_sae]`` largest activation (0 if it never fired)."""
    p99: Tensor
    """``[d_sae]`` streaming estimate of the 99th percentile of its positive activations (0 if it never fired)."""
    log_freq_edges: Tensor
    """``[b + 1]`` float64 edges, in log10(frequency), of the log-frequency histogram."""
    log_freq_counts: Tensor
    """``[b]`` int64 latents per bin (never-firing latents are not in it: see ``n_dead``)."""
    metrics: EvalMetrics | None = None
    """Reconstruction quality over the same split."""
    source: str = ""
    """Where the split came from, e.g. ``heldout`` or a shard-set id."""
    quantile: float = 0.99
    """The quantile ``p99`` estimates."""

    @property
    def n_dead(self) -> int:
        return int((self.frequency == 0).sum())

    TENSORS = ("frequency", "mean_when_firing", "max", "p99", "log_freq_edges", "log_freq_counts")


# --------------------------------------------------------------------------------------------------------------
# Streaming quantile of positive values, per latent
# --------------------------------------------------------------------------------------------------------------

_NO_TOP = -(1 << 62)


class StreamingQuantile:
    """Per-row log-histogram over a sliding window of ``n_bins`` bins below each row's running maximum."""

    def __init__(self, n_rows: int, *, n_bins: int = 512, bin_ratio: float = 1.02, device: torch.device | str = "cpu"):
        self.n_bins = n_bins
        self.log_width = math.log(bin_ratio)
        self.counts_rb = torch.zeros(n_rows, n_bins, dtype=torch.int64, device=device)
        self.top_r = torch.full((n_rows,), _NO_TOP, dtype=torch.int64, device=device)  # bin index of column 0
        self.below_r = torch.zeros(n_rows, dtype=torch.int64, device=device)  # values under the window

    def add(self, rows_m: Tensor, values_m: Tensor) -> None:
        """Fold positive ``values_m`` into the histograms of ``rows_m``."""
        if rows_m.numel() == 0:
            return
        bins_m = torch.floor(torch.log(values_m.double()) / self.log_width).long()
        batch_top_r = torch.full_like(self.top_r, _NO_TOP).scatter_reduce(0, rows_m, bins_m, reduce="amax")
        new_top_r = torch.maximum(self.top_r, batch_top_r)
        shift_r = new_top_r - self.top_r
        moved = (shift_r > 0).nonzero().squeeze(-1)
        if moved.numel():
            # Column j holds bin top - j; raising top by s moves column j to j + s, the last s columns fall out.
            shift_m1 = shift_r[moved].clamp(max=self.n_bins).unsqueeze(1)
            old_mb = self.counts_rb[moved]
            cols_1b = torch.arange(self.n_bins, device=old_mb.device).unsqueeze(0)
            fallen_m = (old_mb * (cols_1b >= self.n_bins - shift_m1)).sum(1)
            src_mb = cols_1b - shift_m1
            new_mb = old_mb.gather(1, src_mb.clamp(min=0)) * (src_mb >= 0)
            self.counts_rb[moved] = new_mb
            self.below_r[moved] += fallen_m
            self.top_r[moved] = new_top_r[moved]
        cols_m = self.top_r[rows_m] - bins_m
        inside = cols_m < self.n_bins
        flat_m = rows_m[inside] * self.n_bins + cols_m[inside]
        self.counts_rb.view(-1).index_add_(0, flat_m, torch.ones_like(flat_m))
        self.below_r.index_add_(0, rows_m[~inside], torch.ones_like(rows_m[~inside]))

    def quantile(self, q: float, maxima_r: Tensor) -> Tensor:
        """Nearest-rank ``q`` quantile of each row (0 where a row saw nothing), as a bin's geometric middle."""
        total_r = self.counts_rb.sum(1) + self.below_r
        # Rank from the top of the nearest-rank q-quantile: n - ceil(q n) + 1 (the small slack absorbs q's rounding).
        rank_r = total_r - torch.ceil(total_r.double() * q - 1e-9).long() + 1
        cum_rb = self.counts_rb.cumsum(1)
        col_r = (cum_rb < rank_r.unsqueeze(1)).sum(1)  # first column reaching the rank
        col_r = col_r.clamp(max=self.n_bins - 1)  # rank below the window: its lowest bin is the best we know
        value_r = torch.exp((self.top_r - col_r).double().add(0.5) * self.log_width)
        value_r = torch.minimum(value_r, maxima_r.double())
        return torch.where(total_r > 0, value_r, torch.zeros_like(value_r)).float()


# --------------------------------------------------------------------------------------------------------------
# Accumulator over batches
# --------------------------------------------------------------------------------------------------------------


class StatsAccumulator:
    """Streams batches of (normalised inputs, codes, reconstructions) and produces ``LatentStats``."""

    def __init__(self, d_sae: int, *, device: torch.device | str = "cpu", quantile: float = 0.99):
        self.d_sae = d_sae
        self.q = quantile
        self.n_tokens = 0
        self.count_s = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum_s = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max_s = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.quantiles = StreamingQuantile(d_sae, device=device)
        self.sq_err = 0.0
        self.sum_x_d: Tensor | None = None
        self.sum_sq_x = 0.0
        self.sum_l0 = 0.0

    @torch.no_grad()
    def update_codes(self, codes: Tensor | SparseCodes) -> None:
        """Fold the codes of a batch (dense ``[n, d_sae]`` or ``SparseCodes``) into the per-latent statistics."""
        if isinstance(codes, SparseCodes):
            values_nk = codes.values.reshape(-1, codes.values.shape[-1]).float()
            idx_nk = codes.indices.reshape(values_nk.shape)
            firing = values_nk > 0
            lat_m, val_m = idx_nk[firing], values_nk[firing]
            n = values_nk.shape[0]
        else:
            f_ns = codes.reshape(-1, self.d_sae).float()
            firing = f_ns > 0
            tok_m, lat_m = firing.nonzero(as_tuple=True)
            val_m = f_ns[tok_m, lat_m]
            n = f_ns.shape[0]
        self.n_tokens += n
        self.sum_l0 += float(lat_m.numel())
        self.count_s.index_add_(0, lat_m, torch.ones_like(lat_m))
        self.sum_s.index_add_(0, lat_m, val_m.double())
        self.max_s.scatter_reduce_(0, lat_m, val_m, reduce="amax")
        self.quantiles.add(lat_m, val_m)

    @torch.no_grad()
    def update_recon(self, x_n_nd: Tensor, recon_n_nd: Tensor) -> None:
        """Fold a batch of normalised inputs and their reconstructions into the error metrics."""
        x = x_n_nd.double()
        self.sq_err += float((recon_n_nd.double() - x).pow(2).sum())
        s = x.sum(0)
        self.sum_x_d = s if self.sum_x_d is None else self.sum_x_d + s
        self.sum_sq_x += float(x.pow(2).sum())

    def finish(self, W_dec_sd: Tensor | None = None, *, source: str = "") -> LatentStats:
        n = self.n_tokens
        count = self.count_s.cpu()
        frequency = count.double() / max(n, 1)
        mean_when_firing = torch.where(count > 0, self.sum_s.cpu() / count.clamp_min(1), 0.0).float()
        p99 = self.quantiles.quantile(self.q, self.max_s).cpu()
        log_freq_counts = log_frequency_histogram(frequency)
        metrics = None
        if self.sum_x_d is not None and n > 0:
            d = self.sum_x_d.numel()
            total_var = self.sum_sq_x - float(self.sum_x_d.pow(2).sum()) / n
            fvu = self.sq_err / total_var if total_var > 0 else float("nan")
            coh_max, coh_mean = decoder_coherence(W_dec_sd) if W_dec_sd is not None else (float("nan"),) * 2
            metrics = EvalMetrics(
                n_tokens=n,
                l0=self.sum_l0 / n,
                mse=self.sq_err / (n * d),
                fvu=fvu,
                explained_variance=1.0 - fvu,
                n_dead=int((count == 0).sum()),
                n_dense=int((frequency > DENSE_FREQUENCY).sum()),
                decoder_coherence=coh_max,
                decoder_coherence_mean=coh_mean,
            )
        return LatentStats(
            n_tokens=n,
            frequency=frequency,
            mean_when_firing=mean_when_firing,
            max=self.max_s.cpu().clone(),
            p99=p99,
            log_freq_edges=LOG_FREQ_EDGES.clone(),
            log_freq_counts=log_freq_counts,
            metrics=metrics,
            source=source,
            quantile=self.q,
        )


def log_frequency_histogram(frequency_s: Tensor) -> Tensor:
    """Latents per log10-frequency bin of ``LOG_FREQ_EDGES`` (zero-frequency latents left out; lower ones clamped)."""
    fired = frequency_s[frequency_s > 0]
    n_bins = LOG_FREQ_EDGES.numel() - 1
    lo, hi = float(LOG_FREQ_EDGES[0]), float(LOG_FREQ_EDGES[-1])
    pos = ((torch.log10(fired) - lo) / (hi - lo) * n_bins).floor().long().clamp(0, n_bins - 1)
    return torch.bincount(pos, minlength=n_bins).to(torch.int64)


@torch.no_grad()
def decoder_coherence(W_dec_sd: Tensor, *, chunk: int = 4096) -> tuple[float, float]:
    """(max, mean over rows of the row max) of |cos| between distinct decoder rows, without the full Gram matrix."""
    s = W_dec_sd.shape[0]
    if s < 2:
        return 0.0, 0.0
    w_sd = W_dec_sd.float() / W_dec_sd.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    row_max = torch.empty(s, device=w_sd.device)
    for start in range(0, s, chunk):
        stop = min(s, start + chunk)
        cos_cs = (w_sd[start:stop] @ w_sd.t()).abs()
        diag = torch.arange(start, stop, device=w_sd.device)
        cos_cs[diag - start, diag] = -1.0  # exclude each row with itself
        row_max[start:stop] = cos_cs.max(dim=1).values
    return float(row_max.max()), float(row_max.mean())


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_stats(
    sae: SparseAutoencoder,
    data: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 8192,
    source: str = "",
    attach: bool = True,
) -> LatentStats:
    """Evaluation metrics and per-latent statistics of ``sae`` over raw activations ``data``.

    ``data`` is an ``[n, d_model]`` tensor (read in batches of ``batch_size``) or an iterable of ``[b, d_model]``
    batches (e.g. a shard reader). With ``attach`` the result is also stored as ``sae.stats``.
    """
    return compute_stats_many([sae], data, batch_size=batch_size, source=source, attach=attach)[0]


@torch.no_grad()
def compute_stats_many(
    saes: Sequence[SparseAutoencoder],
    data: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 8192,
    source: str = "",
    attach: bool = True,
) -> list[LatentStats]:
    """``compute_stats`` for several SAEs of the same width in one pass over the data (each batch read once)."""
    if not saes:
        return []
    device = saes[0].W_dec.device
    accs = [StatsAccumulator(s.d_sae, device=device) for s in saes]
    was_training = [s.training for s in saes]
    for s in saes:
        s.eval()
    try:
        for batch_nd in _batches_of(data, batch_size):
            batch_nd = batch_nd.to(device)
            for sae, acc in zip(saes, accs):
                x_n = sae.normalise(batch_nd)
                codes = sae.encode_sparse(batch_nd) if _is_topk(sae) else sae.encode(batch_nd)
                recon = sae.decode(codes)
                acc.update_codes(codes)
                acc.update_recon(x_n, sae.normalise(recon))
    finally:
        for s, t in zip(saes, was_training):
            s.train(t)
    out = []
    for sae, acc in zip(saes, accs):
        st = acc.finish(sae.W_dec.detach(), source=source)
        if attach:
            sae.stats = st
        out.append(st)
    return out


def _is_topk(sae: SparseAutoencoder) -> bool:
    from sae_shared.sae.config import TopK

    return isinstance(sae.cfg.variant, TopK)


def _batches_of(data: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        if data.ndim != 2:
            raise ValueError(f"data must be [n, d_model], got shape {tuple(data.shape)}")
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
    else:
        yield from data
