"""Observability: the alert rules, the Grafana dashboard and the KEDA trigger query metrics that exist, and a live check
that drives traffic through the stack the way docker-compose runs it (deploy/ray-head.sh deploying the CPU serve
config with Ray's token auth on, plus a job worker), scrapes the endpoints Prometheus scrapes, and finds our metrics
with the values the traffic implies (request counts equal to the requests sent)."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import REPO

SUFFIXES = ("_bucket", "_count", "_sum", "_total")
RAY_BUILTIN = {
    # Ray 2.60's own series used by the rules and the dashboard (ray/serve/_private/request_ingress_metrics.py,
    # deployment_state.py, replica.py; ray/dashboard/modules/reporter/reporter_agent.py). The live test below sees
    # every one of them that a CPU stack without errors exports.
    "ray_serve_num_http_requests", "ray_serve_num_grpc_requests", "ray_serve_num_http_error_requests",
    "ray_serve_num_grpc_error_requests", "ray_serve_http_request_latency_ms", "ray_serve_grpc_request_latency_ms",
    "ray_serve_deployment_replica_healthy", "ray_serve_deployment_replica_starts",
    "ray_serve_deployment_queued_queries",
    "ray_node_gram_used", "ray_node_gpus_utilization",
}
NOT_ON_A_HEALTHY_CPU_STACK = {
    # Referenced metrics the live test cannot expect, and why.
    "ray_node_gram_used": "GPU nodes only", "ray_node_gpus_utilization": "GPU nodes only",
    "ray_serve_num_http_error_requests": "only after an HTTP error at the proxy",
    "ray_serve_num_grpc_error_requests": "only after a gRPC error status (sent below: present when Ray counts it)",
    "ray_serve_deployment_queued_queries": "only while requests wait for a replica",
    "saev_worker_job_retries": "only after a failed attempt", "saev_worker_dead_letters": "only after a dead letter",
    "saev_train_step": "train jobs only", "saev_train_loss": "train jobs only", "saev_train_fvu": "train jobs only",
    "saev_train_l0": "train jobs only", "saev_train_dead_latents": "train jobs only",
    "saev_train_dense_latents": "train jobs only", "saev_train_steps_per_second": "train jobs only",
    "saev_train_tokens": "train jobs only",
    "ray_saev_model_cache_total": "only on a lookup of a model loaded on demand (the CPU config preloads)",
}


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _defined(path: str) -> set[str]:
    """Metric names created with sae_shared.telemetry's counter/gauge/histogram in the given modules."""
    names = set()
    for file in (REPO / path).rglob("*.py") if (REPO / path).is_dir() else [REPO / path]:
        names |= set(re.findall(r'\b(?:counter|gauge|histogram)\(\s*"(saev_[a-z0-9_]+)"', file.read_text()))
    return {_base(n) for n in names}


