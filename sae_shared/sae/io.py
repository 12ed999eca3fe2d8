"""Saving and loading SAEs: ``cfg.json`` + ``sae.safetensors`` (+ ``stats.safetensors``), locally or in the object store.

Layout (schema 1)::

    cfg.json            {"schema": 1, "format": "saev-platform/sae", "d_model", "d_sae",
                         "sae": {SAEConfig, variant tagged by "kind"}, "normalisation": {"scale", "centred"},
                         "contract": {"backbone_id", "layer", "tokens"},
                         "statistics": null | {"file", "n_tokens", "source", "quantile", "metrics"}}
    sae.safetensors     W_enc [d_model, d_sae], b_enc [d_sae], W_dec [d_sae, d_model], b_dec [d_model],
                        norm_mean [d_model] (+ threshold [d_sae] for BatchTopK / JumpReLU); fp32
    stats.safetensors   frequency, mean_when_firing, max, p99 [d_sae]; log_freq_edges, log_freq_counts

Loading validates everything (schema known, config valid, contract present, exact tensor names, shapes consistent
with the config, floating dtypes, finite values) and refuses a bad file with ``InvalidSAEFile`` naming the problem.
Nothing is unpickled: safetensors and JSON only. A new schema gets its own reader in ``_READERS`` that upgrades to
the in-memory form, so every older schema keeps loading.

The object store is duck-typed (``sae_shared.storage.ObjectStore``: ``artifact(prefix)`` writer with
``put_bytes(name, data)`` + ``commit()``, ``read_manifest(prefix)`` raising ``IncompleteArtifact``, ``get_bytes``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sae_shared.sae.config import (
    BatchTopK,
    Contract,
    JumpReLU,
    SAEConfig,
    contract_from_dict,
    contract_to_dict,
    sae_config_from_dict,
    sae_config_to_dict,
)
from sae_shared.sae.modeling import SparseAutoencoder
from sae_shared.sae.stats import EvalMetrics, LatentStats

SCHEMA = 1
"""Schema written by ``save_sae``; bump on any change of the layout and add a reader."""
FORMAT = "saev-platform/sae"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
STATS_FILE = "stats.safetensors"


class InvalidSAEFile(ValueError):
    """A saved or imported SAE failed validation; the message says which file and what is wrong."""


# --------------------------------------------------------------------------------------------------------------
# Serialisation to named files
# --------------------------------------------------------------------------------------------------------------


def to_files(sae: SparseAutoencoder) -> dict[str, bytes]:
    """The files of a saved SAE, name -> bytes (``cfg.json`` + ``sae.safetensors`` [+ ``stats.safetensors``])."""
    if sae.contract is None:
        raise ValueError(
            "cannot save an SAE without a backbone/layer/tokens contract; set "
            "sae.contract = Contract(backbone_id=..., layer=..., tokens=...) (importers take them as arguments)"
        )
    weights = {
        "W_enc": sae.W_enc,
        "b_enc": sae.b_enc,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
        "norm_mean": sae.norm_mean,
    }
    if isinstance(sae.cfg.variant, (BatchTopK, JumpReLU)):
        weights["threshold"] = sae.threshold
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    cfg: dict[str, Any] = {
        "schema": SCHEMA,
        "format": FORMAT,
        "d_model": sae.d_model,
        "d_sae": sae.d_sae,
        "sae": sae_config_to_dict(sae.cfg),
        "normalisation": {"scale": float(sae.norm_scale), "centred": bool((sae.norm_mean != 0).any())},
        "contract": contract_to_dict(sae.contract),
        "statistics": None,
    }
    files: dict[str, bytes] = {}
    if sae.stats is not None:
        st: LatentStats = sae.stats
        cfg["statistics"] = {
            "file": STATS_FILE,
            "n_tokens": st.n_tokens,
            "source": st.source,
            "quantile": st.quantile,
            "metrics": None if st.metrics is None else _json_floats(st.metrics._asdict()),
        }
        files[STATS_FILE] = st_save({name: getattr(st, name).detach().cpu().contiguous() for name in LatentStats.TENSORS})
    from sae_shared.storage import canonical_safetensors  # the same bytes in every process

    files[WEIGHTS_FILE] = canonical_safetensors(st_save(weights, metadata={"format": "pt", "schema": str(SCHEMA)}))
    files[CFG_FILE] = json.dumps(cfg, indent=2).encode()
    return files


def _read_cfg(read: Callable[[str], bytes], where: str) -> _Parsed:
    """The validated ``cfg.json`` of an SAE's files."""
    cfg_json = _parse_json(read(CFG_FILE), f"{where}/{CFG_FILE}")
    schema = cfg_json.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema not in _READERS:
        raise InvalidSAEFile(
            f"{where}/{CFG_FILE}: unknown schema {schema!r}; this version reads schemas {sorted(_READERS)} "
            "(a newer schema needs a newer saev-platform)"
        )
    with _malformed(f"{where}/{CFG_FILE}"):
        return _READERS[schema](cfg_json, f"{where}/{CFG_FILE}")


