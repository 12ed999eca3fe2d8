"""``saevctl analyze`` (queue a feature-analysis job, or run it here with ``--local``) and ``saevctl analysis show |
exemplars | image | tile`` (read a published analysis).

The analysis of SAE ``<sae_id>`` lives at ``saes/<sae_id>/analysis/`` (``sae_shared.analysis``). Heavy imports happen
inside the commands so that ``saevctl --help`` stays fast.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

analysis_app = typer.Typer(
    help="Read a published feature analysis (saes/<sae_id>/analysis/): summary, exemplars, an image's latents, "
    "tiles.",
    no_args_is_help=True,
)

NamespaceOption = typer.Option(
    "saev", "--namespace", help="Queue namespace: the prefix of every Redis key of the queue (workers must match)."
)
KINDS = ("patch", "cls")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """The library's errors as one red line: exit 2 for bad input, 1 for missing things and the store."""
    from sae_shared.analysis import NotAnalysed
    from sae_shared.datasets import DatasetError
    from sae_shared.jobs import InvalidSpec
    from sae_shared.sae import ContractMismatch, InvalidSAEFile
    from sae_shared.settings import ConfigError
    from sae_shared.shards import ShardSetError
    from sae_shared.storage import IncompleteArtifact, NotFound, StorageError

    try:
        yield
    except (IncompleteArtifact, NotFound, NotAnalysed) as exc:
        _fail(str(exc), 1)
    except (KeyError, IndexError) as exc:
        _fail(str(exc.args[0]) if exc.args else repr(exc), 2)
    except (InvalidSpec, InvalidSAEFile, ContractMismatch, ShardSetError, DatasetError, ConfigError,
            ValueError) as exc:
        _fail(str(exc), 2)
    except StorageError as exc:
        _fail(f"{exc} (is the object store running? `saevctl infra up`)", 1)


def _store():
    from sae_shared.settings import get_settings
    from sae_shared.storage import open_store

    return open_store(get_settings())


def _check_sae_id(sae_id: str) -> str:
    sae_id = sae_id.strip().strip("/")
    if not sae_id or "/" in sae_id:
        raise ValueError(f"an SAE id is one path segment (the folder under saes/), got {sae_id!r}")
    return sae_id


# --------------------------------------------------------------------------------------------------- analyze


