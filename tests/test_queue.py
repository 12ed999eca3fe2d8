"""The job queue on a real Redis: submit, claim, leases and fencing, retries, cancel, list and watch.

Each test uses its own namespace on the shared server. Workers are simulated here by calling the queue directly
(several "consumers" in one process); tests/test_worker.py runs real worker processes.
"""

from __future__ import annotations

import json

import secrets
import threading
import time

import pytest

from sae_shared.jobs import InvalidSpec
from sae_shared.queue import IdempotencyConflict, JobNotFound, JobState, LeaseLost, Queue, connect
from workers_support import store, wait_for  # noqa: F401 - store: a fixture

LEASE = 1.0


@pytest.fixture
def queue(settings) -> Queue:
    q = Queue(connect(settings.redis_url), "t" + secrets.token_hex(4), lease_seconds=LEASE, reclaim_interval=0.0)
    yield q
    keys = list(q.client.scan_iter(f"{q.namespace}:*", count=1000))
    if keys:
        q.client.delete(*keys)




def _claim(queue: Queue, consumer: str = "c1", block: float = 0.05, types=("count",)):
    return queue.claim(consumer, list(types), block_seconds=block)


# ------------------------------------------------------------------------------------------- submit and claim


def test_submit_claim_complete_roundtrip(queue):
    job = queue.submit("count", {"steps": 3})
    assert job.state is JobState.QUEUED and job.attempts == 0 and job.spec["steps"] == 3
    assert job.spec["step_seconds"] == 0.0  # defaults are filled in at submit

    lease = _claim(queue)
    assert lease.job_id == job.id and lease.epoch == 1 and lease.attempt == 1 and not lease.reclaimed
    running = queue.get(job.id)
    assert running.state is JobState.RUNNING and running.worker == "c1"
    assert _claim(queue, "c2") is None  # nobody else gets it

    queue.progress(lease, 0.5, "half way", {"loss": 0.25})
    assert queue.get(job.id).progress.metrics == {"loss": 0.25}
    assert queue.complete(lease, {"answer": 42}) is JobState.PUBLISHING
    assert queue.complete(lease, {"answer": 42}) is JobState.PUBLISHING  # a retried call is accepted again
    assert queue.mark_published(job.id) is JobState.SUCCEEDED
    done = queue.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.result == {"answer": 42}
    assert done.result_key == f"jobs/{job.id}/result.json" and done.winner_epoch == 1
    assert done.finished_at >= done.started_at >= done.created_at
    # The stream entry is gone: nothing left to claim or reclaim.
    assert queue.client.xlen(queue.stream_key("count")) == 0


def test_idempotent_submit_returns_the_same_job(queue):
    first = queue.submit("count", {"steps": 2}, idempotency_key="nightly-1")
    again = queue.submit("count", {"steps": 2, "type": "count"}, idempotency_key="nightly-1")
    assert again.id == first.id
    assert queue.client.xlen(queue.stream_key("count")) == 1
    with pytest.raises(IdempotencyConflict, match="different spec"):
        queue.submit("count", {"steps": 3}, idempotency_key="nightly-1")
    # A job stored before a field with a default existed (as an older version wrote it) is still the same job.
    stored = json.loads(queue.client.hget(queue._key("job", first.id), "spec"))
    del stored["ignore_lease_loss"]
    queue.client.hset(queue._key("job", first.id), "spec", json.dumps(stored))
    assert queue.submit("count", {"steps": 2}, idempotency_key="nightly-1").id == first.id
    # The job is claimed once, however often it was submitted.
    assert _claim(queue).job_id == first.id
    assert _claim(queue) is None
    # Even after it finished, the key still names it.
    assert queue.submit("count", {"steps": 2}, idempotency_key="nightly-1").id == first.id
    assert queue.submit("count", {"steps": 2}, idempotency_key="nightly-2").id != first.id