def _read_stats(read: Callable[[str], bytes], where: str, parsed: _Parsed) -> LatentStats | None:
    """The validated statistics the config names, or None when it names none."""
    if parsed.stats_meta is None:
        return None
    name = parsed.stats_meta["file"]
    tensors = _parse_safetensors(read(name), f"{where}/{name}")
    with _malformed(f"{where}/{name}"):
        return _build_stats(tensors, parsed.stats_meta, parsed.cfg.d_sae, f"{where}/{name}")


def read_metadata(read: Callable[[str], bytes], where: str) -> tuple[SAEConfig, Contract, LatentStats | None]:
    """An SAE's config, contract and statistics, validated as :func:`from_files` does, without reading its weights
    (what a client of the SAE service needs)."""
    parsed = _read_cfg(read, where)
    return parsed.cfg, parsed.contract, _read_stats(read, where, parsed)


def from_files(read: Callable[[str], bytes], where: str, *, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Build and validate an SAE from its files; ``read(name)`` returns a file's bytes (raises if missing)."""
    parsed = _read_cfg(read, where)
    weights = _parse_safetensors(read(WEIGHTS_FILE), f"{where}/{WEIGHTS_FILE}")
    with _malformed(f"{where}/{WEIGHTS_FILE}"):
        sae = _build(parsed.cfg, weights, parsed.scale, parsed.contract, f"{where}/{WEIGHTS_FILE}")
    sae.stats = _read_stats(read, where, parsed)
    return sae.to(device).eval()


@contextmanager
def _malformed(where: str) -> Iterator[None]:
    """Turn the errors a hostile file's odd values raise deep inside the readers (a list where an object belongs,
    a string where a number does) into :class:`InvalidSAEFile` naming the file."""
    try:
        yield
    except InvalidSAEFile:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError, RecursionError, RuntimeError) as exc:
        raise InvalidSAEFile(f"{where}: malformed ({type(exc).__name__}: {exc})") from None


class _Parsed(NamedTuple):
    cfg: SAEConfig
    scale: float
    contract: Contract
    stats_meta: dict[str, Any] | None