def analyze_command(
    sae_id: str = typer.Argument(..., help="SAE id (folder under saes/)."),
    acts: str = typer.Option(..., "--acts", "-a", help="Shard set to run it over (activations/<acts_id>/)."),
    top_k: int = typer.Option(16, "--top-k", "-k", min=1, max=1024, help="Exemplars kept per latent."),
    reverse_n: int = typer.Option(16, "--reverse-n", min=1, help="Strongest latents kept per image (reverse index)."),
    layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Layer to read (default: the SAE's)."),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", min=1, help="Only the first N views."),
    batch_rows: Optional[int] = typer.Option(None, "--batch-rows", min=1, help="Views per step (default: sized "
                                             "to bound memory)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset to redraw exemplar views from for "
                                          "tiles, e.g. imagefolder:<dir> (default: the recording's own when it is "
                                          "bundled or stored)."),
    tiles: bool = typer.Option(True, "--tiles/--no-tiles", help="Render heatmap tiles for the latents worth "
                               "looking at."),
    max_tiles: int = typer.Option(256, "--max-tiles", min=0, help="Most latents to pre-render tiles for."),
    tiles_per_latent: Optional[int] = typer.Option(None, "--tiles-per-latent", min=1, help="Exemplars rendered "
                                                   "per latent (default: all top-k)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if an analysis of the same inputs exists."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... (default: SAEV_DEVICE)."),
    checkpoint_seconds: float = typer.Option(30.0, "--checkpoint-seconds", min=0, help="Least time between two "
                                             "resume checkpoints of a queued job."),
    local: bool = typer.Option(False, "--local", help="Run here and now instead of queueing a job."),
    watch: bool = typer.Option(False, "--watch", help="Follow the queued job until it ends."),
    idempotency_key: Optional[str] = typer.Option(None, "--idempotency-key", help="Submitting again with the same "
                                                  "key returns the first job."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts before the job is dead-lettered."),
    namespace: str = NamespaceOption,
    as_json: bool = typer.Option(False, "--json", help="Print the result (or the queued job) as JSON."),
) -> None:
    """Analyse an SAE's latents over a shard set: top-k exemplars by patch and by CLS activation with patch
    heatmaps, heatmap tiles and the reverse index (image -> latents), published at saes/<sae_id>/analysis/.

    By default an `analyze` job is queued for the workers (`saevctl worker`); `--local` runs it in this process.
    An analysis of the same inputs is reused, not redone (unless --force).
    """
    from sae_shared.jobs import validate_spec

    spec: dict[str, Any] = {
        "sae_id": sae_id, "acts_id": acts, "top_k": top_k, "reverse_n": reverse_n, "layer": layer,
        "max_rows": max_rows, "batch_rows": batch_rows, "dataset": dataset, "tiles": tiles, "max_tiles": max_tiles,
        "tiles_per_latent": tiles_per_latent, "force": force, "device": device,
        "checkpoint_seconds": checkpoint_seconds,
    }
    spec = {k: v for k, v in spec.items() if v is not None}
    with _errors():
        model = validate_spec("analyze", spec)
        _check_sae_id(sae_id)
        store = _store()
        _preflight(store, model)
    if local:
        _analyze_here(store, model, as_json)
        return

    from services.worker.cli import _cli_errors, _queue, jobs_watch

    with _cli_errors():
        job = _queue(namespace).submit("analyze", spec, idempotency_key=idempotency_key, max_attempts=max_attempts)
    if as_json:
        typer.echo(json.dumps(job.as_dict(), indent=2, default=str))
    else:
        typer.echo(f"{job.id}  {job.type}  {job.state.value}")
        typer.echo(f"analysis  saes/{sae_id}/analysis/")
    if watch:
        jobs_watch(job.id, namespace=namespace, timeout=None)


def _preflight(store, spec) -> None:
    """Refuse at submit what a worker would refuse: a missing SAE or shard set, another backbone or layer."""
    from sae_shared.sae import ContractMismatch
    from sae_shared.shards import ShardSet

    cfg = store.get_json(f"saes/{spec.sae_id}/cfg.json") if store.is_complete(f"saes/{spec.sae_id}") else None
    if cfg is None:
        from sae_shared.storage import IncompleteArtifact

        raise IncompleteArtifact(f"saes/{spec.sae_id}", f"no SAE {spec.sae_id!r} in the store (saes/{spec.sae_id}/ "
                                 "is missing or incomplete): `saevctl sae list` shows the SAEs")
    contract = cfg.get("contract") or {}
    shard_set = ShardSet(store, spec.acts_id)
    try:
        meta = shard_set.metadata
        layer = spec.layer if spec.layer is not None else contract.get("layer")
        if contract.get("backbone_id") not in (None, meta.backbone_id):
            raise ContractMismatch(f"SAE contract mismatch: {spec.sae_id} reads {contract['backbone_id']!r}, shard "
                                   f"set {spec.acts_id} comes from {meta.backbone_id!r}")
        if layer is None:
            raise ValueError("the SAE records no layer: pass --layer")
        shard_set.check_contract(layer=layer)
        if meta.d_model != cfg.get("d_model"):
            raise ValueError(f"shard set {spec.acts_id} holds d_model={meta.d_model}; the SAE reads "
                             f"{cfg.get('d_model')}")
    finally:
        shard_set.close()


def _analyze_here(store, spec, as_json: bool) -> None:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from sae_shared.analysis import analyze
    from services.worker.analyze_handler import options_from_spec

    with _errors():
        with Progress(TextColumn("[bold]analyze"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[message]}"), transient=as_json) as bar:
            task = bar.add_task("analyze", total=1.0, message="loading")

            def on_progress(fraction: float, message: str, metrics: dict) -> None:
                rate = f"  {metrics['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in metrics else ""
                bar.update(task, completed=fraction, message=message + rate)

            result = analyze(store, spec.sae_id, spec.acts_id, options_from_spec(spec), on_progress=on_progress)
            bar.update(task, completed=1.0, message="reused" if result["reused"] else "done")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    _print_summary(result)


def _print_summary(result: dict[str, Any]) -> None:
    if result["reused"]:
        typer.echo(f"analysis   {result['prefix']}/ (reused: same inputs, analysis_id {result['analysis_id']})")
        return
    typer.echo(f"analysis   {result['prefix']}/  (analysis_id {result['analysis_id']})")
    typer.echo(f"views      {result['n_rows']} of {result['n_images']} images, layer {result['layer']}, "
               f"top {result['top_k']} per latent by patch" + (" and by CLS" if result["has_cls"] else ""))
    if result.get("tokens_per_s"):
        typer.echo(f"speed      {result['tokens_per_s']:.0f} tokens/s, {result['seconds']:.1f} s in all")
    typer.echo(f"tiles      {result['tiles']} latents" + (f" ({result['tiles_skipped']})"
                                                          if result.get("tiles_skipped") else ""))


# --------------------------------------------------------------------------------------------------- analysis ...


@analysis_app.command("show")
def analysis_show(
    sae_id: str = typer.Argument(..., help="SAE id."),
    as_json: bool = typer.Option(False, "--json", help="Print analysis.json."),
) -> None:
    """Summary of an SAE's published analysis: inputs, counts, tiles."""
    from sae_shared.analysis import open_analysis

    with _errors():
        reader = open_analysis(_store(), _check_sae_id(sae_id))
    doc = reader.doc
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    tiles = doc.get("tiles") or {}
    lines = [
        f"analysis   saes/{sae_id}/analysis/  (analysis_id {doc['analysis_id']})",
        f"inputs     shard set {doc['acts_id']} layer {doc['layer']} ({doc['backbone_id']}), SAE weights "
        f"{doc['sae_sha256'][:12]}",
        f"views      {doc['n_rows']} views of {doc['n_images']} images, patch grid {doc['patch_grid']}, "
        f"CLS {'yes' if doc['has_cls'] else 'no'}",
        f"exemplars  top {doc['top_k']} per latent ({', '.join(reader.kinds)}); reverse index top "
        f"{doc['reverse_n']} per image",
        f"tiles      {len(tiles.get('latents') or [])} latents pre-rendered"
        + (f"; skipped: {tiles['skipped']}" if tiles.get("skipped") else ""),
        f"dataset    {doc.get('dataset') or 'none (give --dataset to `analysis tile`)'}",
    ]
    typer.echo("\n".join(lines))


@analysis_app.command("exemplars")
def analysis_exemplars(
    sae_id: str = typer.Argument(..., help="SAE id."),
    latent: int = typer.Argument(..., min=0, help="Latent index."),
    kind: str = typer.Option("patch", "--kind", help="patch (max over the view's patches) or cls."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Most exemplars to show."),
    heatmaps: bool = typer.Option(False, "--heatmaps", help="Include the patch heatmaps (JSON)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """A latent's top exemplar views: activation, image, view (crop, flip)."""
    from sae_shared.analysis import open_analysis

    if kind not in KINDS:
        _fail(f"--kind must be patch or cls, got {kind!r}")
    with _errors():
        reader = open_analysis(_store(), _check_sae_id(sae_id))
        exemplars = reader.exemplars(latent, kind, limit=limit, heatmaps=heatmaps or as_json)
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in e.to_json().items() if heatmaps or k != "heatmap"}
                               for e in exemplars], indent=2))
        return
    if not exemplars:
        typer.echo(f"latent {latent} never fired on a {kind} token of the analysed views")
    for e in exemplars:
        view = "whole image" if e.view is None else f"crop {list(e.view.crop)}{' flipped' if e.view.flip else ''}"
        typer.echo(f"{e.rank:>3}  {e.value:10.4g}  {e.image_id}  (image {e.image_index}, row {e.row}, {view})")


@analysis_app.command("image")
def analysis_image(
    sae_id: str = typer.Argument(..., help="SAE id."),
    image_id: str = typer.Argument(..., help="Image id (as the shard set's row records name it)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """An analysed image's strongest latents (reverse index)."""
    from sae_shared.analysis import open_analysis

    with _errors():
        latents = open_analysis(_store(), _check_sae_id(sae_id)).image_latents(image_id)
    if as_json:
        typer.echo(json.dumps([{"latent": i, "value": v} for i, v in latents], indent=2))
        return
    for i, v in latents:
        typer.echo(f"{i:>8}  {v:10.4g}")


@analysis_app.command("tile")
def analysis_tile(
    sae_id: str = typer.Argument(..., help="SAE id."),
    latent: int = typer.Argument(..., min=0, help="Latent index."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
    rank: int = typer.Option(0, "--rank", min=0, help="Which exemplar (0 = strongest)."),
    kind: str = typer.Option("patch", "--kind", help="patch or cls."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset to redraw the view from (default: "
                                          "the one the analysis recorded)."),
) -> None:
    """Write the heatmap tile of one exemplar (pre-rendered, cached, or rendered now and cached)."""
    from sae_shared.tiles import TileError, get_tile

    if kind not in KINDS:
        _fail(f"--kind must be patch or cls, got {kind!r}")
    with _errors():
        try:
            png = get_tile(_store(), _check_sae_id(sae_id), latent, rank, kind, dataset=dataset)
        except TileError as exc:
            _fail(str(exc), 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    typer.echo(f"wrote {out} ({len(png)} bytes)")
