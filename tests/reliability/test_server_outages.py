"""The servers under the workers fail: Redis is SIGKILLed and restarted from its append-only file with jobs queued
and running, and the S3 server is stopped for about ten seconds while a recording and a training job write.

Both tests use a private Redis + SeaweedFS pair for this module (``LocalInfra``, as ``saevctl infra up`` starts
them), so that killing them leaves the session's servers, which other tests share, alone. Real worker processes
run real handlers (``train``, ``record``) and the ``count`` job, whose artifact goes through the same staged
publication as every other job's.
"""

from __future__ import annotations

import secrets
import signal
import threading
import time

import pytest

from sae_shared.queue import JobState, Queue, connect
from sae_shared.storage import IncompleteArtifact, StorageError
from tests.reliability.conftest import drop_namespace, make_bucket, open_bucket
from tests.reliability.jobs_support import CASES, Inputs
from tests.workers_support import Workers, wait_for, worker_env

LEASE = 4.0
"""Seconds; longer than a starved heartbeat on a loaded machine (a spurious takeover costs an attempt)."""


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    """A Redis and an S3 server of this module's own, and settings for them."""
    from sae_shared.settings import Settings
    from services.infra import LocalInfra, find_free_base

    local = LocalInfra(tmp_path_factory.mktemp("outage-home"), base_port=find_free_base(), grace_seconds=5.0)
    local.up()
    # The queue's promise across a crash of Redis itself needs every acknowledged write on disk (sae_shared/queue.py).
    connect(local.connection().redis_url).config_set("appendfsync", "always")
    yield local, Settings(home=local.home, **local.connection().as_settings())
    local.down()


@pytest.fixture
def setup(private, tmp_path, namespace):
    """(infra, store, queue, workers) on the private servers, a fresh bucket and namespace."""
    infra, settings = private
    bucket = make_bucket(settings)
    # Long store retries: the S3 server's restart itself takes seconds on a loaded machine.
    env = {**worker_env(settings, bucket), "OMP_NUM_THREADS": "1", "SAEV_S3_RETRY_SECONDS": "120"}
    queue = Queue(connect(settings.redis_url), namespace, lease_seconds=LEASE)
    group = Workers(env, tmp_path, namespace)
    yield infra, open_bucket(settings, bucket), queue, group
    group.close()
    drop_namespace(queue)


def completions(workers: Workers, job_id: str) -> list[dict]:
    return [r for w in workers.started for r in w.messages("job completed", job_id=job_id)]


def wait_all(queue: Queue, jobs, timeout: float) -> None:
    def done():
        try:
            return all(queue.get(j.id).state.terminal for j in jobs)
        except Exception:  # noqa: BLE001 - reconnecting
            return False

    wait_for(done, timeout=timeout, interval=0.25, what="every job to end")


# ------------------------------------------------------------------------------------------------ Redis


def test_redis_killed_and_restarted_loses_no_job_and_completes_none_twice(setup):
    infra, store, queue, workers = setup
    inputs = Inputs()
    inputs.write(store, CASES["train"])
    train = [queue.submit("train", {**inputs.spec(CASES["train"]), "steps": 120, "seed": i}, max_attempts=5)
             for i in range(2)]
    count = [queue.submit("count", {"steps": 4, "step_seconds": 0.5, "seed": str(i), "artifact_prefix": f"out/c{i}"},
                          max_attempts=5) for i in range(6)]
    jobs = train + count
    group = [workers.start("--types", "train,count", "--concurrency", "2", lease=LEASE) for _ in range(2)]

    def mid_flight():
        counts = queue.counts(["train", "count"])
        running = sum(counts[(t, "running")] for t in ("train", "count"))
        queued = sum(counts[(t, "queued")] for t in ("train", "count"))
        return running >= 2 and queued >= 2

    wait_for(mid_flight, timeout=120, interval=0.05, what="jobs both running and queued")
    run_id = queue.client.info("server")["run_id"]
    infra.kill("redis")
    time.sleep(LEASE + 1.0)  # down for longer than a lease: the running jobs' leases run out meanwhile
    infra.start("redis")
    assert queue.client.info("server")["run_id"] != run_id  # a new server process, its state from the AOF
    late = queue.submit("count", {"steps": 1, "artifact_prefix": "out/late"})  # the queue works again at once
    jobs.append(late)

    wait_all(queue, jobs, timeout=300)
    for job in jobs:
        done = queue.get(job.id)
        assert done.state is JobState.SUCCEEDED, (job.type, done.state, done.error)
        ends = completions(workers, job.id)
        assert len(ends) == 1, f"{job.type} job {job.id} completed {len(ends)} times"
        assert ends[0]["epoch"] == done.winner_epoch
        assert store.get_json(f"jobs/{job.id}/result.json")["epoch"] == done.winner_epoch
        prefixes = ([f"saes/{i}" for i in done.result["sae_ids"]] if job.type == "train"
                    else [job.spec["artifact_prefix"]])
        for prefix in prefixes:
            manifest = store.open_artifact(prefix, verify="sha256")
            assert manifest["extra"]["produced_by"] == {"job_id": job.id, "type": job.type,
                                                        "epoch": done.winner_epoch}
    assert len({tuple(queue.get(j.id).result["sae_ids"]) for j in train}) == 2
    # The outage reached the workers: running jobs' heartbeats (or idle slots' claims) failed and were retried.
    msgs = {r.get("msg") for w in group for r in w.records()}
    assert msgs & {"heartbeat failed; retrying", "Redis unreachable; retrying"}, msgs
    for w in group:
        w.signal(signal.SIGTERM)
        assert w.wait(timeout=30) == 0


