"""Helpers for the queue and worker tests: real worker processes, their JSON logs, and waiting for conditions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; return that, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def worker_env(settings: Any, bucket: str) -> dict[str, str]:
    """Environment for a worker process reaching the test servers, storing in ``bucket``, logging JSON lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAEV_")}
    env.update(
        SAEV_HOME=str(settings.home),
        SAEV_REDIS_URL=settings.redis_url,
        SAEV_S3_ENDPOINT=settings.s3_endpoint,
        SAEV_S3_ACCESS_KEY=settings.s3_access_key,
        SAEV_S3_SECRET_KEY=settings.s3_secret_key.get_secret_value(),
        SAEV_STORAGE_URL=f"s3://{bucket}",
        SAEV_S3_RETRY_SECONDS="30",
        SAEV_LOG_JSON="1",
        SAEV_LOG_LEVEL="INFO",
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    return env


class WorkerProcess:
    """``python -m services.worker`` as a child process, its output in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, namespace: str, *args: str, lease: float = 1.0):
        self.log_path = log_path
        argv = [
            sys.executable, "-m", "services.worker", "--namespace", namespace, "--types", "count",
            "--lease", str(lease), "--poll", "0.2", *args,
        ]
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (other lines are skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def messages(self, msg: str, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("msg") == msg and all(r.get(k) == v for k, v in fields.items())]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Kill the process if it still runs (test teardown)."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


class Workers:
    """Starts worker processes for one test and kills whatever is left at the end."""

    def __init__(self, env: dict[str, str], log_dir: Path, namespace: str):
        self.env, self.log_dir, self.namespace = env, log_dir, namespace
        self.started: list[WorkerProcess] = []

    def start(self, *args: str, lease: float = 1.0) -> WorkerProcess:
        path = self.log_dir / f"worker-{len(self.started)}.log"
        w = WorkerProcess(self.env, path, self.namespace, *args, lease=lease)
        self.started.append(w)
        return w

    def close(self) -> None:
        for w in self.started:
            w.close()


# ------------------------------------------------------------------------------- fixtures of the job-type tests
# Imported by tests/test_{train,analyze,head,experiment}_job.py and test_worker.py (each defines ``namespace`` and
# ``LEASE``; test_worker.py its own ``queue`` and ``env``), and ``store`` by test_queue.py.

import pytest  # noqa: E402


@pytest.fixture
def queue(request, settings, namespace):
    """The job queue in the test's namespace, with the module's ``LEASE``; its keys deleted afterwards."""
    from sae_shared.queue import Queue, connect

    q = Queue(connect(settings.redis_url), namespace, lease_seconds=request.module.LEASE)
    yield q
    keys = list(q.client.scan_iter(f"{namespace}:*", count=1000))
    if keys:
        q.client.delete(*keys)


@pytest.fixture
def store(settings, bucket):
    """The object store, in the test's bucket."""
    from sae_shared.settings import Settings
    from sae_shared.storage import open_store

    return open_store(Settings(**{**settings.model_dump(), "storage_url": f"s3://{bucket}"}))


@pytest.fixture
def env(settings, bucket):
    """Worker environment with one compute thread: tiny steps run ~50x slower with two threads spinning against
    each other on a loaded two-core machine, and the in-process reference runs use one thread too (same sums)."""
    return {**worker_env(settings, bucket), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def workers(env, tmp_path, namespace):
    group = Workers(env, tmp_path, namespace)
    yield group
    group.close()


@pytest.fixture
def cli(env, monkeypatch):
    """``saevctl`` in process, with the workers' settings."""
    import typer.testing

    from sae_shared.settings import get_settings
    from services.cli import app

    for key, value in env.items():
        if key.startswith("SAEV_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    runner = typer.testing.CliRunner()
    yield lambda *args: runner.invoke(app, list(args))
    get_settings.cache_clear()
