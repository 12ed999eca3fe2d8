"""SAE configuration: frozen dataclasses, one per variant (a tagged union), plus the training and sweep configs.

Every field has a docstring; cross-field checks run once, at construction, and raise ``ValueError`` saying what to
change. Defaults are the reference code's (DESIGN.md §5). ``to_dict`` / ``from_dict`` give the JSON form stored in
``cfg.json``; the ``kind`` tag of each variant is its JSON discriminator.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

# --------------------------------------------------------------------------------------------------------------
# Variants (tagged union): each owns its sparsity mechanism and its extra loss terms.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relu:
    """ReLU + L1, the paper's SAE: ``f = ReLU((x - b_dec) W_enc + b_enc)``, loss ``MSE + λ‖f‖₁``."""

    kind: ClassVar[str] = "relu"

    l1_coeff: float = 4e-4
    """λ, the weight of the L1 penalty ``mean_n Σ_i f_ni`` (reference code: 4e-4)."""
    l1_warmup_steps: int = 0
    """λ ramps linearly from 0 over this many steps (0: full λ from the first step, as the reference code)."""

    def __post_init__(self) -> None:
        _check(self.l1_coeff >= 0 and math.isfinite(self.l1_coeff), "Relu.l1_coeff must be a finite number >= 0")
        _check(self.l1_warmup_steps >= 0, "Relu.l1_warmup_steps must be >= 0")


@dataclass(frozen=True)
class TopK:
    """TopK (Gao et al.): keep the k largest pre-activations per token (ReLU'd); AuxK loss revives dead latents.

    The decoder runs sparse in both directions: only the k active rows of ``W_dec`` are read in the forward pass and
    receive gradient in the backward pass.
    """

    kind: ClassVar[str] = "topk"

    k: int = 32
    """Active latents per token."""
    k_aux: int = 512
    """Dead latents used by the AuxK loss to reconstruct the residual (capped at the number of dead latents)."""
    aux_coeff: float = 1 / 32
    """α, the weight of the AuxK loss (0 disables it)."""

    def __post_init__(self) -> None:
        _check(self.k >= 1, "TopK.k must be >= 1")
        _check(self.k_aux >= 0, "TopK.k_aux must be >= 0 (0 disables AuxK)")
        _check(self.aux_coeff >= 0 and math.isfinite(self.aux_coeff), "TopK.aux_coeff must be finite and >= 0")


@dataclass(frozen=True)
class BatchTopK:
    """BatchTopK (Bussmann et al.): keep the ``k * n`` largest pre-activations over a whole batch of ``n`` tokens.

    At inference (``encode``, eval mode) it is a JumpReLU, ``f = pre * (pre > θ)``, with θ estimated during training
    as a running average of the smallest activation the batch kept.
    """

    kind: ClassVar[str] = "batchtopk"

    k: int = 32
    """Average active latents per token over a training batch."""
    k_aux: int = 512
    """Dead latents used by the AuxK loss (as TopK)."""
    aux_coeff: float = 1 / 32
    """α, the weight of the AuxK loss (0 disables it)."""
    threshold_decay: float = 0.99
    """Decay of the exponential moving average that estimates θ (the first batch sets θ directly)."""

    def __post_init__(self) -> None:
        _check(self.k >= 1, "BatchTopK.k must be >= 1")
        _check(self.k_aux >= 0, "BatchTopK.k_aux must be >= 0 (0 disables AuxK)")
        _check(self.aux_coeff >= 0 and math.isfinite(self.aux_coeff), "BatchTopK.aux_coeff must be finite and >= 0")
        _check(0.0 <= self.threshold_decay < 1.0, "BatchTopK.threshold_decay must be in [0, 1)")


@dataclass(frozen=True)
class JumpReLU:
    """JumpReLU with per-latent thresholds θ: ``f = pre * (pre > θ)``. Inference only (imported SAEs, e.g.
    SAELens ``jumprelu``); train a ``BatchTopK`` to get one of these."""

    kind: ClassVar[str] = "jumprelu"


Variant = Union[Relu, TopK, BatchTopK, JumpReLU]
VARIANTS: dict[str, type] = {cls.kind: cls for cls in (Relu, TopK, BatchTopK, JumpReLU)}


