"""``saevctl jobs ...`` and ``saevctl worker``.

Imports of Redis, the store and rich happen inside the commands, so that ``saevctl --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer

from sae_shared.jobs import JOB_TYPES

jobs_app = typer.Typer(
    help="Submit, inspect, cancel and watch queued jobs (" + ", ".join(JOB_TYPES) + ").",
    no_args_is_help=True,
)

NamespaceOption = typer.Option(
    "saev", "--namespace", help="Queue namespace: the prefix of every Redis key of the queue (workers must match)."
)
JsonOption = typer.Option(False, "--json", help="Print the job(s) as JSON.")


@contextmanager
def _cli_errors() -> Iterator[None]:
    """Turn the queue's errors into one red line and an exit code: 2 for bad input, 1 for the rest."""
    import redis

    from sae_shared.jobs import InvalidSpec
    from sae_shared.queue import QueueError
    from sae_shared.settings import ConfigError
    from sae_shared.storage import StorageError

    try:
        yield
    except (InvalidSpec, ConfigError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    except (QueueError, StorageError, redis.RedisError, TimeoutError) as exc:
        hint = " (is Redis running? `saevctl infra up`)" if isinstance(exc, redis.ConnectionError) else ""
        typer.secho(f"error: {exc}{hint}", fg="red", err=True)
        raise typer.Exit(1) from None


def _queue(namespace: str, **kwargs: Any):
    from sae_shared.queue import Queue
    from sae_shared.settings import get_settings

    return Queue.from_settings(get_settings(), namespace, **kwargs)


def _read_spec(spec: str) -> str:
    if spec.startswith("@"):
        source = spec[1:]
        return sys.stdin.read() if source == "-" else Path(source).read_text()
    return spec


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _print_job(job, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(job.as_dict(), indent=2, default=str))
        return
    lines = [
        f"job        {job.id}",
        f"type       {job.type}",
        f"state      {job.state.value}",
        f"attempts   {job.attempts}/{job.max_attempts} (epoch {job.epoch}, retries {job.retries}, "
        f"lost leases {job.lost_leases})",
        f"progress   {job.progress.fraction:.0%} {job.progress.message}".rstrip(),
    ]
    if job.progress.metrics:
        lines.append("metrics    " + " ".join(f"{k}={v}" for k, v in job.progress.metrics.items()))
    if job.worker:
        lines.append(f"worker     {job.worker}")
    if job.result_key:
        lines.append(f"result     {job.result_key}")
    if job.error:
        lines.append(f"error      {job.error.splitlines()[0][:300]}")
    lines.append(f"spec       {json.dumps(job.spec, sort_keys=True)}")
    typer.echo("\n".join(lines))


@jobs_app.command("submit")
def jobs_submit(
    job_type: str = typer.Argument(..., help="Job type: " + ", ".join(JOB_TYPES) + "."),
    spec: str = typer.Option("{}", "--spec", help="The spec as JSON, or @file.json (@- for stdin)."),
    idempotency_key: Optional[str] = typer.Option(
        None, "--idempotency-key", help="Submitting again with the same key returns the first job."
    ),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts before the job is dead-lettered."),
    backoff: float = typer.Option(5.0, "--backoff", min=0, help="Seconds before the first retry (doubling after)."),
    watch: bool = typer.Option(False, "--watch", help="Watch the job after submitting it."),
    namespace: str = NamespaceOption,
    as_json: bool = JsonOption,
) -> None:
    """Validate a job spec and queue the job; prints its id. A bad spec is refused with what to fix."""
    with _cli_errors():
        queue = _queue(namespace)
        job = queue.submit(
            job_type, _read_spec(spec), idempotency_key=idempotency_key, max_attempts=max_attempts,
            backoff_seconds=backoff,
        )
        if as_json:
            _print_job(job, True)
        else:
            typer.echo(f"{job.id}  {job.type}  {job.state.value}")
    if watch:
        jobs_watch(job.id, namespace=namespace, timeout=None)


@jobs_app.command("get")
def jobs_get(
    job_id: str = typer.Argument(..., help="Job id."),
    namespace: str = NamespaceOption,
    as_json: bool = JsonOption,
) -> None:
    """Show one job: state, attempts, progress, result key or error."""
    with _cli_errors():
        _print_job(_queue(namespace).get(job_id), as_json)


@jobs_app.command("list")
def jobs_list(
    state: List[str] = typer.Option([], "--state", help="Only jobs in this state (repeatable)."),
    job_type: List[str] = typer.Option([], "--type", help="Only jobs of this type (repeatable)."),
    limit: int = typer.Option(50, "--limit", min=1, max=1000, help="Most jobs to show."),
    page: Optional[str] = typer.Option(None, "--page", help="Page token printed by the previous page."),
    namespace: str = NamespaceOption,
    as_json: bool = JsonOption,
) -> None:
    """List jobs, newest first, filtered by state and type."""
    with _cli_errors():
        queue = _queue(namespace)
        jobs, token = queue.list(state or None, job_type or None, limit=limit, before=page)
        if as_json:
            typer.echo(json.dumps({"jobs": [j.as_dict() for j in jobs], "next_page": token}, indent=2, default=str))
            return
        from rich.console import Console
        from rich.table import Table

        now = queue.server_time()
        table = Table(box=None, pad_edge=False)
        for column in ("id", "type", "state", "progress", "attempts", "age", "message"):
            table.add_column(column, no_wrap=column != "message")
        for j in jobs:
            message = j.error.splitlines()[0] if j.error and j.state.terminal else j.progress.message
            table.add_row(j.id, j.type, j.state.value, f"{j.progress.fraction:.0%}", f"{j.attempts}/{j.max_attempts}",
                          _ago(now - j.created_at), (message or "")[:80])
        Console().print(table)
        if token:
            typer.echo(f"more: --page {token}")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str = typer.Argument(..., help="Job id."),
    reason: str = typer.Option("cancelled by user", "--reason", help="Recorded as the job's error."),
    namespace: str = NamespaceOption,
) -> None:
    """Cancel a queued job, or ask a running one to stop at its next step."""
    with _cli_errors():
        job = _queue(namespace).cancel(job_id, reason)
        typer.echo(f"{job.id}  {job.state.value}")