@pytest.mark.parametrize(
    "job_type, spec, expected",
    [
        ("count", {"stpes": 3}, "stpes: unknown field (allowed: steps"),
        ("count", {"steps": 0}, "steps: Input should be greater than 0"),
        ("count", '{"steps": ', "not valid JSON"),
        ("count", [1, 2], "must be a JSON object"),
        ("train", {"acts_id": "a", "layer": 3, "d_sae": -8}, "d_sae: Input should be greater than 0"),
        ("train", {"acts_id": "a", "layer": 3, "d_sae": 8}, "steps: Field required"),
        ("record", {"dataset": "my data", "backbone": "b", "layers": [1]}, "dataset: must be an id"),
        ("record", {"dataset": "d", "backbone": "b", "layers": [1, 1]}, "layers must be distinct"),
        ("experiment", {"sae_id": "s", "head_id": "h", "dataset": "d", "edits": []}, "edits: List should have"),
        ("train-head", {"acts_id": "a", "task": "detect", "num_classes": 3}, "task: Input should be 'classify'"),
        ("analyze", {"sae_id": "s", "acts_id": "a", "type": "train"}, "spec says type 'train'"),
        ("segment", {}, "unknown job type 'segment'"),
    ],
)
def test_invalid_specs_are_refused_at_submit(queue, job_type, spec, expected):
    with pytest.raises(InvalidSpec) as info:
        queue.submit(job_type, spec)
    assert expected in str(info.value)
    assert not list(queue.client.scan_iter(f"{queue.namespace}:*"))  # nothing was written


def test_every_batch_type_accepts_a_valid_minimal_spec(queue):
    specs = {
        "record": {"dataset": "imagenette", "backbone": "dinov2:vit_small_patch14_reg4_dinov2.lvd142m", "layers": [11]},
        "train": {"acts_id": "a1", "layer": 11, "d_sae": 4096, "steps": 100},
        "analyze": {"sae_id": "s1", "acts_id": "a1"},
        "train-head": {"acts_id": "a1", "task": "classify", "num_classes": 10},
        "experiment": {"sae_id": "s1", "head_id": "h1", "dataset": "d", "edits": [{"latent": 3, "op": "scale", "value": 0}]},
    }
    for job_type, spec in specs.items():
        assert queue.submit(job_type, spec).type == job_type
    counts = queue.counts()
    assert all(counts[(t, "queued")] == 1 for t in specs)


# --------------------------------------------------------------------------------------------- leases, fencing


def test_expired_lease_is_reclaimed_and_the_stale_holder_is_fenced(queue):
    job = queue.submit("count", {})
    stale = _claim(queue, "a")
    assert _claim(queue, "b") is None  # leased
    time.sleep(LEASE + 0.1)  # "a" stalls: no heartbeat for a whole lease
    fresh = _claim(queue, "b")
    assert fresh.job_id == job.id and fresh.epoch == 2 and fresh.attempt == 2 and fresh.reclaimed
    assert queue.get(job.id).lost_leases == 1

    # Every fenced call of the stale holder is refused, and changes nothing.
    for call in (
        lambda: queue.heartbeat(stale),
        lambda: queue.check_lease(stale),
        lambda: queue.progress(stale, 0.9, "stale"),
        lambda: queue.stage_artifact(stale, "out/x", {"staged": "s", "files": {}, "extra": {}, "overwrite": False}),
        lambda: queue.complete(stale, {"by": "stale"}),
        lambda: queue.fail(stale, "stale error"),
        lambda: queue.release(stale),
        lambda: queue.mark_cancelled(stale),
    ):
        with pytest.raises(LeaseLost, match="superseded by epoch 2"):
            call()
    assert queue.staged_artifacts(job.id, 1) == {}
    current = queue.get(job.id)
    assert current.state is JobState.RUNNING and current.epoch == 2 and current.progress.message == ""

    queue.complete(fresh, {"by": "fresh"})
    with pytest.raises(LeaseLost, match="epoch 1 was superseded"):
        queue.complete(stale, {"by": "stale"})
    assert queue.get(job.id).result == {"by": "fresh"}


def test_heartbeats_keep_the_lease(queue):
    queue.submit("count", {})
    lease = _claim(queue, "a")
    for _ in range(6):  # 1.5 leases in all
        time.sleep(LEASE / 4)
        assert queue.heartbeat(lease) is JobState.RUNNING
        assert _claim(queue, "b", block=0.01) is None
    queue.check_lease(lease)