def _read_v1(obj: dict[str, Any], where: str) -> _Parsed:
    if obj.get("format") != FORMAT:
        raise InvalidSAEFile(f"{where}: 'format' must be {FORMAT!r}, got {obj.get('format')!r}")
    try:
        cfg = sae_config_from_dict(obj["sae"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidSAEFile(f"{where}: invalid SAE config: {exc}") from None
    if obj.get("d_model") != cfg.d_model or obj.get("d_sae") != cfg.d_sae:
        raise InvalidSAEFile(
            f"{where}: d_model/d_sae ({obj.get('d_model')}, {obj.get('d_sae')}) disagree with the SAE config "
            f"({cfg.d_model}, {cfg.d_sae})"
        )
    if obj.get("contract") is None:
        raise InvalidSAEFile(f"{where}: no backbone/layer/tokens contract; every saved SAE records one")
    try:
        contract = contract_from_dict(obj["contract"])
    except (TypeError, ValueError) as exc:
        raise InvalidSAEFile(f"{where}: invalid contract: {exc}") from None
    norm = obj.get("normalisation")
    scale = norm.get("scale") if isinstance(norm, dict) else None
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise InvalidSAEFile(f"{where}: normalisation.scale must be a finite number > 0, got {scale!r}")
    stats_meta = obj.get("statistics")
    if stats_meta is not None:
        if not isinstance(stats_meta, dict) or not isinstance(stats_meta.get("file"), str):
            raise InvalidSAEFile(f"{where}: 'statistics' must be null or an object naming its 'file'")
        if stats_meta["file"] != STATS_FILE:
            raise InvalidSAEFile(f"{where}: statistics file must be {STATS_FILE!r}, got {stats_meta['file']!r}")
    return _Parsed(cfg, float(scale), contract, stats_meta)


_READERS: dict[int, Callable[[dict[str, Any], str], _Parsed]] = {1: _read_v1}
"""Schema number -> reader producing the current in-memory form."""


def _expected_weights(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    d, s = cfg.d_model, cfg.d_sae
    shapes = {"W_enc": (d, s), "b_enc": (s,), "W_dec": (s, d), "b_dec": (d,), "norm_mean": (d,)}
    if isinstance(cfg.variant, (BatchTopK, JumpReLU)):
        shapes["threshold"] = (s,)
    return shapes


def check_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Exact names, shapes, floating dtypes and finite values, or ``InvalidSAEFile``."""
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise InvalidSAEFile(f"{where}: tensors missing {missing}, unexpected {extra}; expected {sorted(shapes)}")
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise InvalidSAEFile(f"{where}: {name} has shape {list(t.shape)}, the config implies {list(shape)}")
        if not t.is_floating_point():
            raise InvalidSAEFile(f"{where}: {name} has dtype {t.dtype}; a floating dtype is required")
        if not torch.isfinite(t).all():
            raise InvalidSAEFile(f"{where}: {name} contains NaN or infinite values")


def _build(
    cfg: SAEConfig, weights: dict[str, torch.Tensor], scale: float, contract: Contract | None, where: str
) -> SparseAutoencoder:
    check_tensors(weights, _expected_weights(cfg), where)
    sae = SparseAutoencoder(cfg, contract=contract)
    state = {k: v.to(torch.float32) for k, v in weights.items()}
    state["norm_scale"] = torch.tensor(float(scale))
    sae.load_state_dict(state)
    sae.threshold_updates = 1 if "threshold" in weights else 0
    return sae


def _build_stats(tensors: dict[str, torch.Tensor], meta: dict[str, Any], d_sae: int, where: str) -> LatentStats:
    for name in ("log_freq_edges", "log_freq_counts"):
        if name not in tensors or tensors[name].ndim != 1:
            raise InvalidSAEFile(f"{where}: {name} missing or not 1-D")
    n_bins = tensors["log_freq_counts"].shape[0]
    shapes = {name: (d_sae,) for name in ("frequency", "mean_when_firing", "max", "p99")}
    shapes["log_freq_edges"] = (n_bins + 1,)
    float_tensors = {k: v for k, v in tensors.items() if k != "log_freq_counts"}
    check_tensors(float_tensors, shapes, where)
    counts = tensors["log_freq_counts"]
    if counts.is_floating_point() or counts.is_complex() or bool((counts < 0).any()):
        raise InvalidSAEFile(f"{where}: log_freq_counts must be non-negative integers")
    freq = tensors["frequency"]
    if bool((freq < 0).any()) or bool((freq > 1).any()):
        raise InvalidSAEFile(f"{where}: frequency must lie in [0, 1]")
    n_tokens = meta.get("n_tokens")
    if not isinstance(n_tokens, int) or n_tokens < 0:
        raise InvalidSAEFile(f"{where}: statistics.n_tokens must be an int >= 0, got {n_tokens!r}")
    metrics = meta.get("metrics")
    if metrics is not None:
        try:
            metrics = EvalMetrics(**{k: (float("nan") if v is None else v) for k, v in metrics.items()})
        except TypeError as exc:
            raise InvalidSAEFile(f"{where}: statistics.metrics: {exc}") from None
    return LatentStats(
        n_tokens=n_tokens,
        frequency=freq.double(),
        mean_when_firing=tensors["mean_when_firing"].float(),
        max=tensors["max"].float(),
        p99=tensors["p99"].float(),
        log_freq_edges=tensors["log_freq_edges"].double(),
        log_freq_counts=counts.long(),
        metrics=metrics,
        source=str(meta.get("source", "")),
        quantile=float(meta.get("quantile", 0.99)),
    )


def _parse_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidSAEFile(f"{where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidSAEFile(f"{where}: not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise InvalidSAEFile(f"{where}: must hold a JSON object")
    return obj


def _parse_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(bytes(data))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for every malformed input
        raise InvalidSAEFile(f"{where}: not a valid safetensors file: {exc}") from None


def _json_floats(d: dict[str, Any]) -> dict[str, Any]:
    """NaN / inf are not JSON: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


def save_sae(sae: SparseAutoencoder, location: str | os.PathLike, *, store: Any = None, overwrite: bool = False) -> None:
    """Save ``sae`` to a local directory, or, with ``store``, to the artifact folder ``location`` in it.

    Locally the folder appears whole (written beside it, then renamed into place); in the store the artifact is
    visible only once committed. An existing SAE is replaced only with ``overwrite``.
    """
    files = to_files(sae)
    if store is not None:
        writer = store.artifact(str(location), overwrite=True) if overwrite else store.artifact(str(location))
        for name in (WEIGHTS_FILE, STATS_FILE, CFG_FILE):
            if name in files:
                writer.put_bytes(name, files[name])
        writer.commit()
        return
    target = Path(location)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if target.exists():
            trash = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_sae(location: str | os.PathLike, *, store: Any = None, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load and validate an SAE saved by ``save_sae`` from a local directory or (with ``store``) an artifact prefix.

    Raises ``InvalidSAEFile`` (a ``ValueError``) when a file fails validation, ``FileNotFoundError`` when a local
    file is missing, and the store's ``IncompleteArtifact`` when the artifact was never committed.
    """
    if store is not None:
        prefix = str(location).rstrip("/")
        store.read_manifest(prefix)  # refuses an artifact whose writer never committed

        def read(name: str) -> bytes:
            return store.get_bytes(f"{prefix}/{name}")

        return from_files(read, prefix, device=device)

    folder = Path(location)
    if not folder.is_dir():
        raise FileNotFoundError(f"no SAE directory at {folder}")

    def read_local(name: str) -> bytes:
        return (folder / name).read_bytes()

    return from_files(read_local, str(folder), device=device)
