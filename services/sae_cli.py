"""``saevctl train`` (queue a training job for an SAE or a sweep) and ``saevctl sae import | export | list | show |
stats``.

SAEs live in the object store at ``saes/<sae_id>/`` (``cfg.json``, ``sae.safetensors``, ``stats.safetensors``, and for
trained ones ``metrics.jsonl`` + ``train.json``). ``sae stats`` runs here, in this process: it is one streaming
forward pass over a shard set (ranged reads, bounded memory) with nothing worth checkpointing, and the job types
are fixed (a ``train`` spec needs steps and a width). Heavy imports happen inside the commands so that
``saevctl --help`` stays fast.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer

sae_app = typer.Typer(
    help="SAEs in the object store (saes/<sae_id>/): import, export, list, show, and compute statistics.",
    no_args_is_help=True,
)

NamespaceOption = typer.Option(
    "saev", "--namespace", help="Queue namespace: the prefix of every Redis key of the queue (workers must match)."
)
MEMBER_FIELDS = ("d_sae", "lr", "variant", "k", "l1_coeff", "k_aux", "aux_coeff", "matryoshka", "seed")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """The library's errors as one red line: exit 2 for bad input, 1 for the rest."""
    from sae_shared.jobs import InvalidSpec
    from sae_shared.sae import ContractMismatch, InvalidSAEFile
    from sae_shared.settings import ConfigError
    from sae_shared.shards import ShardSetError
    from sae_shared.storage import IncompleteArtifact, NotFound, StorageError

    try:
        yield
    except (IncompleteArtifact, NotFound) as exc:
        _fail(str(exc), 1)
    except (InvalidSpec, InvalidSAEFile, ContractMismatch, ShardSetError, ConfigError, ValueError,
            FileNotFoundError) as exc:
        _fail(str(exc), 2)
    except StorageError as exc:
        _fail(str(exc), 1)


def _store():
    from sae_shared.settings import get_settings
    from sae_shared.storage import open_store

    return open_store(get_settings())


def _prefix(sae_id: str) -> str:
    from sae_shared.storage import validate_prefix

    sae_id = sae_id.strip().strip("/")
    if not sae_id or "/" in sae_id:
        raise ValueError(f"an SAE id is one path segment (the folder under saes/), got {sae_id!r}")
    return validate_prefix(f"saes/{sae_id}")


def _parse_member(text: str) -> dict[str, Any]:
    """``lr=1e-4,k=16`` or ``matryoshka=64/256/1024`` -> a sweep member's overrides."""
    out: dict[str, Any] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not sep or key not in MEMBER_FIELDS:
            _fail(f"--member takes key=value pairs with keys {', '.join(MEMBER_FIELDS)}; got {part!r}")
        if key == "variant":
            out[key] = value
        elif key == "matryoshka":
            out[key] = [int(v) for v in value.split("/") if v]
        else:
            try:
                out[key] = int(value) if key in ("d_sae", "k", "k_aux", "seed") else float(value)
            except ValueError:
                _fail(f"--member {key} must be a number, got {value!r}")
    if not out:
        _fail("an empty --member; give e.g. --member lr=1e-4,k=16")
    return out


# --------------------------------------------------------------------------------------------------- train