@dataclass(frozen=True)
class Matryoshka:
    """Matryoshka objective: the reconstruction loss is a weighted sum over nested prefixes of the dictionary, so the
    first latents learn the coarse concepts. Works with every variant (codes are computed once over the full
    width; each prefix decodes only its own latents)."""

    prefixes: tuple[int, ...]
    """Strictly increasing prefix widths; the last must equal ``d_sae``, e.g. ``(128, 512, 2048, 16384)``."""
    weights: tuple[float, ...] | None = None
    """Weight of each prefix's MSE (default: equal weights summing to 1)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefixes", tuple(int(p) for p in self.prefixes))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        _check(len(self.prefixes) >= 1, "Matryoshka.prefixes must name at least one width")
        _check(
            all(a < b for a, b in zip(self.prefixes, self.prefixes[1:])) and self.prefixes[0] >= 1,
            f"Matryoshka.prefixes must be strictly increasing positive widths, got {self.prefixes}",
        )
        if self.weights is not None:
            _check(
                len(self.weights) == len(self.prefixes),
                f"Matryoshka.weights needs one weight per prefix ({len(self.prefixes)}), got {len(self.weights)}",
            )
            _check(all(w >= 0 and math.isfinite(w) for w in self.weights), "Matryoshka.weights must be finite >= 0")

    def resolved_weights(self) -> tuple[float, ...]:
        return self.weights if self.weights is not None else tuple(1.0 / len(self.prefixes) for _ in self.prefixes)


# --------------------------------------------------------------------------------------------------------------
# The SAE and its contract
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """What the SAE reads: which backbone, which layer (0-based block index), which tokens. Every later stage checks
    it against the backbone it is used with (``SparseAutoencoder.check_contract``)."""

    backbone_id: str
    """Family + checkpoint (+ weights sha256), e.g. ``dinov2:vit_base_patch14_reg4_dinov2.lvd142m``."""
    layer: int
    """Residual stream after ``blocks[layer]`` (0-based)."""
    tokens: str
    """Token selection the SAE was trained on, e.g. ``patches``, ``cls``, ``all``."""

    def __post_init__(self) -> None:
        _check(isinstance(self.backbone_id, str) and self.backbone_id != "", "Contract.backbone_id must be non-empty")
        _check(isinstance(self.layer, int) and self.layer >= 0, "Contract.layer must be an int >= 0 (block index)")
        _check(isinstance(self.tokens, str) and self.tokens != "", "Contract.tokens must be a non-empty string")


@dataclass(frozen=True)
class SAEConfig:
    """Architecture and objective of one SAE."""

    d_model: int
    """Width of the activations it reads (the backbone's residual stream)."""
    d_sae: int
    """Number of latents (the reference code uses 16-32 × d_model)."""
    variant: Variant = field(default_factory=Relu)
    """Sparsity mechanism: ``Relu() | TopK() | BatchTopK() | JumpReLU()``."""
    matryoshka: Matryoshka | None = None
    """Optional nested-prefix objective over the variant's codes."""
    normalize_decoder: bool = True
    """Rescale decoder rows to unit norm after every optimiser step."""
    remove_parallel_grad: bool = True
    """Before each step, remove the part of each decoder row's gradient parallel to the row (keeps steps on the
    unit sphere's tangent)."""
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = "mean"
    """How ``b_dec`` starts: mean of the (normalised) data, its geometric median, or zeros."""
    input_norm: Literal["mean_scale", "scale", "none"] = "mean_scale"
    """Input normalisation estimated from data and stored with the SAE: ``mean_scale`` subtracts the mean and
    divides by a scalar so that E‖x - μ‖² = d_model; ``scale`` only divides (E‖x‖² = d_model); ``none`` is the
    identity."""
    seed: int = 0
    """Seed of the weight initialisation."""

    def __post_init__(self) -> None:
        _check(isinstance(self.d_model, int) and self.d_model >= 1, "SAEConfig.d_model must be an int >= 1")
        _check(isinstance(self.d_sae, int) and self.d_sae >= 1, "SAEConfig.d_sae must be an int >= 1")
        _check(
            isinstance(self.variant, tuple(VARIANTS.values())),
            f"SAEConfig.variant must be one of {sorted(VARIANTS)} (Relu(), TopK(), ...), got {self.variant!r}",
        )
        if isinstance(self.variant, (TopK, BatchTopK)):
            _check(
                self.variant.k <= self.d_sae,
                f"{type(self.variant).__name__}.k={self.variant.k} exceeds d_sae={self.d_sae}; lower k",
            )
        if self.matryoshka is not None:
            _check(
                self.matryoshka.prefixes[-1] == self.d_sae,
                f"Matryoshka.prefixes must end at d_sae={self.d_sae} (the full dictionary), got "
                f"{self.matryoshka.prefixes}; append {self.d_sae}",
            )
        _check(
            self.b_dec_init in ("mean", "geometric_median", "zeros"), "SAEConfig.b_dec_init: mean|geometric_median|zeros"
        )
        _check(self.input_norm in ("mean_scale", "scale", "none"), "SAEConfig.input_norm: mean_scale|scale|none")


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepMember:
    """One SAE of a sweep: its architecture and its learning rate (everything else is shared by the sweep)."""

    sae: SAEConfig
    """Architecture and objective."""
    lr: float = 4e-4
    """Peak Adam learning rate (reference code: 4e-4)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), "SweepMember.lr must be a finite number > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Training of a sweep of SAEs on the same batches in one pass over the data (the data is read once).

    ``members`` may be given as one ``SAEConfig`` / ``SweepMember`` or a sequence of them; it is stored as a tuple
    of ``SweepMember``.
    """

    members: tuple[SweepMember, ...]
    """The SAEs trained together; all share ``d_model``."""
    batch_size: int = 16384
    """Tokens per optimiser step (reference code: 16384)."""
    n_tokens: int | None = None
    """Training tokens in all; ``None``: one pass over the training split. Steps = n_tokens // batch_size."""
    warmup_steps: int = 500
    """Linear learning-rate warmup from 0 (reference code: 500)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to 0 at the last step."""
    max_grad_norm: float | None = None
    """Clip each SAE's gradient to this global norm (``None``: no clipping, as the reference code)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam β₁, β₂."""
    adam_eps: float = 1e-8
    """Adam ε."""
    autocast: Literal["fp32", "bf16"] = "fp32"
    """Forward/backward precision: fp32, or bf16 autocast (weights and optimiser stay fp32)."""
    device: str = "cpu"
    """Torch device of the SAEs and batches."""
    seed: int = 0
    """Seed of the held-out split and the batch order."""
    heldout_fraction: float = 0.1
    """Fraction of tokens held out (never trained on) for evaluation and per-latent statistics."""
    norm_sample_tokens: int = 1_000_000
    """Training tokens used to estimate the input normalisation and the ``b_dec`` initialisation."""
    dead_window_tokens: int = 10_000_000
    """A latent that has not fired in this many training tokens is dead (AuxK trains dead latents; logged)."""
    log_every: int = 100
    """Steps between logged training metrics (the last step is always logged)."""
    eval_batch_size: int = 8192
    """Tokens per batch of the final evaluation."""
    contract: Contract | None = None
    """Backbone / layer / token contract recorded on every trained SAE (required to save them)."""

    def __post_init__(self) -> None:
        members = self.members
        if isinstance(members, (SAEConfig, SweepMember)):
            members = (members,)
        members = tuple(SweepMember(m) if isinstance(m, SAEConfig) else m for m in members)
        _check(len(members) >= 1, "TrainConfig.members needs at least one SAEConfig or SweepMember")
        _check(all(isinstance(m, SweepMember) for m in members), "TrainConfig.members: SAEConfig or SweepMember items")
        object.__setattr__(self, "members", members)
        d_models = {m.sae.d_model for m in members}
        _check(len(d_models) == 1, f"all sweep members must share d_model, got {sorted(d_models)}")
        for m in members:
            _check(
                not isinstance(m.sae.variant, JumpReLU),
                "JumpReLU is inference-only; train BatchTopK(k=...) to obtain a JumpReLU SAE",
            )
        _check(self.batch_size >= 1, "TrainConfig.batch_size must be >= 1")
        _check(self.n_tokens is None or self.n_tokens >= self.batch_size, "TrainConfig.n_tokens must be >= batch_size")
        _check(self.warmup_steps >= 0, "TrainConfig.warmup_steps must be >= 0")
        _check(self.schedule in ("constant", "cosine"), "TrainConfig.schedule: constant|cosine")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "TrainConfig.max_grad_norm must be > 0 or None")
        _check(self.autocast in ("fp32", "bf16"), "TrainConfig.autocast: fp32|bf16")
        _check(0.0 < self.heldout_fraction < 1.0, "TrainConfig.heldout_fraction must be in (0, 1)")
        _check(self.norm_sample_tokens >= 1, "TrainConfig.norm_sample_tokens must be >= 1")
        _check(self.dead_window_tokens >= 1, "TrainConfig.dead_window_tokens must be >= 1")
        _check(self.log_every >= 1, "TrainConfig.log_every must be >= 1")
        _check(self.eval_batch_size >= 1, "TrainConfig.eval_batch_size must be >= 1")

    @property
    def d_model(self) -> int:
        return self.members[0].sae.d_model