def test_entry_read_by_a_consumer_that_died_before_starting_it_is_taken_over(queue):
    job = queue.submit("count", {})
    # A worker reads the entry and dies before its claim script runs.
    queue.client.xreadgroup("workers", "dead-consumer", {queue.stream_key("count"): ">"}, count=1)
    assert _claim(queue, "b") is None
    time.sleep(LEASE + 0.1)
    lease = _claim(queue, "b")
    assert lease.job_id == job.id and lease.epoch == 1 and lease.attempt == 1


def test_lost_leases_count_as_attempts_until_the_job_is_dead(queue):
    job = queue.submit("count", {}, max_attempts=2)
    assert _claim(queue, "a").attempt == 1
    time.sleep(LEASE + 0.1)
    assert _claim(queue, "b").attempt == 2
    time.sleep(LEASE + 0.1)
    assert _claim(queue, "c") is None  # the second holder died too: no attempts left
    dead = queue.get(job.id)
    assert dead.state is JobState.DEAD and "lease lost on attempt 2 of 2" in dead.error
    assert queue.dead_letters() == [job.id]


def test_release_hands_the_job_back_without_counting_an_attempt(queue):
    job = queue.submit("count", {})
    lease = _claim(queue, "a")
    assert queue.release(lease) is JobState.QUEUED
    assert queue.get(job.id).attempts == 0
    again = _claim(queue, "b")
    assert again.job_id == job.id and again.attempt == 1 and again.epoch == 2


