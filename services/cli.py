"""``saevctl``: the platform's command line.

Each area registers its own typer sub-application here; this module only assembles them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from sae_shared.settings import default_home

app = typer.Typer(
    name="saevctl",
    help="SAE-V platform: record ViT activations, train sparse autoencoders, analyse features and run "
    "interventions, as queued jobs over a Redis queue and an S3 object store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

infra_app = typer.Typer(
    help="Start, stop and inspect the local Redis and S3 (SeaweedFS) servers under $SAEV_HOME (default .saev/).",
    no_args_is_help=True,
)
app.add_typer(infra_app, name="infra")

HomeOption = typer.Option(
    None, "--home", help="State directory for servers, logs and credentials (default: $SAEV_HOME or .saev/)."
)


def _infra(home: Optional[Path], base_port: Optional[int] = None):
    from services.infra import LocalInfra

    return LocalInfra(home or default_home(), base_port=base_port)


@infra_app.command("up")
def infra_up(
    home: Optional[Path] = HomeOption,
    base_port: Optional[int] = typer.Option(
        None,
        "--base-port",
        help="First of the ten consecutive ports the servers use (default 26300; Redis on it, S3 on the next).",
    ),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the servers to answer."),
) -> None:
    """Start Redis and the S3 server (idempotent) and wait until both answer."""
    from services.infra import InfraError

    local = _infra(home, base_port)
    try:
        conn = local.up(timeout=timeout)
    except InfraError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"redis  running  {conn.redis_url}")
    typer.echo(f"s3     running  http://{conn.s3_endpoint} (bucket {conn.s3_bucket})")
    typer.echo(f"credentials and endpoints: {local.connection_path}")


@infra_app.command("status")
def infra_status(home: Optional[Path] = HomeOption) -> None:
    """Print one line per server: running, unhealthy (process up, not answering) or stopped. Exit 1 unless all run."""
    local = _infra(home)
    states = local.status()
    for name, state in states.items():
        pid = local.pid(name)
        typer.echo(f"{name:<6} {state}" + (f"  pid {pid}" if pid else ""))
    raise typer.Exit(0 if all(s == "running" for s in states.values()) else 1)


@infra_app.command("down")
def infra_down(
    home: Optional[Path] = HomeOption,
    grace: float = typer.Option(10.0, help="Seconds between SIGTERM and SIGKILL."),
) -> None:
    """Stop the servers this directory started, by pid (SIGTERM, then SIGKILL after the grace period)."""
    local = _infra(home)
    local.grace_seconds = grace
    for name, was_running in local.down().items():
        typer.echo(f"{name:<6} {'stopped' if was_running else 'was not running'}")


@app.command("demo")
def demo(
    home: Optional[Path] = HomeOption,
    tiny: bool = typer.Option(False, "--tiny", help="The CI size: a 4x SAE, fewer views and steps (a few minutes "
                                                    "on 2 cores)."),
    quick: bool = typer.Option(False, "--quick", hidden=True, help="Alias of --tiny."),
    no_serve: bool = typer.Option(False, "--no-serve", help="Stop after the report instead of serving the UI."),
    http_port: Optional[int] = typer.Option(None, help="Gateway HTTP port while serving (default 8000)."),
    grpc_port: Optional[int] = typer.Option(None, help="gRPC port while serving (default 9000)."),
    base_port: Optional[int] = typer.Option(None, "--base-port", help="First of the local servers' ten ports (as "
                                            "`saevctl infra up --base-port`; default 26300)."),
) -> None:
    """Run the paper's pipeline on the embedded default ViT as queued jobs (record, SAE sweep, analyze, heads, two
    intervention experiments with baselines), write an HTML report, then serve the UI until Ctrl-C. A rerun reuses
    finished jobs."""
    from services.demo import run_demo

    try:
        run_demo((home or default_home()).absolute(), "tiny" if tiny or quick else "default",
                 serve_after=not no_serve, http_port=http_port, grpc_port=grpc_port, base_port=base_port)
    except RuntimeError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc


@app.command("version")
def version() -> None:
    """Print the platform's version."""
    from importlib.metadata import version as pkg_version

    typer.echo(pkg_version("saev-platform"))


# --- each area's commands (heavy imports stay inside the commands, so `saevctl --help` is fast) ---
from services.worker.cli import jobs_app, worker_command  # noqa: E402

app.add_typer(jobs_app, name="jobs")
app.command("worker")(worker_command)

from services.record_cli import datasets_app, record_command  # noqa: E402

app.add_typer(datasets_app, name="datasets")
app.command("record")(record_command)

from services.serve_cli import encode_command, intervene_command, serve_command  # noqa: E402

app.command("serve")(serve_command)
app.command("encode")(encode_command)
app.command("intervene")(intervene_command)

from services.sae_cli import sae_app, train_command  # noqa: E402

app.add_typer(sae_app, name="sae")
app.command("train")(train_command)

from services.analysis_cli import analysis_app, analyze_command  # noqa: E402

app.add_typer(analysis_app, name="analysis")
app.command("analyze")(analyze_command)

from services.experiment_cli import experiment_command, train_head_command  # noqa: E402

app.command("train-head")(train_head_command)
app.command("experiment")(experiment_command)


def main() -> None:
    from sae_shared.settings import get_settings
    from sae_shared.telemetry import configure_logging

    try:
        s = get_settings()
        configure_logging(s.log_level, s.log_json)
    except Exception:  # noqa: BLE001 - a broken environment must not hide --help
        configure_logging("INFO")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    app()


if __name__ == "__main__":
    main()