# --------------------------------------------------------------------------------------------------------------
# JSON form
# --------------------------------------------------------------------------------------------------------------


def variant_to_dict(variant: Variant) -> dict[str, Any]:
    return {"kind": variant.kind, **dataclasses.asdict(variant)}


def variant_from_dict(obj: dict[str, Any]) -> Variant:
    if not isinstance(obj, dict) or "kind" not in obj:
        raise ValueError(f"variant must be an object with a 'kind', got {obj!r}")
    kind = obj["kind"]
    if kind not in VARIANTS:
        raise ValueError(f"unknown SAE variant {kind!r}; known: {sorted(VARIANTS)}")
    cls = VARIANTS[kind]
    params = {k: v for k, v in obj.items() if k != "kind"}
    _check_keys(params, cls, f"variant {kind!r}")
    return cls(**params)


def sae_config_to_dict(cfg: SAEConfig) -> dict[str, Any]:
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    out["variant"] = variant_to_dict(cfg.variant)
    if cfg.matryoshka is not None:
        out["matryoshka"] = {
            "prefixes": list(cfg.matryoshka.prefixes),
            "weights": None if cfg.matryoshka.weights is None else list(cfg.matryoshka.weights),
        }
    return out


def sae_config_from_dict(obj: dict[str, Any]) -> SAEConfig:
    if not isinstance(obj, dict):
        raise ValueError(f"SAE config must be an object, got {type(obj).__name__}")
    params = dict(obj)
    _check_keys(params, SAEConfig, "SAE config")
    if "variant" in params:
        params["variant"] = variant_from_dict(params["variant"])
    if params.get("matryoshka") is not None:
        m = params["matryoshka"]
        _check_keys(m, Matryoshka, "matryoshka")
        params["matryoshka"] = Matryoshka(
            prefixes=tuple(m["prefixes"]), weights=None if m.get("weights") is None else tuple(m["weights"])
        )
    return SAEConfig(**params)


def contract_to_dict(contract: Contract) -> dict[str, Any]:
    return dataclasses.asdict(contract)


def contract_from_dict(obj: dict[str, Any]) -> Contract:
    if not isinstance(obj, dict):
        raise ValueError("contract must be an object {backbone_id, layer, tokens}")
    _check_keys(obj, Contract, "contract")
    missing = [name for name in ("backbone_id", "layer", "tokens") if name not in obj]
    if missing:
        raise ValueError(f"contract is missing {missing}")
    return Contract(**obj)


def _check_keys(obj: dict[str, Any], cls: type, what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; known: {sorted(known)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def train_config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON form of a ``TrainConfig`` (members as ``{"sae": ..., "lr": ...}``, the contract as an object)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "members":
            value = [{"sae": sae_config_to_dict(m.sae), "lr": m.lr} for m in value]
        elif f.name == "contract":
            value = None if value is None else contract_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