@jobs_app.command("requeue")
def jobs_requeue(
    job_id: str = typer.Argument(..., help="Job id."),
    namespace: str = NamespaceOption,
) -> None:
    """Queue a failed, dead or cancelled job again with fresh attempts (it resumes from its checkpoints)."""
    with _cli_errors():
        job = _queue(namespace).requeue(job_id)
        typer.echo(f"{job.id}  {job.state.value}")


def _metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


@jobs_app.command("watch")
def jobs_watch(
    job_id: str = typer.Argument(..., help="Job id."),
    namespace: str = NamespaceOption,
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Give up after this many seconds (exit 1)."),
) -> None:
    """Follow a job with a live progress bar (message and metrics) until it ends; print its result or error.
    Exit code 0 when it succeeded, 1 otherwise."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from sae_shared.queue import JobState

    console = Console(stderr=False)
    job = None
    with _cli_errors():
        queue = _queue(namespace)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[state]}"),
            TextColumn("{task.fields[message]}"),
            console=console,
            transient=False,
        ) as bar:
            task = None
            for job in queue.watch(job_id, timeout=timeout):
                message = " ".join(x for x in (job.progress.message, _metrics_text(job.progress.metrics)) if x)
                if task is None:
                    task = bar.add_task(f"{job.type} {job.id}", total=1.0, state="", message="")
                bar.update(task, completed=job.progress.fraction, state=job.state.value, message=message[:100])
    assert job is not None
    if job.state is JobState.SUCCEEDED:
        console.print(f"[green]succeeded[/green] result at {job.result_key}")
        typer.echo(json.dumps(job.result, indent=2))
        raise typer.Exit(0)
    console.print(f"[red]{job.state.value}[/red] after {job.attempts} attempt(s)")
    if job.error:
        typer.echo(job.error, err=True)
    raise typer.Exit(1)


def worker_command(
    types: str = typer.Option(
        "", "--types", help="Comma-separated job types to serve (default: every type this worker has a handler for)."
    ),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="Jobs run at once (threads) in this process."),
    lease: float = typer.Option(
        30.0, "--lease", min=0.2, help="Lease seconds: a job whose worker is silent this long is taken over."
    ),
    metrics_port: int = typer.Option(0, "--metrics-port", min=0, help="Serve Prometheus metrics here (0: off)."),
    max_jobs: int = typer.Option(0, "--max-jobs", min=0, help="Exit after starting this many jobs (0: no limit)."),
    poll: float = typer.Option(1.0, "--poll", min=0.05, help="Seconds a claim waits for a job before looking again."),
    worker_id: Optional[str] = typer.Option(None, "--worker-id", help="Name shown on the jobs (default host:pid)."),
    namespace: str = NamespaceOption,
) -> None:
    """Run jobs from the queue. SIGTERM finishes the current step, hands the job back to the queue and exits 0."""
    from sae_shared.settings import get_settings
    from sae_shared.storage import open_store
    from sae_shared.telemetry import start_metrics_server
    from services.worker.registry import UnknownJobType, available_types

    with _cli_errors():
        settings = get_settings()
        chosen = [t.strip() for t in types.split(",") if t.strip()] or available_types()
        unknown = [t for t in chosen if t not in JOB_TYPES]
        if unknown:
            raise ValueError(f"unknown job type(s) {', '.join(unknown)}: choose from {', '.join(JOB_TYPES)}")
        from services.worker.metrics import WorkerMetrics
        from services.worker.runtime import Worker

        queue = _queue(namespace, lease_seconds=lease)
        store = open_store(settings)
        metrics = WorkerMetrics()
        if metrics_port:
            start_metrics_server(metrics_port, settings.metrics_host)
        try:
            worker = Worker(
                queue, store, chosen, concurrency=concurrency, worker_id=worker_id, max_jobs=max_jobs,
                poll_seconds=poll, metrics=metrics,
            )
        except UnknownJobType as exc:
            raise ValueError(str(exc)) from None
        code = worker.run()
    raise typer.Exit(code)
