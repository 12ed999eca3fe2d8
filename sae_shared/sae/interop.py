"""Importers from the peers' formats and an exporter to SAELens.

- **saev** (OSU-NLP-Group/saev, the paper's code): one JSON header line, then a ``torch.save``'d state dict with
  ``W_enc [d_vit, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_vit]``, ``b_dec``. The state dict is read with
  ``torch.load(weights_only=True)`` (plain tensors only: any other pickled object is refused, never run). Such a
  checkpoint carries no backbone contract and no normalisation: pass them (identity normalisation by default).
- **SAELens**: a folder with ``cfg.json`` (``d_in``, ``d_sae``, ``architecture`` standard | topk | jumprelu, ...) and
  ``sae_weights.safetensors`` (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` [, ``threshold``]).
  ``export_saelens`` writes that layout with the normalisation folded into the weights, so SAELens computes the
  same codes from raw activations.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sae_shared.sae.config import (
    BatchTopK,
    Contract,
    JumpReLU,
    Relu,
    SAEConfig,
    TopK,
    Variant,
    contract_from_dict,
    contract_to_dict,
    variant_to_dict,
)
from sae_shared.sae.io import InvalidSAEFile, check_tensors
from sae_shared.sae.modeling import Normalisation, SparseAutoencoder

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
MAX_SAEV_HEADER = 1 << 20
"""Longest JSON header line accepted in a saev checkpoint (bytes)."""

NormalisationArg = Normalisation | tuple[Any, float] | None


# --------------------------------------------------------------------------------------------------------------
# saev
# --------------------------------------------------------------------------------------------------------------


def import_saev(
    path: str | os.PathLike,
    *,
    backbone_id: str | None = None,
    layer: int | None = None,
    tokens: str | None = None,
    normalisation: NormalisationArg = None,
    variant: Variant | None = None,
) -> SparseAutoencoder:
    """Read a saev checkpoint into a ``SparseAutoencoder`` (eval mode, CPU).

    ``backbone_id`` / ``layer`` / ``tokens`` form the contract (all three or none; without them the SAE cannot be
    saved until ``sae.contract`` is set). ``normalisation`` is ``(mean [d] | None, scale)`` applied to raw
    activations before the SAE, as saev's data loader did when it trained (identity when ``None``). ``variant``
    overrides the activation read from the header (ReLU unless the header names TopK).
    """
    where = str(path)
    data = Path(path).read_bytes()
    newline = data.find(b"\n", 0, MAX_SAEV_HEADER + 1)
    if newline < 0:
        raise InvalidSAEFile(f"{where}: no JSON header line (saev checkpoints start with one, then the state dict)")
    try:
        header = json.loads(data[:newline])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidSAEFile(f"{where}: header line is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidSAEFile(f"{where}: header line must be a JSON object")
    try:
        # weights_only: tensors and plain containers only; anything that would run code on unpickling is refused.
        state = torch.load(io.BytesIO(data[newline + 1 :]), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError... all mean "refused"
        raise InvalidSAEFile(f"{where}: refused the state dict (only plain tensors load): {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise InvalidSAEFile(f"{where}: the state dict must map names to tensors")

    W_enc = state.get("W_enc")
    if W_enc is None or W_enc.ndim != 2:
        raise InvalidSAEFile(f"{where}: no 2-D W_enc [d_vit, d_sae] in the state dict (keys: {sorted(state)})")
    d_model, d_sae = W_enc.shape
    if variant is None:
        variant = _saev_variant(header, where)
    weights = {k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k in state}
    shapes = {"W_enc": (d_model, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_model), "b_dec": (d_model,)}
    if isinstance(variant, (BatchTopK, JumpReLU)):
        if "threshold" not in state:
            raise InvalidSAEFile(
                f"{where}: a {type(variant).__name__} SAE needs an inference threshold and this checkpoint has none; "
                "pass variant=TopK(k=...) to import it as a per-token TopK"
            )
        threshold = state["threshold"]
        weights["threshold"] = threshold.reshape(-1).expand(d_sae) if threshold.numel() == 1 else threshold
        shapes["threshold"] = (d_sae,)
    unexpected = sorted(set(state) - set(shapes))
    if unexpected:
        raise InvalidSAEFile(f"{where}: unexpected tensors {unexpected} for a {variant.kind} SAE")
    return _from_weights(
        weights, shapes, variant, where, contract=_contract(backbone_id, layer, tokens), normalisation=normalisation
    )


def _saev_variant(header: dict[str, Any], where: str) -> Variant:
    """The activation a saev header names, across its header layouts (pre-schema, schema 1-5)."""
    cfg = header.get("cfg") if isinstance(header.get("cfg"), dict) else header
    name: str | None = None
    params: dict[str, Any] = {}
    if header.get("cls") in ("Relu", "TopK", "BatchTopK"):
        name, params = header["cls"], cfg
    act = cfg.get("activation")
    if isinstance(act, dict):
        name = act.get("cls") or act.get("key") or act.get("kind") or name
        params = act.get("params", act) if isinstance(act.get("params", act), dict) else {}
    elif isinstance(act, str):
        name = act
    key = (name or "relu").lower().replace("_", "").replace("-", "")
    k = params.get("top_k", params.get("k", cfg.get("top_k", 32)))
    if key in ("relu", "sparseautoencoderconfig"):
        return Relu()
    if key == "topk":
        return TopK(k=int(k))
    if key == "batchtopk":
        return BatchTopK(k=int(k))
    raise InvalidSAEFile(f"{where}: unsupported saev activation {name!r}; pass variant=Relu() | TopK(k=...) to override")


# --------------------------------------------------------------------------------------------------------------
# SAELens
# --------------------------------------------------------------------------------------------------------------


def import_saelens(
    folder: str | os.PathLike,
    *,
    backbone_id: str | None = None,
    layer: int | None = None,
    tokens: str | None = None,
) -> SparseAutoencoder:
    """Read a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) into a ``SparseAutoencoder``.

    Architectures standard (ReLU), topk and jumprelu, with ``normalize_activations`` none. When the folder was
    written by ``export_saelens`` its contract is read back unless given here.
    """
    folder = Path(folder)
    where = str(folder)
    try:
        cfg = json.loads((folder / SAELENS_CFG).read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidSAEFile(f"{where}/{SAELENS_CFG}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise InvalidSAEFile(f"{where}/{SAELENS_CFG}: must hold a JSON object")
    try:
        weights = st_load((folder / SAELENS_WEIGHTS).read_bytes())
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InvalidSAEFile(f"{where}/{SAELENS_WEIGHTS}: not a valid safetensors file: {exc}") from None

    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if not (isinstance(d_in, int) and isinstance(d_sae, int) and d_in > 0 and d_sae > 0):
        raise InvalidSAEFile(f"{where}/{SAELENS_CFG}: d_in and d_sae must be positive ints, got {d_in!r}, {d_sae!r}")
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none"):
        raise InvalidSAEFile(
            f"{where}/{SAELENS_CFG}: normalize_activations={norm!r} is not supported (only 'none'); fold the "
            "normalisation into the weights in SAELens before exporting"
        )
    arch = cfg.get("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    variant: Variant
    if arch == "standard":
        l1 = cfg.get("l1_coefficient")
        variant = Relu(l1_coeff=float(l1)) if isinstance(l1, (int, float)) and l1 >= 0 else Relu()
    elif arch == "topk":
        k = cfg.get("k", kwargs.get("k"))
        if not isinstance(k, int) or k < 1:
            raise InvalidSAEFile(f"{where}/{SAELENS_CFG}: a topk SAE needs an int k (cfg 'k' or activation_fn_kwargs)")
        variant = TopK(k=k)
    elif arch == "jumprelu":
        variant = JumpReLU()
        if "threshold" not in weights and "log_threshold" in weights:
            weights["threshold"] = weights.pop("log_threshold").exp()
    else:
        raise InvalidSAEFile(f"{where}/{SAELENS_CFG}: unsupported architecture {arch!r} (standard, topk, jumprelu)")

    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if isinstance(variant, JumpReLU):
        shapes["threshold"] = (d_sae,)
    check_tensors(weights, shapes, f"{where}/{SAELENS_WEIGHTS}")
    weights = {k: v.double() for k, v in weights.items()}
    if cfg.get("apply_b_dec_to_input", True) is False:
        # SAELens encodes x W_enc + b_enc; ours subtracts b_dec first: move b_dec W_enc into b_enc.
        weights["b_enc"] = weights["b_enc"] + weights["b_dec"] @ weights["W_enc"]

    contract = _contract(backbone_id, layer, tokens)
    ours = (cfg.get("metadata") or {}).get("saev_platform") if isinstance(cfg.get("metadata"), dict) else None
    if contract is None and isinstance(ours, dict) and ours.get("contract") is not None:
        try:
            contract = contract_from_dict(ours["contract"])
        except (TypeError, ValueError) as exc:
            raise InvalidSAEFile(f"{where}/{SAELENS_CFG}: metadata.saev_platform.contract: {exc}") from None
    return _from_weights(weights, shapes, variant, where, contract=contract, normalisation=None)


def export_saelens(sae: SparseAutoencoder, folder: str | os.PathLike) -> None:
    """Write ``sae`` as a SAELens folder. The input normalisation is folded into the weights
    (``W_enc / σ``, ``σ·W_dec``, ``σ·b_dec + μ``), so the codes of raw activations are unchanged; decoder rows are
    then σ-norm rather than unit-norm. BatchTopK exports as jumprelu with its threshold."""
    variant = sae.cfg.variant
    mean_d = sae.norm_mean.detach().double().cpu()
    scale = float(sae.norm_scale)
    W_enc = sae.W_enc.detach().double().cpu()
    W_dec = sae.W_dec.detach().double().cpu()
    b_dec = sae.b_dec.detach().double().cpu()
    tensors = {
        "W_enc": W_enc / scale,
        "b_enc": sae.b_enc.detach().double().cpu(),
        "W_dec": W_dec * scale,
        "b_dec": b_dec * scale + mean_d,
    }
    if isinstance(variant, Relu):
        arch, act_fn, act_kwargs = "standard", "relu", {}
    elif isinstance(variant, TopK):
        arch, act_fn, act_kwargs = "topk", "topk", {"k": variant.k}
    else:  # BatchTopK at inference, JumpReLU
        arch, act_fn, act_kwargs = "jumprelu", "relu", {}
        tensors["threshold"] = sae.threshold.detach().double().cpu()
    contract = sae.contract
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_model,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "activation_fn_str": act_fn,
        "activation_fn_kwargs": act_kwargs,
        "model_name": contract.backbone_id if contract else "",
        "hook_name": f"blocks.{contract.layer}.hook_resid_post" if contract else "",
        "hook_layer": contract.layer if contract else 0,
        "hook_head_index": None,
        "context_size": None,
        "prepend_bos": False,
        "dataset_path": "",
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "metadata": {
            "saev_platform": {
                "variant": variant_to_dict(variant),
                "contract": contract_to_dict(contract) if contract else None,
            }
        },
    }
    if isinstance(variant, TopK):
        cfg["k"] = variant.k
    if isinstance(variant, Relu):
        cfg["l1_coefficient"] = variant.l1_coeff
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SAELENS_WEIGHTS).write_bytes(
        st_save({k: v.float().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    )
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2))


# --------------------------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------------------------


def _contract(backbone_id: str | None, layer: int | None, tokens: str | None) -> Contract | None:
    given = [v is not None for v in (backbone_id, layer, tokens)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("pass all of backbone_id, layer and tokens (the SAE's contract), or none of them")
    return Contract(backbone_id=backbone_id, layer=layer, tokens=tokens)  # type: ignore[arg-type]


def _from_weights(
    weights: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    variant: Variant,
    where: str,
    *,
    contract: Contract | None,
    normalisation: NormalisationArg,
) -> SparseAutoencoder:
    check_tensors(weights, shapes, where)
    d_model, d_sae = shapes["W_enc"]
    mean, scale = (None, 1.0) if normalisation is None else (normalisation[0], float(normalisation[1]))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"normalisation scale must be a finite number > 0, got {scale}")
    input_norm = "none" if normalisation is None else ("scale" if mean is None else "mean_scale")
    try:
        cfg = SAEConfig(d_model=d_model, d_sae=d_sae, variant=variant, input_norm=input_norm)
    except ValueError as exc:
        raise InvalidSAEFile(f"{where}: {exc}") from None
    sae = SparseAutoencoder(cfg, contract=contract)
    with torch.no_grad():
        for name, t in weights.items():
            getattr(sae, name).copy_(t.to(torch.float32))
    sae.set_normalisation(None if mean is None else torch.as_tensor(mean, dtype=torch.float32), scale)
    sae.threshold_updates = 1 if "threshold" in weights else 0
    return sae.eval()
