"""The sparse autoencoder: encode, decode, forward (with its losses), and the sparse decoder kernel.

Reads top to bottom: codes and outputs, the sparse decoder (fast autograd Function beside its dense reference),
then ``SparseAutoencoder``. Shapes: ``n`` tokens, ``d`` = d_model, ``s`` = d_sae, ``k`` active latents per token.

Callers pass **raw** activations: the input normalisation (``x_n = (x - μ) / σ``) estimated at training time lives
in the module (buffers ``norm_mean``, ``norm_scale``) and is applied inside ``encode`` / ``decode``. All parameters
are fp32; ``decode`` always runs in fp32 with autocast off, so it is a pure function of the codes (the interventions'
delta form ``x + (decode(f') - decode(f))`` is then exactly ``x`` when ``f' == f``).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_shared.sae.config import BatchTopK, Contract, JumpReLU, Relu, SAEConfig, TopK

STATS_COMMAND = "saevctl sae stats <sae_id> --acts <acts_id>"


class ContractMismatch(ValueError):
    """The SAE was trained on another backbone, layer or token selection than the one it is used with."""


class MissingStatistics(LookupError):
    """The SAE has no per-latent statistics yet; the message names the command that computes them."""


class SparseCodes(NamedTuple):
    """Codes of each token as its k largest latents. Entries with value 0 are padding (fewer than k active)."""

    indices: Tensor
    """``[..., k]`` int64 latent indices, sorted by value, largest first (``encode_sparse``)."""
    values: Tensor
    """``[..., k]`` activations (>= 0) of those latents."""


Codes = Union[Tensor, SparseCodes]
"""Dense ``[..., d_sae]`` codes or ``SparseCodes``."""


class Normalisation(NamedTuple):
    """Input normalisation ``x_n = (x - mean) / scale``, stored with the SAE."""

    mean: Tensor
    """``[d_model]`` subtracted first (zeros: no centring)."""
    scale: float
    """Positive scalar divisor (1.0: no scaling)."""


class ForwardOutput(NamedTuple):
    """What ``SparseAutoencoder.forward`` returns. Loss terms are scalars in normalised units, differentiable."""

    recon: Tensor
    """``[n, d_model]`` reconstruction in raw activation space (normalisation undone)."""
    codes: Codes
    """Latent activations: ``SparseCodes`` for TopK, dense ``[n, d_sae]`` otherwise."""
    loss: Tensor
    """Total objective: (Matryoshka-weighted) MSE + sparsity + aux."""
    mse: Tensor
    """Mean squared error per element of the full-width reconstruction, in normalised space."""
    sparsity: Tensor
    """λ·mean_n ‖f_n‖₁ for ReLU (times the warmup factor); 0 for the other variants."""
    aux: Tensor
    """α·AuxK loss (dead latents reconstructing the residual); 0 when none is dead or the variant has none."""
    l0: Tensor
    """Mean number of active latents per token (detached)."""
    fvu: Tensor
    """Fraction of variance unexplained over this batch, Σ‖x - x̂‖² / Σ‖x - x̄‖² (detached)."""
    fires: Tensor | None = None
    """``[d_sae]`` int64: tokens of the batch on which each latent fired (detached); None when ``metrics=False``
    and the codes are dense (an exact per-latent count is a slow pass over ``[n, d_sae]`` on a CPU)."""
    fired: Tensor | None = None
    """``[d_sae]`` bool: whether each latent fired on any token of the batch (detached; dead-latent tracking)."""


# --------------------------------------------------------------------------------------------------------------
# Sparse decoder: y[n] = Σ_j values[n, j] · W[indices[n, j]]. The fast path touches only the k active rows of W in
# both directions (n·k·d work instead of n·s·d); the reference path densifies and is what the tests compare against.
# --------------------------------------------------------------------------------------------------------------


def latent_counts(indices: Tensor, s: int, weights: Tensor | None = None) -> Tensor:
    """``[s]`` int64: how many times each latent appears in ``indices`` (summing the int ``weights`` instead, when
    given). ``torch.bincount`` without its wait for a GPU: bincount reads the largest index back to the host to size
    its output, a sync per call in every training step; the same speed on the CPU."""
    flat = indices.reshape(-1)
    ones = torch.ones_like(flat) if weights is None else weights.reshape(-1).to(torch.int64)
    return torch.zeros(s, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, ones)


def _latents_by_tokens(lat_m: Tensor, vals_m: Tensor, n: int, s: int, m: int) -> Tensor:
    """The ``n·m`` (token, latent, value) entries of ``[n, m]`` sparse codes as a CSR ``[s, n]`` matrix, rows sorted
    by latent (so ``mm`` with a dense ``[n, d]`` gives ``[s, d]`` in one MKL call, without COO's coalescing)."""
    order = torch.argsort(lat_m, stable=True)  # deterministic order within a row: reproducible sums
    crow = torch.zeros(s + 1, dtype=torch.int64, device=lat_m.device)
    torch.cumsum(latent_counts(lat_m, s), 0, out=crow[1:])
    tok_m = torch.div(order, m, rounding_mode="floor")  # entry e of the flattened [n, m] belongs to token e // m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, tok_m, vals_m[order], (s, n), check_invariants=False)


class _SparseDecode(torch.autograd.Function):
    """Forward: ``embedding_bag`` over the active rows. Backward, with the k·n active (token, latent) pairs as a
    sparse pattern: ``dL/dv[n, j] = <W[idx[n, j]], g[n]>`` is the dense product ``g Wᵀ`` sampled at the pattern
    (``sampled_addmm``), and ``dL/dW = Sᵀ g`` with ``S`` the sparse codes (a sparse-dense ``mm``). Both cost n·k·d
    and never build an ``[n, s]`` or ``[n, k, d]`` temporary (several times faster here than gathering the
    ``[n, k, d]`` rows and reducing them)."""

    @staticmethod
    def forward(ctx, indices_nk: Tensor, values_nk: Tensor, W_sd: Tensor) -> Tensor:  # type: ignore[override]
        # Compute in the weight's dtype (fp32), also under bf16 autocast: the work is only n·k·d.
        values_nk = values_nk.to(W_sd.dtype)
        indices_nk = indices_nk.long()
        ctx.save_for_backward(indices_nk, values_nk, W_sd)
        return F.embedding_bag(indices_nk, W_sd, per_sample_weights=values_nk, mode="sum")

    @staticmethod
    def backward(ctx, grad_nd: Tensor):  # type: ignore[override]
        indices_nk, values_nk, W_sd = ctx.saved_tensors
        grad_nd = grad_nd.to(W_sd.dtype).contiguous()
        n, k = indices_nk.shape
        s = W_sd.shape[0]
        lat_m = indices_nk.reshape(-1)
        grad_values = grad_W = None
        if ctx.needs_input_grad[1]:
            crow = torch.arange(0, n * k + 1, k, device=lat_m.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                pattern_ns = torch.sparse_csr_tensor(
                    crow, lat_m, torch.zeros(n * k, dtype=W_sd.dtype, device=W_sd.device), (n, s), check_invariants=False
                )
            grad_values = torch.sparse.sampled_addmm(pattern_ns, grad_nd, W_sd.t(), beta=0.0).values().view(n, k)
        if ctx.needs_input_grad[2]:
            grad_W = torch.sparse.mm(_latents_by_tokens(lat_m, values_nk.reshape(-1), n, s, k), grad_nd)
        return None, grad_values, grad_W


def sparse_decode(indices_nk: Tensor, values_nk: Tensor, W_sd: Tensor) -> Tensor:
    """``[n, d]`` = Σ_j values[n, j] · W[indices[n, j]], never densifying; sparse backward (fast path)."""
    return _SparseDecode.apply(indices_nk, values_nk, W_sd)


def sparse_decode_reference(indices_nk: Tensor, values_nk: Tensor, W_sd: Tensor) -> Tensor:
    """Plain twin of ``sparse_decode``: scatter into dense ``[n, s]`` codes and multiply (tests compare the two)."""
    dense_ns = torch.zeros(indices_nk.shape[0], W_sd.shape[0], dtype=W_sd.dtype, device=W_sd.device)
    dense_ns = dense_ns.scatter_add(1, indices_nk, values_nk.to(W_sd.dtype))
    return dense_ns @ W_sd


class _SampledPre(torch.autograd.Function):
    """``values[n, j] = pre[n, idx[n, j]]`` of the pre-activations ``pre = (x_n - b_dec) W_enc + b_enc``, taken
    from ``pre`` computed without a graph, with a backward that touches only the sampled entries (TopK's encoder:
    n·m·d work instead of the dense n·s·d matmuls of autograd's ``addmm`` backward). The gradient reaching
    ``W_enc`` is ``(x_n - b_dec)ᵀ S`` with ``S`` the sampled gradients as a sparse ``[n, s]`` matrix (a sparse-dense
    ``mm``), ``b_enc`` gets their per-latent sums and ``b_dec`` ``-W_enc`` times those. Values and gradients are
    fp32 whatever ``pre``'s dtype (bf16 under autocast: the dense matmul is the only bf16 work)."""

    @staticmethod
    def forward(ctx, pre_ns: Tensor, idx_nm: Tensor, x_nd: Tensor, W_enc_ds: Tensor, b_enc_s: Tensor,
                b_dec_d: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx_nm, x_nd, W_enc_ds, b_dec_d)
        return pre_ns.gather(1, idx_nm).to(W_enc_ds.dtype)

    @staticmethod
    def backward(ctx, grad_nm: Tensor):  # type: ignore[override]
        idx_nm, x_nd, W_enc_ds, b_dec_d = ctx.saved_tensors
        d, s = W_enc_ds.shape
        n, m = idx_nm.shape
        grad_nm = grad_nm.to(W_enc_ds.dtype).contiguous()
        lat = idx_nm.reshape(-1)
        g = grad_nm.reshape(-1)
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        need_b = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        if ctx.needs_input_grad[3]:
            sampled_sn = _latents_by_tokens(lat, g, n, s, m)
            grad_W = torch.sparse.mm(sampled_sn, (x_nd - b_dec_d).to(W_enc_ds.dtype)).t().contiguous()
        if need_b:
            per_latent_s = torch.zeros(s, dtype=W_enc_ds.dtype, device=W_enc_ds.device).index_add_(0, lat, g)
            grad_b_enc = per_latent_s if ctx.needs_input_grad[4] else None
            grad_b_dec = -(W_enc_ds @ per_latent_s) if ctx.needs_input_grad[5] else None
        if ctx.needs_input_grad[2]:  # only when the caller differentiates with respect to the input
            grad_x = F.embedding_bag(idx_nm, W_enc_ds.t().contiguous(), per_sample_weights=grad_nm, mode="sum")
        return None, None, grad_x, grad_W, grad_b_enc, grad_b_dec


def sampled_pre(pre_ns: Tensor, idx_nm: Tensor, x_nd: Tensor, W_enc_ds: Tensor, b_enc_s: Tensor,
                b_dec_d: Tensor) -> Tensor:
    """``[n, m]`` pre-activations at ``idx_nm`` (taken from ``pre_ns``), with a sparse backward (fast path)."""
    return _SampledPre.apply(pre_ns, idx_nm, x_nd, W_enc_ds, b_enc_s, b_dec_d)


def sampled_pre_reference(pre_ns: Tensor, idx_nm: Tensor, x_nd: Tensor, W_enc_ds: Tensor, b_enc_s: Tensor,
                          b_dec_d: Tensor) -> Tensor:
    """Plain twin of ``sampled_pre``: the dense pre-activations recomputed with autograd, then gathered."""
    return torch.addmm(b_enc_s, x_nd - b_dec_d, W_enc_ds).gather(1, idx_nm)


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class SparseAutoencoder(nn.Module):
    """``f = act((x_n - b_dec) W_enc + b_enc)``, ``x̂_n = f W_dec + b_dec``, with ``x_n`` the normalised input.

    Parameters (saev / SAELens layout): ``W_enc [d_model, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_model]``,
    ``b_dec [d_model]``. Buffers: ``norm_mean [d_model]``, ``norm_scale []``, and ``threshold [d_sae]`` (θ of the
    JumpReLU) for BatchTopK and JumpReLU.

    Attributes beside the weights: ``cfg`` (``SAEConfig``), ``contract`` (``Contract | None``: which backbone, layer
    and tokens it reads; required to save) and ``stats`` (``LatentStats | None``: per-latent statistics over a
    held-out split; ``require_stats()`` says how to get them).
    """

    def __init__(self, cfg: SAEConfig, *, contract: Contract | None = None):
        super().__init__()
        self.cfg = cfg
        self.contract = contract
        self.stats = None  # LatentStats | None (sae_shared.sae.stats), set by training or load_sae
        d, s = cfg.d_model, cfg.d_sae

        # Tied initialisation: random unit decoder rows, encoder = decoder transposed (Gao et al.'s choice; every
        # latent starts as a matched filter of its own direction).
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec_sd = torch.randn(s, d, generator=gen)
        W_dec_sd /= W_dec_sd.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_enc = nn.Parameter(W_dec_sd.t().contiguous())  # row-major [d, s] (a clone would keep .t()'s strides)
        self.b_enc = nn.Parameter(torch.zeros(s))
        self.W_dec = nn.Parameter(W_dec_sd)
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("norm_mean", torch.zeros(d))
        self.register_buffer("norm_scale", torch.tensor(1.0))
        if isinstance(cfg.variant, (BatchTopK, JumpReLU)):
            self.register_buffer("threshold", torch.zeros(s))
        # Number of batches folded into the BatchTopK threshold's running average (0: the next one sets it).
        self.threshold_updates = 0

    # ---- properties -------------------------------------------------------------------------------------------

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation(self.norm_mean.detach().clone(), float(self.norm_scale))

    @torch.no_grad()
    def set_normalisation(self, mean: Tensor | None, scale: float = 1.0) -> None:
        """Set the stored input normalisation (``mean=None``: no centring)."""
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"normalisation scale must be a finite number > 0, got {scale}")
        if mean is None:
            self.norm_mean.zero_()
        else:
            mean = torch.as_tensor(mean, dtype=torch.float32)
            if mean.shape != (self.d_model,) or not torch.isfinite(mean).all():
                raise ValueError(f"normalisation mean must be finite with shape [{self.d_model}], got {tuple(mean.shape)}")
            self.norm_mean.copy_(mean)
        self.norm_scale.fill_(scale)

    def normalise(self, x: Tensor) -> Tensor:
        return (x.float() - self.norm_mean) / self.norm_scale

    def denormalise(self, x_n: Tensor) -> Tensor:
        return x_n * self.norm_scale + self.norm_mean

    # ---- encode -----------------------------------------------------------------------------------------------

    def _pre(self, x_nd: Tensor) -> Tensor:
        """Pre-activations ``(x_n - b_dec) W_enc + b_enc``, ``[n, d_sae]``, from normalised ``x_n``."""
        return torch.addmm(self.b_enc, x_nd - self.b_dec, self.W_enc)

    def _pre_train(self, x_nd: Tensor) -> Tensor:
        """``_pre`` rewritten as ``x_n W_enc + (b_enc - b_dec W_enc)``, the same function: autograd then gets
        ``b_dec``'s gradient from a matrix-vector product instead of an ``[n, d]`` matmul through ``x_n - b_dec``
        (10·n·d·s training FLOPs instead of 12)."""
        return torch.addmm(self.b_enc - self.b_dec @ self.W_enc, x_nd, self.W_enc)

    def _jump(self, pre_ns: Tensor) -> Tensor:
        """JumpReLU: keep pre-activations above θ (and above 0)."""
        return pre_ns.masked_fill(pre_ns <= self.threshold, 0.0).relu()

    def _activate_dense(self, pre_ns: Tensor, *, inplace: bool = False) -> Tensor:
        """Inference activation of the variant, dense ``[n, d_sae]``; ``inplace`` may overwrite ``pre_ns`` (a
        temporary: saves allocating and first-touching another ``[n, d_sae]`` buffer, ~10% of an encode here)."""
        variant = self.cfg.variant
        if isinstance(variant, Relu):
            return pre_ns.relu_() if inplace else pre_ns.relu()
        if isinstance(variant, TopK):
            vals_nk, idx_nk = pre_ns.topk(variant.k, dim=-1)
            return torch.zeros_like(pre_ns).scatter(-1, idx_nk, vals_nk.relu())
        return self._jump(pre_ns)  # BatchTopK at inference, JumpReLU

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes ``[..., d_sae]`` of raw activations ``x [..., d_model]``."""
        x_nd, lead = self._flatten(x, self.d_model)
        f_ns = self._activate_dense(self._pre(self.normalise(x_nd)), inplace=True)
        return f_ns.reshape(*lead, self.d_sae)

    def encode_sparse(self, x: Tensor, k: int | None = None) -> SparseCodes:
        """Codes as the ``k`` largest latents per token, ``SparseCodes([..., k], [..., k])``, sorted by value.

        ``k=None`` is exact: the variant's k for TopK (the dense matrix is never built), otherwise the largest number
        of active latents of any token in ``x``. A smaller ``k`` keeps only the k largest; a larger one pads with
        zero values.
        """
        if k is not None and not 1 <= k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {k}")
        x_nd, lead = self._flatten(x, self.d_model)
        pre_ns = self._pre(self.normalise(x_nd))
        variant = self.cfg.variant
        if isinstance(variant, TopK):
            k_eff = variant.k if k is None else k
            # Unsorted selection, then sort only the k winners: sorting inside topk costs more over [n, d_sae].
            vals_nk, idx_nk = pre_ns.topk(k_eff, dim=-1, sorted=False)
            vals_nk, order_nk = vals_nk.sort(dim=-1, descending=True)
            idx_nk = idx_nk.gather(-1, order_nk)
            vals_nk = vals_nk.relu()
            if k_eff > variant.k:  # beyond the variant's k nothing is active: pad with zeros
                vals_nk = vals_nk * (torch.arange(k_eff, device=vals_nk.device) < variant.k)
        else:
            f_ns = self._activate_dense(pre_ns, inplace=True)
            if k is None:  # the most active latents of any token (at least 1, so the shapes stay valid)
                k = max(1, int((f_ns > 0).sum(-1).max())) if f_ns.shape[0] else 1
            vals_nk, idx_nk = f_ns.topk(k, dim=-1, sorted=True)
        return SparseCodes(idx_nk.reshape(*lead, -1), vals_nk.reshape(*lead, -1))

    # ---- decode -----------------------------------------------------------------------------------------------

    def decode(self, codes: Codes) -> Tensor:
        """Raw-space reconstruction ``[..., d_model]`` from dense codes ``[..., d_sae]`` or ``SparseCodes``.

        Always fp32 with autocast off, deterministic: a pure function of the codes. Sparse codes are decoded by
        ``embedding_bag`` over the active rows (never densified).
        """
        with torch.autocast(device_type=self.W_dec.device.type, enabled=False):
            if isinstance(codes, SparseCodes):
                idx_nk, lead = self._flatten(codes.indices, codes.indices.shape[-1])
                vals_nk = codes.values.reshape(idx_nk.shape).float()
                self._check_indices(idx_nk)
                out_nd = sparse_decode(idx_nk, vals_nk, self.W_dec)
            else:
                f_ns, lead = self._flatten(codes, self.d_sae)
                out_nd = f_ns.float() @ self.W_dec
            # x̂ = (out + b_dec)·σ + μ = out·σ + (b_dec·σ + μ), in place on the fresh product (no [n, d] temporaries:
            # at k=32 the bias and scale passes cost as much as the sparse product itself).
            shift_d = torch.addcmul(self.norm_mean, self.b_dec, self.norm_scale)
            return out_nd.mul_(self.norm_scale).add_(shift_d).reshape(*lead, self.d_model)

    def decode_change(self, codes_ns: Tensor, edited_ns: Tensor, latents: Sequence[int]) -> Tensor:
        """``decode(edited) - decode(codes)`` ``[n, d_model]`` for dense codes that differ only in the columns
        ``latents``, computed from those columns alone: ``(f' - f)[:, latents] W_dec[latents] · scale`` (the same
        function: ``b_dec`` and the normalisation mean drop out of the difference, and no ``[n, d_sae] x
        [d_sae, d_model]`` product is needed). Rows where the codes are equal give exactly 0. fp32, autocast off."""
        ordered = sorted({int(i) for i in latents})
        if ordered and not 0 <= ordered[0] <= ordered[-1] < self.d_sae:
            raise ValueError(f"latent indices must be in [0, {self.d_sae}), got {ordered}")
        cols = torch.tensor(ordered, dtype=torch.long, device=self.W_dec.device)
        with torch.autocast(device_type=self.W_dec.device.type, enabled=False):
            diff_nc = edited_ns.index_select(-1, cols).float() - codes_ns.index_select(-1, cols).float()
            return (diff_nc @ self.W_dec.index_select(0, cols)).mul_(self.norm_scale)

    def _decode_prefixes_n(self, codes: Codes) -> list[Tensor]:
        """Normalised reconstructions from each Matryoshka prefix (just the full width without Matryoshka)."""
        prefixes = self.cfg.matryoshka.prefixes if self.cfg.matryoshka is not None else (self.d_sae,)
        outs: list[Tensor] = []
        acc: Tensor | None = None
        lo = 0
        for hi in prefixes:
            if isinstance(codes, SparseCodes):
                vals_nk = codes.values if (lo == 0 and hi == self.d_sae) else codes.values * (
                    (codes.indices >= lo) & (codes.indices < hi)
                )
                part_nd = sparse_decode(codes.indices, vals_nk, self.W_dec)
            elif lo == 0 and hi == self.d_sae:  # no slice: its backward would copy the whole [n, s] gradient
                part_nd = codes @ self.W_dec
            else:
                part_nd = codes[:, lo:hi] @ self.W_dec[lo:hi]
            acc = part_nd if acc is None else acc + part_nd
            outs.append(acc + self.b_dec)
            lo = hi
        return outs

    # ---- forward (training objective) -------------------------------------------------------------------------

    def forward(
        self, x: Tensor, *, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0, metrics: bool = True
    ) -> ForwardOutput:
        """Codes, reconstruction and loss terms of raw activations ``x [n, d_model]``.

        In training mode a BatchTopK SAE selects over the whole batch and updates its threshold θ (like BatchNorm's
        running statistics); in eval mode it is the JumpReLU. ``dead_mask [d_sae]`` marks dead latents for AuxK;
        ``sparsity_scale`` multiplies λ (the trainer's L1 warmup). With ``metrics=False`` the detached batch metrics
        that cost a pass over dense codes (``l0``, ``fvu``, ``fires``) are left out (NaN / None); ``fired`` is
        always there. The trainer asks for them on the steps it logs.
        """
        x_nd, _ = self._flatten(x, self.d_model)
        x_n = self.normalise(x_nd)
        variant = self.cfg.variant
        zero = x_n.new_zeros(())
        n = x_n.shape[0]

        codes: Codes
        if isinstance(variant, TopK):
            # Select on pre-activations computed without a graph; only the selected entries carry gradient.
            with torch.no_grad():
                pre_ns = self._pre(x_n)
                idx_nk = pre_ns.topk(variant.k, dim=-1, sorted=False).indices
            vals_nk = sampled_pre(pre_ns, idx_nk, x_n, self.W_enc, self.b_enc, self.b_dec)
            codes = SparseCodes(idx_nk, vals_nk.relu())
        else:
            pre_ns = self._pre_train(x_n)
            if isinstance(variant, BatchTopK) and self.training:
                codes = self._batch_topk(pre_ns, variant.k)
            else:  # ReLU in place: addmm's backward does not need its output, and ReLU's reads only its result
                codes = self._activate_dense(pre_ns, inplace=isinstance(variant, Relu))

        recons = self._decode_prefixes_n(codes)
        weights = self.cfg.matryoshka.resolved_weights() if self.cfg.matryoshka is not None else (1.0,)
        mses = [(r.float() - x_n).pow(2).mean() for r in recons]
        mse = mses[-1]
        recon_loss = sum(w * m for w, m in zip(weights, mses))

        sparsity = zero
        if isinstance(variant, Relu) and variant.l1_coeff > 0:
            # ReLU codes are >= 0: ‖f‖₁ is their sum (no abs pass; the gradient is the same where ReLU passes any)
            sparsity = (variant.l1_coeff * sparsity_scale / n) * codes.sum()

        aux = zero
        if isinstance(variant, (TopK, BatchTopK)) and dead_mask is not None and variant.aux_coeff > 0:
            aux = variant.aux_coeff * self._auxk(pre_ns, x_n, x_n - recons[-1].float().detach(), dead_mask,
                                                 variant.k_aux)

        with torch.no_grad():
            nan = torch.full((), float("nan"), device=x_n.device)
            fires, l0, fvu = None, nan, nan
            if isinstance(codes, SparseCodes):
                firing_nk = codes.values > 0
                fires = latent_counts(codes.indices, self.d_sae, firing_nk)
                fired = fires > 0
                if metrics:
                    l0 = firing_nk.sum(-1).float().mean()
            else:
                # Codes are >= 0, so a latent fired iff its column sum is > 0: a fast float reduction, where the
                # exact count ((codes > 0).sum(0), an integer column reduction) costs ~a tenth of a step here.
                fired = codes.detach().sum(0) > 0
                if metrics:
                    fires = (codes > 0).sum(0)
                    l0 = fires.sum().float() / max(n, 1)
            if metrics:
                err = (recons[-1].float() - x_n).pow(2).sum()
                var = (x_n - x_n.mean(0)).pow(2).sum()
                fvu = err / var.clamp_min(torch.finfo(torch.float32).tiny)

        return ForwardOutput(
            recon=self.denormalise(recons[-1].float()),
            codes=codes,
            loss=recon_loss + sparsity + aux,
            mse=mse,
            sparsity=sparsity,
            aux=aux,
            l0=l0,
            fvu=fvu,
            fires=fires,
            fired=fired,
        )

    def _batch_topk(self, pre_ns: Tensor, k: int) -> Tensor:
        """Keep the ``k·n`` largest ReLU'd pre-activations of the batch; fold the smallest kept one into θ."""
        n, s = pre_ns.shape
        act_ns = pre_ns.relu()
        vals_m, flat_idx_m = act_ns.flatten().topk(min(k * n, n * s), sorted=False)
        codes_ns = torch.zeros_like(act_ns).flatten().scatter(0, flat_idx_m, vals_m).view(n, s)
        with torch.no_grad():
            positive_m = vals_m[vals_m > 0]
            if positive_m.numel():
                self._update_threshold(float(positive_m.min()))
        return codes_ns

    @torch.no_grad()
    def _update_threshold(self, batch_min: float) -> None:
        decay = self.cfg.variant.threshold_decay
        if self.threshold_updates == 0:
            self.threshold.fill_(batch_min)
        else:
            self.threshold.mul_(decay).add_((1.0 - decay) * batch_min)
        self.threshold_updates += 1

    def _auxk(self, pre_ns: Tensor, x_n: Tensor, residual_nd: Tensor, dead_mask: Tensor, k_aux: int) -> Tensor:
        """AuxK: the top-``k_aux`` dead latents (ReLU'd) reconstruct the main residual; MSE per element."""
        n_dead = int(dead_mask.sum())
        k = min(k_aux, n_dead)
        if k == 0:
            return pre_ns.new_zeros(())
        if pre_ns.requires_grad:
            masked_ns = pre_ns.masked_fill(~dead_mask.to(torch.bool), float("-inf"))
            vals_nk, idx_nk = masked_ns.topk(k, dim=-1, sorted=False)
        else:  # TopK: pre-activations without a graph; the selected ones get theirs (sparse backward)
            with torch.no_grad():
                idx_nk = pre_ns.masked_fill(~dead_mask.to(torch.bool), float("-inf")).topk(k, dim=-1).indices
            vals_nk = sampled_pre(pre_ns, idx_nk, x_n, self.W_enc, self.b_enc, self.b_dec)
        e_hat_nd = sparse_decode(idx_nk, vals_nk.relu(), self.W_dec)
        return (e_hat_nd - residual_nd).pow(2).mean()

    # ---- decoder constraints (called by the trainer around each optimiser step) --------------------------------

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from each decoder row's gradient its component along the row: g_i -= (g_i · ŵ_i) ŵ_i."""
        if self.W_dec.grad is None:
            return
        # g_i -= (g_i · w_i / ‖w_i‖²) w_i, in three passes over [s, d] and no [s, d] temporary.
        W_sd, grad_sd = self.W_dec, self.W_dec.grad
        coef_s1 = torch.linalg.vecdot(grad_sd, W_sd).div_(W_sd.pow(2).sum(dim=1).clamp_min(1e-24)).unsqueeze(1)
        grad_sd.addcmul_(coef_s1, W_sd, value=-1.0)

    # ---- contract and statistics ------------------------------------------------------------------------------

    def check_contract(self, backbone_id: str, layer: int, tokens: str) -> None:
        """Raise ``ContractMismatch`` unless this SAE was trained on exactly this backbone, layer and tokens."""
        if self.contract is None:
            raise ContractMismatch(
                "this SAE records no backbone/layer/tokens contract (imported without one?); set "
                "sae.contract = Contract(backbone_id, layer, tokens) or re-import it with those arguments"
            )
        wanted = Contract(backbone_id=backbone_id, layer=layer, tokens=tokens)
        diffs = [
            f"{name}: SAE has {getattr(self.contract, name)!r}, used with {getattr(wanted, name)!r}"
            for name in ("backbone_id", "layer", "tokens")
            if getattr(self.contract, name) != getattr(wanted, name)
        ]
        if diffs:
            raise ContractMismatch("SAE contract mismatch: " + "; ".join(diffs))

    def require_stats(self):
        """The per-latent statistics, or ``MissingStatistics`` naming the command that computes them."""
        if self.stats is None:
            raise MissingStatistics(
                "this SAE has no per-latent statistics (firing frequency, max, p99, ...); compute them over a "
                f"shard set of its backbone and layer with `{STATS_COMMAND}`"
            )
        return self.stats

    # ---- helpers ----------------------------------------------------------------------------------------------

    @staticmethod
    def _flatten(t: Tensor, last: int) -> tuple[Tensor, tuple[int, ...]]:
        if t.ndim == 0 or t.shape[-1] != last:
            raise ValueError(f"expected a tensor [..., {last}], got shape {tuple(t.shape)}")
        return t.reshape(-1, last), tuple(t.shape[:-1])

    def _check_indices(self, idx_nk: Tensor) -> None:
        if idx_nk.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"sparse code indices must be int64, got {idx_nk.dtype}")
        if idx_nk.numel():
            lo, hi = idx_nk.aminmax()  # one pass
            if int(lo) < 0 or int(hi) >= self.d_sae:
                raise ValueError(f"sparse code indices must be in [0, {self.d_sae})")

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_sae={self.d_sae}, variant={self.cfg.variant}"
