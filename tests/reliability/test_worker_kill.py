"""A worker SIGKILLed in the middle of a job, for each job type that does real work: the job is taken over by another
worker when its lease runs out, completes once, and publishes what an undisturbed run of the same spec publishes;
no partial or duplicate artifact is ever visible.

Real processes on loopback: worker processes (``python -m services.worker``) on the session's Redis and S3 server.
The undisturbed run is the same spec on the same input bytes in a second bucket, run by a reference worker of its
own (one for the module) while the disturbed one runs. The per-type tests with deeper checks of resuming are in
tests/test_train_job.py, tests/test_analyze_job.py and tests/test_experiment_job.py; this one holds every type to
the same contract.
"""

from __future__ import annotations

import secrets
import signal
from types import SimpleNamespace

import pytest

from sae_shared.queue import JobState, Queue, connect
from tests.reliability.conftest import drop_namespace, make_bucket, open_bucket
from tests.reliability.jobs_support import CASES, Inputs, artifact_contents, strip_volatile
from tests.workers_support import Workers, wait_for, worker_env

LEASE = 5.0
"""Seconds: a killed worker's job is taken over about this long after the kill. Shorter leases are taken over
spuriously on a loaded machine (a starved heartbeat): harmless (fenced), but each costs an attempt."""
MAX_ATTEMPTS = 6
JOB_TIMEOUT = 240.0


def _env(settings, bucket: str) -> dict[str, str]:
    # One compute thread: the same sums in the same order in every worker, so results compare bit for bit.
    return {**worker_env(settings, bucket), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs() -> Inputs:
    return Inputs()


@pytest.fixture(scope="module")
def reference(settings, tmp_path_factory):
    """The undisturbed runs: a bucket, a namespace and one worker serving every type, for the module."""
    bucket = make_bucket(settings)
    queue = Queue(connect(settings.redis_url), "ref" + secrets.token_hex(4), lease_seconds=30.0)
    group = Workers(_env(settings, bucket), tmp_path_factory.mktemp("reference"), queue.namespace)
    worker = group.start("--types", ",".join(CASES), lease=30.0)
    yield SimpleNamespace(store=open_bucket(settings, bucket), queue=queue, worker=worker)
    group.close()
    drop_namespace(queue)


@pytest.fixture
def store(settings, bucket):
    return open_bucket(settings, bucket)


@pytest.fixture
def queue(settings, namespace):
    q = Queue(connect(settings.redis_url), namespace, lease_seconds=LEASE)
    yield q
    drop_namespace(q)


@pytest.fixture
def workers(settings, bucket, tmp_path, namespace):
    group = Workers(_env(settings, bucket), tmp_path, namespace)
    yield group
    group.close()


def committed(store) -> set[str]:
    """Prefixes of the committed artifacts in ``store``."""
    return {k.rsplit("/", 1)[0] for k in store.list("") if k.endswith("/_manifest.json")}


@pytest.mark.parametrize("job_type", list(CASES))
def test_sigkilled_worker_job_completes_once_elsewhere_as_if_undisturbed(
    job_type, inputs, reference, store, queue, workers
):
    case = CASES[job_type]
    inputs.write(store, case)
    inputs.write(reference.store, case)
    spec = inputs.spec(case)
    before = committed(store)
    undisturbed = reference.queue.submit(job_type, spec)
    job = queue.submit(job_type, spec, max_attempts=MAX_ATTEMPTS)

    # Two workers start together; whichever holds the job once it has saved a checkpoint is killed.
    pair = [workers.start("--types", job_type, lease=LEASE) for _ in range(2)]
    wait_for(lambda: store.list(f"jobs/{job.id}/checkpoints/"), timeout=JOB_TIMEOUT, interval=0.02,
             what="a first checkpoint")
    at_kill = queue.get(job.id)
    assert at_kill.state is JobState.RUNNING, f"{at_kill.state} at the kill: make the {job_type} job longer"
    holder = wait_for(lambda: next((w for w in pair if w.messages("worker started", worker_id=at_kill.worker)), None),
                      what="the worker holding the job")
    holder.signal(signal.SIGKILL)
    holder.wait()
    assert queue.get(job.id).state is JobState.RUNNING, "the job ended at the kill: make it longer"
    assert committed(store) == before  # nothing of the job is visible yet

    done = queue.wait(job.id, timeout=JOB_TIMEOUT)
    other = pair[1 - pair.index(holder)]
    assert done.state is JobState.SUCCEEDED, (done.error, other.output()[-3000:])
    assert done.lost_leases >= 1 and done.attempts >= 2 and done.winner_epoch > at_kill.epoch
    # Completed once, by the surviving worker, with the winning epoch.
    assert not holder.messages("job completed", job_id=job.id)
    (completion,) = other.messages("job completed", job_id=job.id)
    assert completion["epoch"] == done.winner_epoch

    ref = reference.queue.wait(undisturbed.id, timeout=JOB_TIMEOUT)
    assert ref.state is JobState.SUCCEEDED and ref.lost_leases == 0, (ref.error, reference.worker.output()[-3000:])
    assert strip_volatile(done.result) == strip_volatile(ref.result)

    outputs = case.outputs(done.result)
    assert outputs == case.outputs(ref.result) or job_type == "experiment"  # an experiment's output names its job
    for mine, theirs in zip(outputs, case.outputs(ref.result)):
        got = artifact_contents(store, mine, case)
        want = artifact_contents(reference.store, theirs, case)
        assert sorted(got) == sorted(want), mine
        for name in want:
            assert got[name] == want[name], f"{mine}/{name}"
        produced_by = store.read_manifest(mine)["extra"]["produced_by"] if job_type != "record" else None
        if produced_by is not None:
            assert produced_by == {"job_id": job.id, "type": job_type, "epoch": done.winner_epoch}

    # Exactly the outputs became visible; nothing else outside the job's folder, whose staging and checkpoints go.
    assert committed(store) - before == set(outputs)
    stray = [k for k in store.list("") if not k.startswith("jobs/")
             and not any(k.startswith(p + "/") for p in committed(store))]
    assert stray == []
    wait_for(lambda: store.list(f"jobs/{job.id}/") == [f"jobs/{job.id}/result.json"], timeout=10,
             what="staging and checkpoints removed")
    assert store.get_json(f"jobs/{job.id}/result.json")["epoch"] == done.winner_epoch
