"""Credentials come only from Settings and never reach a log: a small pipeline runs with every secret set (a Redis
that requires a password, the S3 server's secret key, a gateway API key) at debug level, and every log file it
leaves under the test's home, with every command's output, is searched for the secrets.

The pipeline: a real worker process (job types ``count`` and ``train-head``) runs a job that commits an artifact to
S3, a job that fails and is retried, one that fails for good and a real ``train-head`` job (the pretrained saliency
head published to S3); ``saevctl`` submits, lists, gets and watches them, and also meets a Redis it cannot reach and
a wrong S3 secret (error paths are where credentials leak). The Ray Serve services' logs are searched by
``tests/services/test_auth_all.py``, where that stack runs."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workers_support import REPO, WorkerProcess, wait_for, worker_env


@pytest.fixture
def redis_with_password(tmp_path):
    """A private redis-server that requires a password: (url with the password, the password)."""
    from services.common.local_ray import free_port
    from services.infra import _redis_binary

    password = "redispw-" + secrets.token_hex(12)
    port = free_port()
    proc = subprocess.Popen([_redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--requirepass", password, "--dir", str(tmp_path),
                             "--logfile", str(tmp_path / "redis.log")])
    try:
        import redis

        wait_for(lambda: _can_auth(redis, port, password), timeout=30, what="redis with a password")
        yield f"redis://:{password}@127.0.0.1:{port}/0", password
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _can_auth(redis, port: int, password: str) -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, password=password).ping())
    except redis.RedisError:
        return False


def _saevctl(env: dict[str, str], log: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``saevctl args``; its output (stdout and stderr) is appended to ``log``, as a service's would be."""
    done = subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    with open(log, "a") as f:
        f.write(f"$ saevctl {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    return done


def test_no_secret_reaches_a_log_file(tmp_path, settings, bucket, redis_with_password):
    redis_url, redis_password = redis_with_password
    s3_secret = settings.s3_secret_key.get_secret_value()
    api_key = "apikey-" + secrets.token_hex(16)
    home = tmp_path / "home"
    logs = home / "logs"
    logs.mkdir(parents=True)
    env = worker_env(settings, bucket)
    env.update(SAEV_HOME=str(home), SAEV_REDIS_URL=redis_url, SAEV_API_KEYS=api_key, SAEV_LOG_LEVEL="DEBUG",
               SAEV_LOG_JSON="1", SAEV_S3_RETRY_SECONDS="2")
    namespace = "sec-" + secrets.token_hex(4)
    cli_log = logs / "saevctl.log"

    def submit(job_type: str, spec: dict, *extra: str) -> str:
        done = _saevctl(env, cli_log, "jobs", "submit", job_type, "--spec", json.dumps(spec), "--namespace",
                        namespace, "--backoff", "0.2", *extra)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[0]

    jobs = [submit("count", {"steps": 3, "artifact_prefix": f"sec/{namespace}/a"}),
            submit("count", {"steps": 2, "fail_attempts": 1}),
            submit("count", {"steps": 2, "fail_permanently": True}, "--max-attempts", "1"),
            submit("train-head", {"kind": "saliency", "head_id": f"sec-{namespace}"})]
    worker = WorkerProcess(env, logs / "worker.log", namespace, "--types", "count,train-head", lease=5.0)
    try:
        def states() -> list[str]:
            out = _saevctl(env, cli_log, "jobs", "list", "--namespace", namespace, "--json")
            return [j["state"] for j in json.loads(out.stdout)["jobs"]] if out.returncode == 0 else []

        wait_for(lambda: len(s := states()) == 4 and all(x in ("succeeded", "dead", "failed") for x in s),
                 timeout=600, interval=2.0, what="the four jobs to end")
        for job in jobs:
            _saevctl(env, cli_log, "jobs", "get", job, "--namespace", namespace)
            _saevctl(env, cli_log, "jobs", "watch", job, "--namespace", namespace)
        assert sorted(states()).count("succeeded") == 3, cli_log.read_text()[-3000:]
    finally:
        worker.signal(15)
        try:
            worker.wait(timeout=60)
        finally:
            worker.close()

    # Error paths: a Redis that does not answer (with the password in its URL), an S3 secret that is wrong.
    unreachable = redis_url.rsplit(":", 1)[0] + f":{_closed_port()}/0"
    assert _saevctl({**env, "SAEV_REDIS_URL": unreachable}, cli_log, "jobs", "list", "--namespace",
                    namespace).returncode != 0
    wrong_s3 = {**env, "SAEV_S3_SECRET_KEY": "wrong-" + s3_secret}
    assert _saevctl(wrong_s3, cli_log, "datasets", "upload", str(tmp_path), "--name", "x").returncode != 0
    assert _saevctl(env, cli_log, "infra", "status").returncode in (0, 1)

    files = [p for p in home.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"worker.log", "saevctl.log"}
    assert len((logs / "worker.log").read_text().splitlines()) > 10, "the worker logged at debug level"
    for path in files:
        text = path.read_bytes()
        for name, secret in (("Redis password", redis_password), ("S3 secret key", s3_secret),
                             ("wrong S3 secret", "wrong-" + s3_secret), ("API key", api_key)):
            assert secret.encode() not in text, f"the {name} is in {path.relative_to(home)}"


def _closed_port() -> int:
    from services.common.local_ray import free_port

    return free_port()
