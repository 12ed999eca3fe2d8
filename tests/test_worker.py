"""Worker processes on a real Redis and a real S3 server: the CLI, retries, and what happens when a worker is killed,
stalled or stopped, or Redis itself is killed and restarted.

Workers run ``count`` jobs (``sae_shared.jobs.CountSpec``): a hash chain over the steps with a checkpoint and a
progress report per step, whose result lists which attempt (lease epoch) ran which step.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import signal
import socket
import time
import urllib.request

import pytest

from sae_shared.queue import JobState, Queue, connect
from workers_support import wait_for, worker_env
from workers_support import cli, store, workers  # noqa: F401 - fixtures

LEASE = 1.0


def expected_value(steps: int, seed: str = "") -> str:
    """The value a ``count`` job must produce, however often it was interrupted."""
    from services.worker.handlers import _step_value

    value = hashlib.sha256(seed.encode()).hexdigest()
    for step in range(steps):
        value = _step_value(value, step)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


@pytest.fixture
def namespace() -> str:
    return "w" + secrets.token_hex(4)


@pytest.fixture
def queue(settings, namespace):
    q = Queue(connect(settings.redis_url), namespace, lease_seconds=LEASE)
    yield q
    try:
        keys = list(q.client.scan_iter(f"{namespace}:*", count=1000))
        if keys:
            q.client.delete(*keys)
    except Exception:  # noqa: BLE001 - Redis may be down if the test failed mid-restart
        pass


@pytest.fixture
def env(settings, bucket):
    """The shared fixtures' worker environment, with torch's default thread count (these jobs do no model math)."""
    return worker_env(settings, bucket)


def progressed(queue: Queue, job_id: str, fraction: float):
    return lambda: queue.get(job_id).progress.fraction >= fraction


# ---------------------------------------------------------------------------------------------- the happy path


def test_cli_submit_watch_get_list_with_a_worker_process(queue, store, workers, cli, namespace):
    spec = json.dumps({"steps": 4, "step_seconds": 0.05, "seed": "e2e", "artifact_prefix": "out/e2e"})
    submitted = cli("jobs", "submit", "count", "--spec", spec, "--idempotency-key", "e2e", "--namespace", namespace)
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.split()[0]
    again = cli("jobs", "submit", "count", "--spec", spec, "--idempotency-key", "e2e", "--namespace", namespace)
    assert again.output.split()[0] == job_id

    bad = cli("jobs", "submit", "count", "--spec", '{"steps": -1, "colour": "red"}', "--namespace", namespace)
    assert bad.exit_code == 2
    assert "steps: Input should be greater than 0" in bad.output and "colour: unknown field" in bad.output

    port = free_port()
    worker = workers.start("--metrics-port", str(port))
    watched = cli("jobs", "watch", job_id, "--namespace", namespace, "--timeout", "30")
    assert watched.exit_code == 0, watched.output
    assert "succeeded" in watched.output and expected_value(4, "e2e") in watched.output

    job = queue.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.attempts == 1 and job.progress.message == "step 4/4"
    assert job.result["value"] == expected_value(4, "e2e")
    assert store.get_json(job.result_key)["result"] == job.result
    assert store.get_json("out/e2e/result.json") == job.result
    assert store.read_manifest("out/e2e")["extra"]["produced_by"]["job_id"] == job_id

    got = cli("jobs", "get", job_id, "--json", "--namespace", namespace)
    assert json.loads(got.output)["state"] == "succeeded"
    listed = cli("jobs", "list", "--state", "succeeded", "--type", "count", "--namespace", namespace)
    assert job_id in listed.output
    assert job_id not in cli("jobs", "list", "--state", "failed", "--namespace", namespace).output

    metrics = scrape(port)
    assert 'saev_worker_jobs_total{outcome="succeeded",type="count"} 1.0' in metrics
    assert 'saev_jobs{state="succeeded",type="count"} 1.0' in metrics
    assert 'saev_queue_depth{type="count"} 0.0' in metrics
    assert "saev_worker_job_duration_seconds_bucket" in metrics

    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_worker_refuses_an_unknown_job_type(cli, namespace):
    result = cli("worker", "--types", "bogus", "--namespace", namespace)
    assert result.exit_code == 2
    assert "unknown job type(s) bogus" in result.output


def test_failures_are_retried_then_dead_lettered_and_counted(queue, workers, cli, namespace):
    dead = queue.submit("count", {"fail_attempts": 99}, max_attempts=3, backoff_seconds=0.1)
    flaky = queue.submit("count", {"fail_attempts": 1, "steps": 2}, max_attempts=3, backoff_seconds=0.1)
    broken = queue.submit("count", {"fail_permanently": True}, max_attempts=3)
    port = free_port()
    workers.start("--metrics-port", str(port))

    for job in (dead, flaky, broken):
        queue.wait(job.id, timeout=30)
    dead, flaky, broken = (queue.get(j.id) for j in (dead, flaky, broken))
    assert dead.state is JobState.DEAD and dead.attempts == 3 and dead.retries == 2
    assert "planned failure on attempt 3" in dead.error
    assert queue.dead_letters() == [dead.id]
    assert flaky.state is JobState.SUCCEEDED and flaky.attempts == 2 and flaky.retries == 1
    assert flaky.result["value"] == expected_value(2)
    assert broken.state is JobState.FAILED and broken.attempts == 1 and "fail_permanently" in broken.error

    watched = cli("jobs", "watch", dead.id, "--namespace", namespace)
    assert watched.exit_code == 1 and "dead" in watched.output

    metrics = wait_for(lambda: (m := scrape(port)) and 'saev_jobs{state="dead",type="count"} 1.0' in m and m)
    assert 'saev_worker_job_retries_total{type="count"} 3.0' in metrics
    assert 'saev_worker_dead_letters_total{type="count"} 1.0' in metrics
    assert 'saev_queue_dead_letters{type="count"} 1.0' in metrics
    assert 'saev_worker_jobs_total{outcome="failed",type="count"} 1.0' in metrics


# ----------------------------------------------------------------------------------- killed, stalled, stopped


def test_sigkilled_worker_job_is_resumed_from_its_checkpoint_by_another(queue, store, workers):
    spec = {"steps": 6, "step_seconds": 0.25, "seed": "kill"}
    job = queue.submit("count", spec)
    reference = queue.submit("count", spec)  # the same work, undisturbed
    first = workers.start()
    wait_for(progressed(queue, job.id, 2 / 6), what="two steps")
    first.signal(signal.SIGKILL)
    first.wait()

    second = workers.start("--concurrency", "2")
    done = queue.wait(job.id, timeout=30)
    undisturbed = queue.wait(reference.id, timeout=30)
    assert done.state is JobState.SUCCEEDED and undisturbed.state is JobState.SUCCEEDED
    assert done.result["value"] == undisturbed.result["value"] == expected_value(6, "kill")
    assert done.attempts == 2 and done.lost_leases == 1 and done.winner_epoch == 2

    executed = done.result["executed"]  # [epoch, step] in order
    assert [step for _, step in executed] == list(range(6))  # every step once, none lost
    by_first = [step for epoch, step in executed if epoch == 1]
    by_second = [step for epoch, step in executed if epoch == 2]
    assert len(by_first) >= 2 and by_second and min(by_second) == len(by_first)  # resumed, not restarted
    assert {epoch for epoch, _ in undisturbed.result["executed"]} == {1}
    assert store.get_json(done.result_key)["result"] == done.result
    # Checkpoints are cleaned up (SeaweedFS may list deleted keys for a moment after a batch delete).
    wait_for(lambda: store.list(f"jobs/{job.id}/") == [f"jobs/{job.id}/result.json"], timeout=5, what="cleanup")
    assert len(second.messages("job completed", job_id=job.id)) == 1


def test_stalled_worker_cannot_progress_complete_or_publish_after_a_takeover(queue, store, workers):
    spec = {"steps": 4, "step_seconds": 0.3, "seed": "stop", "artifact_prefix": "out/stalled", "ignore_lease_loss": True}
    job = queue.submit("count", spec)
    stalled = workers.start()
    wait_for(progressed(queue, job.id, 1 / 4), what="one step")
    stalled.signal(signal.SIGSTOP)

    rescuer = workers.start()
    done = queue.wait(job.id, timeout=30)
    assert done.state is JobState.SUCCEEDED and done.winner_epoch == 2
    manifest_before = store.read_manifest("out/stalled")

    stalled.signal(signal.SIGCONT)  # it wakes up and, ignoring refusals, runs its remaining steps to the end
    wait_for(lambda: stalled.messages("attempt finished", job_id=job.id), timeout=20, what="the stalled attempt to end")
    refused = {r["op"] for r in stalled.messages("fenced call refused", job_id=job.id)}
    assert {"progress", "checkpoint", "artifact commit", "complete"} <= refused, refused
    assert stalled.messages("attempt finished", job_id=job.id)[0]["outcome"] == "lease_lost"
    assert not stalled.messages("job completed", job_id=job.id)
    assert len(rescuer.messages("job completed", job_id=job.id)) == 1

    after = queue.get(job.id)  # the stale attempt changed nothing
    assert after.state is JobState.SUCCEEDED and after.version == done.version and after.result == done.result
    assert after.result["value"] == expected_value(4, "stop")
    assert store.list("out/") == ["out/stalled/_manifest.json", "out/stalled/result.json"]  # one artifact, the winner's
    assert store.read_manifest("out/stalled") == manifest_before
    assert manifest_before["extra"]["produced_by"]["epoch"] == 2
    assert store.get_json("out/stalled/result.json")["epoch"] == 2


def test_sigterm_finishes_the_step_releases_the_job_and_exits_zero(queue, workers):
    job = queue.submit("count", {"steps": 5, "step_seconds": 0.3, "seed": "term"})
    first = workers.start()
    wait_for(progressed(queue, job.id, 1 / 5), what="one step")
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=10) == 0
    assert first.messages("attempt finished", job_id=job.id)[0]["outcome"] == "released"
    released = queue.get(job.id)
    assert released.state is JobState.QUEUED and released.attempts == 0 and released.lost_leases == 0

    workers.start()
    done = queue.wait(job.id, timeout=30)
    assert done.state is JobState.SUCCEEDED and done.attempts == 1 and done.epoch == 2
    assert done.result["value"] == expected_value(5, "term")
    executed = done.result["executed"]
    assert [step for _, step in executed] == list(range(5))
    assert min(step for epoch, step in executed if epoch == 2) >= 1  # continued from the released checkpoint


def test_cancel_stops_a_running_handler_between_steps(queue, workers, cli, namespace):
    job = queue.submit("count", {"steps": 50, "step_seconds": 0.1})
    worker = workers.start()
    wait_for(progressed(queue, job.id, 2 / 50), what="two steps")
    cancelled = cli("jobs", "cancel", job.id, "--namespace", namespace)
    assert cancelled.exit_code == 0 and "cancelling" in cancelled.output
    done = queue.wait(job.id, timeout=10)
    assert done.state is JobState.CANCELLED and done.progress.fraction < 1
    finished = wait_for(lambda: worker.messages("attempt finished", job_id=job.id), what="the attempt to end")
    assert finished[0]["outcome"] == "cancelled"
    # The worker carries on with the next job.
    nxt = queue.submit("count", {"steps": 1})
    assert queue.wait(nxt.id, timeout=10).state is JobState.SUCCEEDED


# ------------------------------------------------------------------------------------------- Redis restarted


def test_redis_killed_and_restarted_loses_no_job_and_completes_none_twice(infra, queue, workers):
    queue.client.config_set("appendfsync", "always")  # an acknowledged write must survive SIGKILL (module docs)
    jobs = [queue.submit("count", {"steps": 3, "step_seconds": 0.2, "seed": str(i)}) for i in range(10)]
    group = [workers.start("--concurrency", "2") for _ in range(2)]

    def mid_flight():
        counts = queue.counts(["count"])
        return counts[("count", "running")] >= 2 and counts[("count", "queued")] >= 2

    wait_for(mid_flight, what="jobs both running and queued")
    run_id = queue.client.info("server")["run_id"]
    infra.kill("redis")
    time.sleep(LEASE + 0.5)  # down for longer than a lease: running jobs' leases expire meanwhile
    infra.start("redis")
    assert queue.client.info("server")["run_id"] != run_id  # a new server process, state from the AOF

    def all_done():
        try:
            return all(queue.get(j.id).terminal for j in jobs)
        except Exception:  # noqa: BLE001 - reconnecting
            return False

    wait_for(all_done, timeout=60, interval=0.2, what="every job to finish")
    for i, job in enumerate(jobs):
        done = queue.get(job.id)
        assert done.state is JobState.SUCCEEDED, (done.state, done.error)
        assert done.result["value"] == expected_value(3, str(i))
        completions = sum(len(w.messages("job completed", job_id=job.id)) for w in group)
        assert completions == 1, f"job {job.id} completed {completions} times"
    for w in group:
        w.signal(signal.SIGTERM)
        assert w.wait(timeout=15) == 0