def _referenced() -> dict[str, set[str]]:
    """metric -> where it is queried (alert rules, dashboard panels, KEDA trigger)."""
    queries: list[tuple[str, str]] = []
    for group in yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]:
        queries += [(f"alert {r['alert']}", r["expr"]) for r in group["rules"]]
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "saev.json").read_text())
    queries += [(f"panel {p['title']}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [("templating", v["definition"]) for v in dashboard["templating"]["list"] if v.get("definition")]
    keda = yaml.safe_load((REPO / "k8s" / "components" / "keda" / "scaledobject.yaml").read_text())
    queries += [("KEDA", t["metadata"]["query"]) for t in keda["spec"]["triggers"]]
    found: dict[str, set[str]] = {}
    for place, expr in queries:
        for name in re.findall(r"\b((?:ray|saev)_[a-zA-Z0-9_]+)", expr):
            found.setdefault(_base(name), set()).add(place)
    return found


def test_queried_metrics_exist():
    ours_in_replicas = {"ray_" + n for n in _defined("services/common/metrics.py")}
    ours_in_workers = _defined("services/worker")
    known = ours_in_replicas | ours_in_workers | RAY_BUILTIN
    unknown = {m: sorted(p) for m, p in _referenced().items() if m not in known}
    assert not unknown, f"queried but exported by nobody: {unknown}"
    assert {"ray_saev_requests", "ray_saev_request_seconds", "ray_saev_batch_size", "saev_queue_depth",
            "saev_worker_job_duration_seconds", "ray_node_gram_used"} <= set(_referenced()), \
        "the dashboard covers requests, latency, batch sizes, queue depth, job durations and GPU memory"


def test_dashboard_is_well_formed():
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "saev.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert all(t["expr"].count("(") == t["expr"].count(")") for t in panel["targets"]), panel["title"]
    provider = yaml.safe_load((REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "saev.yml").read_text())
    compose = (REPO / "docker-compose.yml").read_text()
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in compose


def test_alert_rules_are_well_formed():
    groups = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]
    names = [r["alert"] for g in groups for r in g["rules"]]
    assert len(names) == len(set(names))
    for group in groups:
        for rule in group["rules"]:
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            assert rule["labels"]["severity"] in ("page", "ticket") and rule["annotations"]["summary"]
    wanted = {"SaevHighErrorRate", "SaevHighLatency", "SaevQueueBacklog", "SaevDeadLetters", "SaevReplicaRestarts"}
    assert wanted <= set(names), "error rate, latency, queue depth, dead letters, replica restarts"
    # The same job names as the Kubernetes PodMonitors' jobLabel (the pods' app.kubernetes.io/name).
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert {"saev-ray", "saev-worker"} <= {j["job_name"] for j in prom["scrape_configs"]}


# --- live -------------------------------------------------------------------------------------------------------

def _get(url: str, headers: dict | None = None, timeout: float = 10.0) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def _wait(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group this test started (Ray's processes included), SIGKILL it after ``grace``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_live_stack_exports_what_the_dashboard_and_alerts_query(settings, tmp_path):
    import grpc

    from sae_shared.proto.saev.v1 import activations_pb2, activations_pb2_grpc, common_pb2
    from sae_shared.queue import Queue
    from services.common.limits import Limits
    from services.common.local_ray import free_port

    ports: dict[str, int] = {}
    for name in ("http", "grpc", "gcs", "client", "dashboard", "metrics", "agent", "worker"):
        ports[name] = free_port(set(ports.values()))
    api_key, token = "k-" + secrets.token_hex(8), "t-" + secrets.token_hex(16)
    namespace = "obs-" + secrets.token_hex(4)  # a queue of its own: no other test's jobs in the counts
    endpoint, access, secret = settings.require_s3()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAEV_", "RAY_"))}
    env.update(
        SAEV_HOME=str(tmp_path / "home"), SAEV_S3_ENDPOINT=endpoint, SAEV_S3_ACCESS_KEY=access,
        SAEV_S3_SECRET_KEY=secret, SAEV_S3_BUCKET=settings.s3_bucket, SAEV_REDIS_URL=settings.require_redis(),
        SAEV_API_KEYS=api_key, SAEV_LOG_JSON="true",
        # As in docker-compose: Ray's token auth on, shared by the head and its clients.
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
        RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=str(Limits.from_settings(settings).grpc_message_bytes),
    )
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head_log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [str(REPO / "deploy" / "ray-head.sh"), "--http-host", "127.0.0.1", "--node-ip", "127.0.0.1",
         "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]), "--gcs-port", str(ports["gcs"]),
         "--client-port", str(ports["client"]), "--dashboard-port", str(ports["dashboard"]),
         "--metrics-port", str(ports["metrics"]), "--agent-port", str(ports["agent"]),
         "cpu", "--", "--num-cpus=2", "--object-store-memory=268435456", f"--temp-dir={ray_tmp}",
         '--system-config={"metrics_report_interval_ms": 1000}'],
        cwd=REPO, env={**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"},
        stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        http = f"http://127.0.0.1:{ports['http']}"
        _wait(lambda: head.poll() is None and _get(f"{http}/readyz")[0] == 200 or head.poll() is not None, 420,
              "the gateway's /readyz")
        assert head.poll() is None, "ray-head.sh exited:\n" + (tmp_path / "ray-head.log").read_text()[-3000:]

        worker = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "worker", "--types", "count", "--metrics-port", str(ports["worker"]),
             "--poll", "0.2", "--lease", "5", "--namespace", namespace],
            cwd=REPO, env=env, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)

        # Traffic: HTTP through the gateway, gRPC straight to a model service, jobs through the queue.
        headers = {"authorization": f"Bearer {api_key}"}
        n_http, n_grpc_ok, n_grpc_bad, n_jobs = 5, 3, 2, 3
        for _ in range(n_http):
            status, body = _get(f"{http}/v1/backbones", headers)
            assert status == 200, body
        assert _get(f"{http}/v1/backbones")[0] == 401, "API keys are enforced"
        md = [("application", "activations"), ("authorization", f"Bearer {api_key}")]
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            stub = activations_pb2_grpc.ActivationsStub(channel)
            image = common_pb2.Image(encoded=_png())
            for _ in range(n_grpc_ok):
                stub.GetActivations(activations_pb2.GetActivationsRequest(images=[image], layers=[3]),
                                    metadata=md, timeout=120)
            for _ in range(n_grpc_bad):
                with pytest.raises(grpc.RpcError) as err:
                    stub.GetActivations(activations_pb2.GetActivationsRequest(images=[]), metadata=md, timeout=60)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        queue = Queue.from_settings(settings, namespace)
        for i in range(n_jobs):
            queue.submit("count", json.dumps({"steps": 1, "step_seconds": 0, "seed": f"obs-{i}"}))

        # The scrape targets of deploy/prometheus/prometheus.yml: Ray's metrics port and the worker's.
        def ray_counts():
            samples = _samples(_get(f"http://127.0.0.1:{ports['metrics']}/metrics")[1])
            ours = (_value(samples, "ray_saev_requests_total", application="gateway", method="ListBackbones",
                           code="OK"),
                    _value(samples, "ray_saev_requests_total", application="activations", method="GetActivations",
                           code="OK"),
                    _value(samples, "ray_saev_requests_total", application="activations", method="GetActivations",
                           code="INVALID_ARGUMENT"))
            # Ray's proxies report on their own schedule: wait for them too.
            proxies = (_value(samples, "ray_serve_num_grpc_requests_total", application="activations"),
                       _value(samples, "ray_serve_num_http_requests_total", application="gateway"))
            if ours == (n_http, n_grpc_ok, n_grpc_bad) and proxies[0] >= n_grpc_ok + n_grpc_bad \
                    and proxies[1] >= n_http:
                return samples
            return None

        ray_samples = _wait(ray_counts, 60, "request counters equal to the requests sent")

        def worker_counts():
            samples = _samples(_get(f"http://127.0.0.1:{ports['worker']}/metrics")[1])
            done = _value(samples, "saev_worker_jobs_total", type="count", outcome="succeeded")
            return samples if done == n_jobs and _value(samples, "saev_queue_depth", type="count") == 0 else None

        worker_samples = _wait(worker_counts, 60, f"{n_jobs} count jobs done in the worker's metrics")
    finally:
        if worker is not None:
            _stop(worker, 20)
        _stop(head, 45)
        head_log.close()
        subprocess.run(["rm", "-rf", ray_tmp])

    # Plausible values beyond the counters.
    assert _value(ray_samples, "ray_saev_request_seconds_count", application="activations",
                  method="GetActivations") == n_grpc_ok + n_grpc_bad
    assert 0 < _value(ray_samples, "ray_saev_request_seconds_sum", application="activations") < 600
    batches = _value(ray_samples, "ray_saev_batch_size_count", op="backbone")
    assert 1 <= batches <= n_grpc_ok
    # One image per request: every batch in the le=1 bucket. (Ray exports histogram sums approximated from bucket
    # midpoints, so the _sum series is not exact: the dashboard shows percentiles.)
    assert _value(ray_samples, "ray_saev_batch_size_bucket", op="backbone", le="1.0") == batches
    assert _value(ray_samples, "ray_serve_num_grpc_requests_total", application="activations") >= n_grpc_ok + n_grpc_bad
    assert _value(ray_samples, "ray_serve_num_http_requests_total", application="gateway") >= n_http
    assert _value(ray_samples, "ray_serve_deployment_replica_healthy") >= 4
    assert _value(worker_samples, "saev_worker_job_duration_seconds_count", type="count") == n_jobs
    assert _value(worker_samples, "saev_jobs", type="count", state="succeeded") >= n_jobs

    # Everything the rules and the dashboard query is there, but for what needs GPUs, errors or training.
    exported = {_base(name) for name, _ in ray_samples} | {_base(name) for name, _ in worker_samples}
    missing = {m: sorted(p) for m, p in _referenced().items()
               if m not in exported and m not in NOT_ON_A_HEALTHY_CPU_STACK}
    assert not missing, f"queried but not exported by the running stack: {missing}"