# ------------------------------------------------------------------------------------------------ S3


class Reader(threading.Thread):
    """Polls the store as a reader would while jobs write: every artifact it finds committed must be whole
    (every listed file there with the size and sha256 of the manifest). Unavailability is fine; a partial artifact
    is not."""

    def __init__(self, store):
        super().__init__(daemon=True)
        self.store, self.stop, self.checked, self.broken = store, threading.Event(), set(), []

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                prefixes = {k.rsplit("/", 1)[0] for k in self.store.list("") if k.endswith("/_manifest.json")}
            except StorageError:
                continue
            for prefix in prefixes - self.checked:
                try:
                    self.store.open_artifact(prefix, verify="sha256")
                    self.checked.add(prefix)
                except IncompleteArtifact as exc:
                    self.broken.append(f"{prefix}: {exc}")
                except StorageError as exc:
                    if "failed after" not in str(exc):  # not just the server being away
                        self.broken.append(f"{prefix}: {exc}")


def test_s3_stopped_for_ten_seconds_during_recording_and_training(setup):
    infra, store, queue, workers = setup
    inputs = Inputs()
    inputs.write(store, CASES["train"])
    before = {k.rsplit("/", 1)[0] for k in store.list("") if k.endswith("/_manifest.json")}
    # Long enough that both still run when the later of the two has saved its first checkpoint, on a quiet machine.
    record = queue.submit("record", {**CASES["record"].spec, "max_images": 200, "views_per_image": 2}, max_attempts=5,
                          backoff_seconds=1)
    train = queue.submit("train", {**inputs.spec(CASES["train"]), "steps": 2000, "checkpoint_every": 100},
                         max_attempts=5, backoff_seconds=1)
    # One worker per type: a worker serving both reads one entry per stream and keeps the one it does not start
    # for its own next claim, so with two slots the second job would wait a lease for a takeover (docs/reliability.md).
    workers.start("--types", "record", lease=LEASE)
    workers.start("--types", "train", lease=LEASE)
    reader = Reader(store)
    reader.start()

    for job in (record, train):
        wait_for(lambda: store.list(f"jobs/{job.id}/checkpoints/"), timeout=180, interval=0.05,
                 what=f"the {job.type} job's first checkpoint")
    assert all(queue.get(j.id).state is JobState.RUNNING for j in (record, train)), "make the jobs longer"
    infra.stop("s3")
    time.sleep(10.0)
    assert all(queue.get(j.id).state is JobState.RUNNING for j in (record, train))  # waiting on the store
    infra.start("s3")

    wait_all(queue, [record, train], timeout=300)
    record, train = queue.get(record.id), queue.get(train.id)
    assert record.state is JobState.SUCCEEDED, record.error
    assert train.state is JobState.SUCCEEDED, train.error
    outputs = {f"activations/{record.result['acts_id']}", *(f"saes/{i}" for i in train.result["sae_ids"])}
    wait_for(lambda: outputs <= reader.checked or reader.broken, timeout=60, what="the reader to see the outputs")
    reader.stop.set()
    reader.join(timeout=30)
    committed = {k.rsplit("/", 1)[0] for k in store.list("") if k.endswith("/_manifest.json")}
    assert committed - before == outputs
    for prefix in outputs:
        store.open_artifact(prefix, verify="sha256")
    stray = [k for k in store.list("") if not k.startswith("jobs/")
             and not any(k.startswith(p + "/") for p in committed)]
    assert stray == []
    assert reader.broken == [] and outputs <= reader.checked
    retried = [r for w in workers.started for r in w.records()
               if r.get("logger") == "sae_shared.storage" and r.get("msg", "").startswith("retrying")]
    assert retried, "no store call was retried: the outage missed the jobs"

    from sae_shared.sae import load_sae
    from sae_shared.shards import ShardSet

    assert load_sae(f"saes/{train.result['sae_ids'][0]}", store=store).d_sae == CASES["train"].spec["d_sae"]
    assert ShardSet(store, record.result["acts_id"]).read_shard_full(0).shape[0] == 8  # 4 images x 2 views
