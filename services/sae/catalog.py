"""What the SAE service says about its SAEs: contracts, listings from the object store, latent statistics.

Plain dictionaries (they cross to the gateway, which has no torch), built from a loaded SAE or, for ListSAEs, from
the ``cfg.json`` of each committed SAE folder without loading its weights.
"""

from __future__ import annotations

import re
from typing import Any

SAE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$"
"""An SAE id: the name of its folder under ``saes/`` (no slashes, no dot-dot), at most ``SAE_ID_MAX`` characters."""
SAE_ID_MAX = 256
SAE_ID = re.compile(SAE_ID_PATTERN.replace("*$", f"{{0,{SAE_ID_MAX - 1}}}$"))
LIST_LIMIT = 1000
"""Most SAE folders ListSAEs reads from the object store."""


def list_saes(store, loaded: dict[str, Any]) -> list[dict[str, Any]]:
    """Every loaded SAE and every committed one under ``saes/`` (a malformed folder is skipped), sorted by id."""
    infos = {sae_id: describe_sae(sae_id, sae) for sae_id, sae in loaded.items()}
    if store is None:
        return sorted(infos.values(), key=lambda i: i["sae_id"])
    for info in infos.values():
        info["analyzed"] = _analysed(store, info["sae_id"])
    for folder in store.list("saes/", recursive=False)[:LIST_LIMIT]:
        sae_id = folder[len("saes/"):].rstrip("/")
        if not folder.endswith("/") or sae_id in infos or not SAE_ID.match(sae_id):
            continue
        try:
            if not store.is_complete(f"saes/{sae_id}"):
                continue
            infos[sae_id] = describe_cfg(sae_id, store.get_json(f"saes/{sae_id}/cfg.json"))
            infos[sae_id]["analyzed"] = _analysed(store, sae_id)
        except Exception:  # noqa: BLE001 - one unreadable folder does not fail the listing
            continue
    return sorted(infos.values(), key=lambda i: i["sae_id"])


def _analysed(store, sae_id: str) -> bool:
    """Whether a feature analysis of ``sae_id`` is published (its manifest is written last)."""
    try:
        return store.is_complete(f"saes/{sae_id}/analysis")
    except Exception:  # noqa: BLE001 - the listing says "not analysed" rather than fail
        return False


def architecture(variant_kind: str, matryoshka: bool) -> str:
    """SAEInfo.architecture: the variant's kind, with ``+matryoshka`` when trained so."""
    return variant_kind + ("+matryoshka" if matryoshka else "")


def describe_sae(sae_id: str, sae) -> dict[str, Any]:
    """The SAEInfo fields of a loaded SAE."""
    c = sae.contract
    return {"sae_id": sae_id, "backbone_id": c.backbone_id if c else "", "layer": c.layer if c else 0,
            "tokens": c.tokens if c else "", "d_model": sae.d_model, "d_sae": sae.d_sae,
            "architecture": architecture(str(sae.cfg.variant.kind), sae.cfg.matryoshka is not None),
            "analyzed": False, "has_statistics": sae.stats is not None}


def describe_cfg(sae_id: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The SAEInfo fields from a saved ``cfg.json`` (schema 1, see ``sae_shared.sae.io``)."""
    contract = cfg.get("contract") or {}
    variant = ((cfg.get("sae") or {}).get("variant") or {}).get("kind", "")
    return {"sae_id": sae_id, "backbone_id": contract.get("backbone_id", ""), "layer": int(contract.get("layer", 0)),
            "tokens": contract.get("tokens", ""), "d_model": int(cfg.get("d_model", 0)),
            "d_sae": int(cfg.get("d_sae", 0)),
            "architecture": architecture(str(variant).lower(), bool((cfg.get("sae") or {}).get("matryoshka"))),
            "analyzed": False, "has_statistics": bool(cfg.get("statistics"))}


def latent_stats_dict(stats, latent: int) -> dict[str, Any]:
    """``saev.v1.LatentStats`` fields of one latent from ``sae_shared.sae.LatentStats`` (image_frequency is not
    computed by the library yet and stays 0)."""
    freq = float(stats.frequency[latent])
    return {"latent": latent, "frequency": freq, "max_activation": float(stats.max[latent]),
            "mean_activation": float(stats.mean_when_firing[latent]), "dead": freq == 0.0, "dense": freq > 1e-2}