def test_each_job_is_claimed_once_by_concurrent_consumers(queue):
    ids = {queue.submit("count", {"seed": str(i)}).id for i in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def consume(name: str) -> None:
        while True:
            lease = queue.claim(name, ["count"], block_seconds=0.2)
            if lease is None:
                return
            with lock:
                claimed.append(lease.job_id)
            queue.complete(lease, None)

    threads = [threading.Thread(target=consume, args=(f"c{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


# ------------------------------------------------------------------------------------------ retries, cancel


TRAIN = {"acts_id": "a", "layer": 0, "d_sae": 8, "steps": 1}


def test_a_claim_over_several_types_takes_one_job_and_leaves_the_others_to_any_slot(queue):
    """Jobs of two types waiting: one slot's claim takes one, and another slot gets the other at once (not after a
    lease, as when one read took an entry of each type for the first slot)."""
    jobs = {queue.submit("count", {}).id, queue.submit("train", TRAIN).id}
    first = _claim(queue, "slot-1", types=("count", "train"))
    second = _claim(queue, "slot-2", types=("count", "train"))
    assert first is not None and second is not None
    assert {first.job_id, second.job_id} == jobs


def test_a_slot_serving_several_types_alternates_between_them(queue):
    counts = [queue.submit("count", {"seed": str(i)}).id for i in range(3)]
    trains = [queue.submit("train", {**TRAIN, "seed": i}).id for i in range(3)]
    order = []
    for _ in range(6):
        lease = _claim(queue, "slot", types=("count", "train"))
        order.append(lease.job_id)
        queue.complete(lease, {})
    kinds = ["count" if j in counts else "train" for j in order]
    assert kinds in (["count", "train"] * 3, ["train", "count"] * 3)
    assert [j for j in order if j in counts] == counts and [j for j in order if j in trains] == trains  # FIFO


def test_failed_attempts_are_retried_with_backoff_then_dead_lettered(queue):
    job = queue.submit("count", {}, max_attempts=3, backoff_seconds=0.2, max_backoff_seconds=0.3)
    delays = []
    for attempt in (1, 2):
        lease = wait_for(lambda: _claim(queue, block=0.2), what=f"attempt {attempt}")
        assert lease.attempt == attempt
        state, delay = queue.fail(lease, f"boom {attempt}")
        assert state is JobState.QUEUED
        delays.append(delay)
        waiting = queue.get(job.id)
        assert waiting.retries == attempt and waiting.error == f"boom {attempt}" and waiting.not_before is not None
        assert _claim(queue, block=0.0) is None  # not before the backoff has passed
    # backoff = base * 2**(attempt-1), capped, times a jitter factor in [0.5, 1]
    assert 0.1 <= delays[0] <= 0.2 and 0.15 <= delays[1] <= 0.3
    lease = wait_for(lambda: _claim(queue, block=0.2), what="attempt 3")
    assert lease.attempt == 3
    assert queue.fail(lease, "boom 3") == (JobState.DEAD, 0.0)
    dead = queue.get(job.id)
    assert dead.state is JobState.DEAD and dead.error == "boom 3" and dead.attempts == 3
    assert queue.dead_letters() == [job.id]
    assert [j.id for j in queue.list(["dead"])[0]] == [job.id]

    # An operator can requeue it with fresh attempts.
    assert queue.requeue(job.id).state is JobState.QUEUED
    assert queue.dead_letters() == []
    assert _claim(queue).attempt == 1


def test_permanent_failure_is_not_retried(queue):
    job = queue.submit("count", {}, max_attempts=5)
    lease = _claim(queue)
    assert queue.fail(lease, "bad input", retryable=False) == (JobState.FAILED, 0.0)
    assert queue.get(job.id).state is JobState.FAILED
    assert _claim(queue) is None


def test_cancel_a_queued_job_it_is_never_claimed(queue):
    job = queue.submit("count", {})
    assert queue.cancel(job.id, "not needed").state is JobState.CANCELLED
    assert _claim(queue) is None
    assert queue.client.xlen(queue.stream_key("count")) == 0  # the claim dropped its entry
    assert queue.get(job.id).error == "not needed"
    with pytest.raises(JobNotFound):
        queue.cancel("nope")


def test_cancel_a_running_job_the_holder_sees_it(queue):
    job = queue.submit("count", {})
    lease = _claim(queue)
    assert queue.cancel(job.id).state is JobState.CANCELLING
    assert queue.heartbeat(lease) is JobState.CANCELLING
    assert queue.progress(lease, 0.5) is JobState.CANCELLING
    assert queue.mark_cancelled(lease) is JobState.CANCELLED
    assert queue.get(job.id).state is JobState.CANCELLED
    assert queue.cancel(job.id).state is JobState.CANCELLED  # finished jobs stay as they are


def test_a_cancelling_job_whose_worker_died_ends_cancelled(queue):
    job = queue.submit("count", {})
    _claim(queue, "a")
    queue.cancel(job.id)
    time.sleep(LEASE + 0.1)
    assert _claim(queue, "b") is None
    assert queue.get(job.id).state is JobState.CANCELLED


# --------------------------------------------------------------------------------------------- list, watch


def test_list_filters_by_state_and_type_newest_first_with_pages(queue):
    counts = [queue.submit("count", {"seed": str(i)}) for i in range(7)]
    trains = [queue.submit("train", {"acts_id": "a", "layer": 1, "d_sae": 8, "steps": 1}) for _ in range(2)]
    lease = _claim(queue)
    jobs, token = queue.list(limit=100)
    assert token is None and len(jobs) == 9
    assert [j.created_at for j in jobs] == sorted((j.created_at for j in jobs), reverse=True)
    assert {j.id for j in queue.list(types=["train"])[0]} == {j.id for j in trains}
    assert [j.id for j in queue.list(states=["running"])[0]] == [lease.job_id]
    assert len(queue.list(states=["queued"], types=["count"])[0]) == 6
    seen, token = [], None
    while True:
        page, token = queue.list(limit=2, before=token)
        seen += [j.id for j in page]
        if token is None:
            break
    assert sorted(seen) == sorted(j.id for j in counts + trains)
    assert len(seen) == len(set(seen))


def test_watch_yields_every_change_until_the_job_ends(queue):
    job = queue.submit("count", {})

    def work() -> None:
        lease = wait_for(lambda: _claim(queue, "w", block=0.2))
        for i in range(3):
            time.sleep(0.1)
            queue.progress(lease, (i + 1) / 3, f"step {i + 1}", {"step": i + 1})
        queue.complete(lease, {"ok": True})
        queue.mark_published(job.id)

    updates = queue.watch(job.id, poll_seconds=5.0, timeout=10)  # pub/sub wakes the watcher, not polling
    seen = [next(updates)]
    t = threading.Thread(target=work)
    t.start()
    seen += list(updates)
    t.join()
    states = [j.state.value for j in seen]
    assert states[0] == "queued" and states[-1] == "succeeded" and "running" in states
    order = ["queued", "running", "publishing", "succeeded"]
    assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)
    messages = [j.progress.message for j in seen if j.state is JobState.RUNNING and j.progress.message]
    assert messages == sorted(messages)  # snapshots may coalesce, never go back
    assert seen[-1].result == {"ok": True} and seen[-1].progress.message == "step 3"
    versions = [j.version for j in seen]
    assert versions == sorted(set(versions))


def test_watch_times_out_on_a_job_that_does_not_finish(queue):
    job = queue.submit("count", {})
    with pytest.raises(TimeoutError, match="still queued"):
        list(queue.watch(job.id, poll_seconds=0.05, timeout=0.3))


# ----------------------------------------------------------------------------------- fenced artifact publication


def _context(queue, store, lease):
    from sae_shared.jobs import validate_spec
    from services.worker.context import JobContext

    return JobContext(queue, store, lease, validate_spec(lease.type, lease.spec))


def test_only_the_winning_attempt_artifacts_become_visible(queue, store):
    """Attempt 1 stages an artifact and records it (its fence check passed), then stalls past its lease: the race
    that a check-then-write commit would lose. Attempt 2 wins; only its artifact is ever published."""
    from services.worker.context import publish

    job = queue.submit("count", {})
    ctx1 = _context(queue, store, _claim(queue, "a"))
    w1 = ctx1.artifact("results/demo")
    w1.put_json("values.json", {"by": 1})
    w1.commit({"by": 1})
    assert not store.is_complete("results/demo")  # staged, not visible
    time.sleep(LEASE + 0.1)

    ctx2 = _context(queue, store, _claim(queue, "b"))
    assert ctx2.epoch == 2
    w2 = ctx2.artifact("results/demo")
    w2.put_json("values.json", {"by": 2})
    w2.commit({"by": 2})
    queue.complete(ctx2.lease, {"by": 2})

    # The stale attempt wakes up: its writes, commit, progress and completion are all refused.
    w1b = ctx1.artifact("results/other")
    with pytest.raises(LeaseLost, match="artifact write refused"):
        w1b.put_json("values.json", {"by": 1})
    with pytest.raises(LeaseLost, match="artifact commit refused"):
        w1b.commit()
    with pytest.raises(LeaseLost):
        ctx1.progress(1.0, "stale")
    with pytest.raises(LeaseLost):
        queue.complete(ctx1.lease, {"by": 1})
    assert not store.is_complete("results/demo")  # nothing visible before publication

    done = publish(queue, store, job.id)
    assert done.state is JobState.SUCCEEDED
    manifest = store.read_manifest("results/demo")
    assert manifest["extra"] == {"by": 2, "produced_by": {"job_id": job.id, "type": "count", "epoch": 2}}
    assert store.get_json("results/demo/values.json") == {"by": 2}
    assert store.list("results/") == ["results/demo/_manifest.json", "results/demo/values.json"]
    result = store.get_json(done.result_key)
    assert result["result"] == {"by": 2} and result["epoch"] == 2 and result["artifacts"] == ["results/demo"]
    # Staging and checkpoints are cleaned up; publishing again changes nothing.
    # (SeaweedFS may list deleted keys for a moment after a batch delete.)
    wait_for(lambda: store.list(f"jobs/{job.id}/") == [f"jobs/{job.id}/result.json"], timeout=5, what="cleanup")
    assert publish(queue, store, job.id).state is JobState.SUCCEEDED
    assert store.read_manifest("results/demo")["committed_at"] == manifest["committed_at"]


def test_checkpoints_are_fenced_and_survive_a_takeover(queue, store):
    queue.submit("count", {})
    ctx1 = _context(queue, store, _claim(queue, "a"))
    ctx1.checkpoint_put("state.json", {"next": 3})
    ctx1.checkpoint_put("blob.bin", b"\x00\x01")
    time.sleep(LEASE + 0.1)
    ctx2 = _context(queue, store, _claim(queue, "b"))
    assert ctx2.checkpoint_get("state.json") == {"next": 3}
    assert ctx2.checkpoint_get("blob.bin") == b"\x00\x01"
    assert ctx2.checkpoint_get("missing.json", {"next": 0}) == {"next": 0}
    with pytest.raises(LeaseLost):
        ctx1.checkpoint_put("state.json", {"next": 1})
    assert ctx2.checkpoint_get("state.json") == {"next": 3}