def train_command(
    acts: str = typer.Option(..., "--acts", "-a", help="Shard set id to train on (activations/<acts_id>/)."),
    layer: int = typer.Option(..., "--layer", "-l", min=0, help="Recorded layer (0-based block index) to read."),
    d_sae: int = typer.Option(..., "--d-sae", min=1, help="Latents of the SAE (16-32 x d_model is usual)."),
    steps: int = typer.Option(..., "--steps", min=1, help="Optimiser steps."),
    variant: str = typer.Option("relu", "--variant", help="relu (ReLU + L1), topk (+ AuxK) or batchtopk."),
    k: int = typer.Option(32, "--k", min=1, help="Active latents per token (topk, batchtopk)."),
    l1: float = typer.Option(4e-4, "--l1", min=0, help="L1 coefficient λ (relu)."),
    lr: float = typer.Option(4e-4, "--lr", help="Peak Adam learning rate."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Tokens per step."),
    tokens: str = typer.Option("patches", "--tokens", help="Tokens of each row: all, cls, patches or registers."),
    warmup: int = typer.Option(500, "--warmup", min=0, help="Linear learning-rate warmup steps."),
    schedule: str = typer.Option("constant", "--schedule", help="After warmup: constant or cosine."),
    autocast: str = typer.Option("fp32", "--autocast", help="fp32, or bf16 autocast (weights stay fp32)."),
    heldout: float = typer.Option(0.1, "--heldout", help="Fraction of rows (the last ones) held out for evaluation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation and the batch order."),
    actors: int = typer.Option(0, "--actors", min=0, help="Spread the sweep's members over this many Ray actors "
                               "(one GPU each on a GPU cluster); 0 trains them all in the worker process."),
    member: List[str] = typer.Option(
        [], "--member", "-m", help="A sweep member, as overrides of the options above: e.g. -m lr=1e-4 -m "
        "lr=4e-4,k=16 -m variant=topk,d_sae=8192 (keys: " + ", ".join(MEMBER_FIELDS) + "). All members train on "
        "the same batches."),
    spec_extra: Optional[str] = typer.Option(
        None, "--spec", help="More spec fields as JSON (or @file.json), e.g. '{\"checkpoint_every\": 200}'."),
    idempotency_key: Optional[str] = typer.Option(None, "--idempotency-key", help="Submitting again with the same "
                                                  "key returns the first job."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts before the job is dead-lettered."),
    watch: bool = typer.Option(False, "--watch", help="Follow the job with a live progress bar until it ends."),
    namespace: str = NamespaceOption,
) -> None:
    """Queue a `train` job: an SAE, or a sweep with --member, on one layer of a shard set.

    Prints the job id and the ids the SAEs will have (saes/<sae_id>/); --watch follows the job with a progress bar.
    """
    from sae_shared.jobs import validate_spec

    spec: dict[str, Any] = {
        "acts_id": acts, "layer": layer, "d_sae": d_sae, "steps": steps, "variant": variant, "k": k, "l1_coeff": l1,
        "lr": lr, "batch_size": batch_size, "tokens": tokens, "warmup_steps": warmup, "schedule": schedule,
        "autocast": autocast, "heldout_fraction": heldout, "seed": seed, "actors": actors,
    }
    if member:
        spec["sweep"] = [_parse_member(m) for m in member]
    if spec_extra:
        text = Path(spec_extra[1:]).read_text() if spec_extra.startswith("@") else spec_extra
        try:
            extra = json.loads(text)
        except ValueError as exc:
            _fail(f"--spec is not valid JSON: {exc}")
        if not isinstance(extra, dict):
            _fail("--spec must be a JSON object")
        spec.update(extra)
    with _errors():
        from sae_shared.shards import ShardSet
        from services.worker.train_handler import config_from_spec, sae_ids_for

        model = validate_spec("train", spec)
        store = _store()
        shard_set = ShardSet(store, acts)
        try:
            shard_set.check_contract(layer=layer)
            shard_set.metadata.token_layout.select(tokens)
            d_model = shard_set.metadata.d_model
        finally:
            shard_set.close()
        config_from_spec(model, d_model)  # refuses inconsistent settings now, not on a worker
        ids = sae_ids_for(model, d_model)

    from services.worker.cli import _cli_errors, _queue, jobs_watch

    with _cli_errors():
        job = _queue(namespace).submit("train", spec, idempotency_key=idempotency_key, max_attempts=max_attempts)
    typer.echo(f"{job.id}  {job.type}  {job.state.value}")
    for sae_id in ids:
        typer.echo(f"sae  {sae_id}")
    if watch:
        jobs_watch(job.id, namespace=namespace, timeout=None)


# --------------------------------------------------------------------------------------------------- sae ...


def _describe(sae_id: str, cfg: dict[str, Any]) -> dict[str, Any]:
    sae = cfg.get("sae") or {}
    contract = cfg.get("contract") or {}
    stats = cfg.get("statistics") or {}
    metrics = stats.get("metrics") or {}
    variant = sae.get("variant") or {}
    return {
        "sae_id": sae_id,
        "variant": variant.get("kind", "?") + (f" k={variant['k']}" if "k" in variant else ""),
        "d_model": cfg.get("d_model"),
        "d_sae": cfg.get("d_sae"),
        "backbone_id": contract.get("backbone_id"),
        "layer": contract.get("layer"),
        "tokens": contract.get("tokens"),
        "stats_tokens": stats.get("n_tokens") if stats else None,
        "stats_source": stats.get("source") if stats else None,
        "fvu": metrics.get("fvu"),
        "l0": metrics.get("l0"),
        "n_dead": metrics.get("n_dead"),
    }


@sae_app.command("list")
def sae_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the SAEs in the store: variant, width, contract, and held-out quality when it has statistics."""
    with _errors():
        store = _store()
        rows = []
        for folder in store.list("saes/", recursive=False):
            if not folder.endswith("/"):
                continue
            sae_id = folder[len("saes/"):].rstrip("/")
            if not store.is_complete(f"saes/{sae_id}"):
                continue  # being written, or abandoned half-way
            rows.append(_describe(sae_id, store.get_json(f"saes/{sae_id}/cfg.json")))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("sae_id", "variant", "d_model", "d_sae", "backbone", "layer", "tokens", "fvu", "l0", "stats"):
        table.add_column(column, no_wrap=True)
    for r in rows:
        table.add_row(r["sae_id"], r["variant"], str(r["d_model"]), str(r["d_sae"]), str(r["backbone_id"]),
                      str(r["layer"]), str(r["tokens"]), _num(r["fvu"]), _num(r["l0"]),
                      f"{r['stats_tokens']} tokens" if r["stats_tokens"] is not None else "none")
    console = Console()
    if not console.is_terminal:  # piped: never cut an id to fit 80 columns
        console = Console(width=240)
    console.print(table)
    if not rows:
        typer.echo("no SAEs yet: `saevctl train ...` or `saevctl sae import ...`")


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


@sae_app.command("show")
def sae_show(
    sae_id: str = typer.Argument(..., help="SAE id (folder under saes/)."),
    as_json: bool = typer.Option(False, "--json", help="Print cfg.json (+ train.json) as JSON."),
) -> None:
    """Show one SAE: architecture, contract, normalisation, statistics summary and how it was trained."""
    with _errors():
        store = _store()
        prefix = _prefix(sae_id)
        manifest = store.read_manifest(prefix)
        cfg = store.get_json(f"{prefix}/cfg.json")
        train = store.get_json(f"{prefix}/train.json") if "train.json" in manifest["files"] else None
    if as_json:
        typer.echo(json.dumps({"cfg": cfg, "train": train, "files": manifest["files"]}, indent=2))
        return
    d = _describe(sae_id, cfg)
    stats = cfg.get("statistics")
    lines = [
        f"sae        {sae_id}",
        f"variant    {json.dumps(cfg['sae']['variant'])}",
        f"width      d_model={cfg['d_model']} d_sae={cfg['d_sae']}"
        + (f" matryoshka={cfg['sae']['matryoshka']['prefixes']}" if cfg["sae"].get("matryoshka") else ""),
        f"contract   {d['backbone_id']} layer {d['layer']} tokens {d['tokens']}",
        f"normalise  scale={cfg['normalisation']['scale']:.6g} centred={cfg['normalisation']['centred']}",
    ]
    if stats:
        m = stats.get("metrics") or {}
        lines.append(f"stats      {stats['n_tokens']} tokens from {stats.get('source') or '?'}")
        if m:
            lines.append("quality    " + " ".join(f"{k}={_num(m.get(k))}" for k in
                                                 ("fvu", "explained_variance", "l0", "n_dead", "n_dense",
                                                  "decoder_coherence")))
    else:
        lines.append(f"stats      none: compute them with `saevctl sae stats {sae_id} --acts <acts_id>`")
    if train:
        lines.append(f"trained    job {train['job_id']}, {train['steps']} steps, {train['tokens']} tokens on "
                     f"{train['spec']['acts_id']} (member {train['member']} of a sweep of {len(train['sweep'])})")
    lines.append("files      " + ", ".join(sorted(manifest["files"])))
    typer.echo("\n".join(lines))


@sae_app.command("import")
def sae_import(
    path: Path = typer.Argument(..., exists=True, help="A saev checkpoint file, or a SAELens folder."),
    sae_id: Optional[str] = typer.Option(None, "--id", help="Id to store it under (default: imp-<hash of the file>)."),
    fmt: str = typer.Option("auto", "--format", help="auto (folder: saelens, file: saev), saev or saelens."),
    backbone_id: Optional[str] = typer.Option(None, "--backbone-id", help="Backbone it reads (contract); required "
                                              "unless a SAELens folder exported by this platform records it."),
    layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Block index it reads (contract)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token selection it reads (contract)."),
    norm_scale: Optional[float] = typer.Option(None, "--norm-scale", help="saev: divide raw activations by this "
                                               "before the SAE, as its data loader did (default: none)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an SAE stored under the same id."),
) -> None:
    """Import a saev checkpoint or a SAELens folder into the store (saes/<id>/).

    Loading never unpickles anything beyond plain tensors (torch.load weights_only=True).
    """
    import hashlib

    from sae_shared.sae import save_sae
    from sae_shared.sae.interop import SAELENS_WEIGHTS, import_saelens, import_saev

    if fmt not in ("auto", "saev", "saelens"):
        _fail(f"--format must be auto, saev or saelens, got {fmt!r}")
    if fmt == "auto":
        fmt = "saelens" if path.is_dir() else "saev"
    with _errors():
        if fmt == "saelens":
            sae = import_saelens(path, backbone_id=backbone_id, layer=layer, tokens=tokens)
            digest_of = path / SAELENS_WEIGHTS
        else:
            normalisation = None if norm_scale is None else (None, norm_scale)
            sae = import_saev(path, backbone_id=backbone_id, layer=layer, tokens=tokens, normalisation=normalisation)
            digest_of = path
        if sae.contract is None:
            raise ValueError("an imported SAE needs its contract: pass --backbone-id, --layer and --tokens")
        if sae_id is None:
            h = hashlib.sha256()
            with open(digest_of, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            sae_id = f"imp-{h.hexdigest()[:20]}"
        store = _store()
        save_sae(sae, _prefix(sae_id), store=store, overwrite=overwrite)
    typer.echo(f"imported {sae_id}  {sae.cfg.variant.kind} d_model={sae.d_model} d_sae={sae.d_sae}")
    typer.echo(f"no statistics yet: `saevctl sae stats {sae_id} --acts <acts_id>` computes them over a shard set "
               f"of {sae.contract.backbone_id} layer {sae.contract.layer}")


@sae_app.command("export")
def sae_export(
    sae_id: str = typer.Argument(..., help="SAE id (folder under saes/)."),
    out: Path = typer.Argument(..., help="Folder to write."),
    fmt: str = typer.Option("saelens", "--format", help="saelens (cfg.json + sae_weights.safetensors, the "
                            "normalisation folded into the weights) or native (this platform's files)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder (native)."),
) -> None:
    """Write a stored SAE to a local folder, in SAELens's layout or this platform's."""
    from sae_shared.sae import load_sae, save_sae
    from sae_shared.sae.interop import export_saelens

    if fmt not in ("saelens", "native"):
        _fail(f"--format must be saelens or native, got {fmt!r}")
    with _errors():
        sae = load_sae(_prefix(sae_id), store=_store())
        if fmt == "saelens":
            export_saelens(sae, out)
        else:
            save_sae(sae, out, overwrite=overwrite)
    typer.echo(f"exported {sae_id} to {out} ({fmt})")


@sae_app.command("stats")
def sae_stats(
    sae_id: str = typer.Argument(..., help="SAE id (folder under saes/)."),
    acts: str = typer.Option(..., "--acts", "-a", help="Shard set of the SAE's backbone to run it over."),
    layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Layer to read (default: the SAE's)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token selection (default: the SAE's)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Only the first N tokens."),
    batch_tokens: int = typer.Option(8192, "--batch-tokens", min=1, help="Tokens per forward batch."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... (default: SAEV_DEVICE)."),
) -> None:
    """Compute an SAE's metrics and per-latent statistics over a shard set, and store them with it.

    Frequency, mean when firing, max, p99 and the log-frequency histogram, computed here (one streaming pass of
    ranged reads); the SAE's artifact is rewritten with them.
    """
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from sae_shared.sae import load_sae
    from sae_shared.sae.io import to_files
    from sae_shared.sae.sharded import shard_set_stats
    from sae_shared.settings import get_settings

    with _errors():
        store = _store()
        prefix = _prefix(sae_id)
        manifest = store.read_manifest(prefix)
        dev = device or get_settings().device
        if dev == "auto":
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
        sae = load_sae(prefix, store=store, device=dev)
        with Progress(TextColumn("[bold]stats"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[msg]}")) as bar:
            task = bar.add_task("stats", total=1.0, msg="")

            def on_batch(done: int, total: int) -> None:
                bar.update(task, completed=done / max(total, 1), msg=f"{done}/{total} tokens")

            st = shard_set_stats(sae, store, acts, layer=layer, tokens=tokens, max_tokens=max_tokens,
                                 batch_tokens=batch_tokens, on_batch=on_batch)
        files = to_files(sae.cpu())
        others = {name: store.get_bytes(f"{prefix}/{name}") for name in manifest["files"] if name not in files}
        writer = store.artifact(prefix, overwrite=True)
        for name, data in {**others, **files}.items():
            if name != "cfg.json":
                writer.put_bytes(name, data)
        writer.put_bytes("cfg.json", files["cfg.json"], content_type="application/json")
        extra = {k: v for k, v in manifest.get("extra", {}).items() if k != "produced_by"}
        writer.commit({**extra, "stats_source": acts})
    m = st.metrics
    typer.echo(f"{sae_id}: statistics over {st.n_tokens} tokens of {acts}")
    if m is not None:
        typer.echo(f"fvu={m.fvu:.4g} explained_variance={m.explained_variance:.4g} l0={m.l0:.4g} "
                   f"dead={m.n_dead} dense={m.n_dense}")
