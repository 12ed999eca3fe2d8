"""The worker process: claims jobs, runs their handlers, keeps their leases, and stops cleanly.

One :class:`Worker` runs ``concurrency`` slots (threads), each claiming and running one job at a time as its own
stream consumer (``<worker id>/<slot>``). While a job runs, a heartbeat thread renews its lease every third of the
lease and relays cancel requests. The main thread handles signals and, every few seconds, finishes publications
that a dead worker left half-done and refreshes the queue-wide metrics.

SIGTERM (or SIGINT): slots stop claiming; a running handler sees :class:`~services.worker.context.Stopping` at its
next ``check_cancelled()`` (after checkpointing its last step), and the job is released to the queue without counting
an attempt; the process exits 0. A second signal exits at once (the job's lease then expires and another worker
takes it over).

Redis outages are ridden out: claims back off and retry; a running job keeps going while its lease may still be
valid, and is abandoned (never completed) once it cannot be (see ``JobContext.fenced``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from typing import Iterable

import redis

from sae_shared.jobs import InvalidSpec, validate_spec
from sae_shared.queue import JobState, Lease, LeaseLost, Queue, QueueError, default_worker_id
from sae_shared.storage import ObjectStore, StorageError
from sae_shared.telemetry import get_logger
from services.worker.context import Cancelled, JobContext, PermanentError, Stopping, publish
from services.worker.metrics import WorkerMetrics
from services.worker.registry import get_handler

log = get_logger(__name__)

TRANSIENT_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


class Heartbeat:
    """Renews one job's lease from a background thread until stopped or the lease is lost."""

    def __init__(self, ctx: JobContext, interval: float):
        self.ctx = ctx
        self.interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{ctx.job_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        ctx = self.ctx
        wait = self.interval
        while not self._done.wait(wait):
            try:
                ctx.fenced("heartbeat", lambda: ctx.queue.heartbeat(ctx.lease), renews=True, retry=False)
                wait = self.interval
            except LeaseLost:
                return
            except TRANSIENT_REDIS_ERRORS as exc:
                log.warning("heartbeat failed; retrying", extra={"job_id": ctx.job_id, "error": str(exc)[:200]})
                wait = min(self.interval, 0.25)


class Worker:
    """Runs handlers for ``types`` from ``queue``, writing artifacts to ``store``."""

    def __init__(
        self,
        queue: Queue,
        store: ObjectStore,
        types: Iterable[str],
        *,
        concurrency: int = 1,
        worker_id: str | None = None,
        max_jobs: int = 0,
        poll_seconds: float = 1.0,
        metrics: WorkerMetrics | None = None,
        metrics_interval: float = 5.0,
    ):
        self.queue = queue
        self.store = store
        self.types = list(types)
        self.handlers = {t: get_handler(t) for t in self.types}  # fail at start for a type without a handler
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self.max_jobs = max_jobs
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self.metrics_interval = metrics_interval
        self.stop_event = threading.Event()
        self._signals = 0
        self._jobs_started = 0
        self._count_lock = threading.Lock()
        self._running: dict[str, int] = {}

    # --- lifecycle ---

    def request_stop(self) -> None:
        """Finish the current steps, release running jobs, and return from :meth:`run`."""
        self.stop_event.set()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now; running jobs will be taken over when their leases expire")
            os._exit(1)
        log.info("stopping: finishing current steps", extra={"signal": signal.Signals(signum).name})
        self.request_stop()

    def run(self) -> int:
        """Serve until stopped (a signal, :meth:`request_stop`, or ``max_jobs`` attempts). Returns the exit code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        log.info(
            "worker started",
            extra={"worker_id": self.worker_id, "types": ",".join(self.types), "concurrency": self.concurrency,
                   "lease_s": self.queue.lease_seconds, "namespace": self.queue.namespace},
        )
        slots = [threading.Thread(target=self._slot, args=(i,), name=f"slot-{i}") for i in range(self.concurrency)]
        for t in slots:
            t.start()
        sweep_every = max(1.0, self.queue.lease_seconds)
        next_sweep = next_metrics = 0.0
        while any(t.is_alive() for t in slots):
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + sweep_every
                self._sweep_publications()
            if self.metrics is not None and now >= next_metrics:
                next_metrics = now + self.metrics_interval
                try:
                    self.metrics.refresh(self.queue, self.types)
                except TRANSIENT_REDIS_ERRORS:
                    pass
            for t in slots:
                t.join(timeout=0.2)
        for i in range(self.concurrency):
            try:
                self.queue.forget_consumer(self._consumer(i), self.types)
            except TRANSIENT_REDIS_ERRORS:
                pass
        log.info("worker stopped", extra={"worker_id": self.worker_id, "jobs": self._jobs_started})
        return 0

    def _consumer(self, slot: int) -> str:
        return f"{self.worker_id}/{slot}"

    def _take_job_slot(self) -> bool:
        """Count one more job against ``max_jobs``; False when the budget is spent."""
        with self._count_lock:
            if self.max_jobs and self._jobs_started >= self.max_jobs:
                return False
            self._jobs_started += 1
            return True

    def _slot(self, index: int) -> None:
        consumer = self._consumer(index)
        backoff = 0.1
        while not self.stop_event.is_set():
            if self.max_jobs and self._jobs_started >= self.max_jobs:
                break  # budget spent: stop claiming (other slots finish their jobs normally)
            try:
                lease = self.queue.claim(consumer, self.types, worker=self.worker_id, block_seconds=self.poll_seconds)
                backoff = 0.1
            except TRANSIENT_REDIS_ERRORS as exc:
                log.warning("Redis unreachable; retrying", extra={"error": str(exc)[:200], "retry_s": backoff})
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception:  # noqa: BLE001 - keep serving; a bug here must not silently kill the slot
                log.exception("claim failed; retrying", extra={"retry_s": backoff})
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if lease is None:
                continue
            if self.stop_event.is_set() or not self._take_job_slot():
                self._release_unstarted(lease)
                break
            try:
                self._run_job(lease)
            except Exception:  # noqa: BLE001 - recording the outcome failed; the lease expires and the job is retried
                log.exception("could not record the end of an attempt", extra={"job_id": lease.job_id})
        try:
            self.queue.unread(consumer)
        except TRANSIENT_REDIS_ERRORS:
            pass

    def _release_unstarted(self, lease: Lease) -> None:
        try:
            self.queue.release(lease)
        except (LeaseLost, *TRANSIENT_REDIS_ERRORS):
            pass  # its lease expires and another worker takes it

    # --- running one job ---

    def _run_job(self, lease: Lease) -> None:
        started = time.monotonic()
        fields = {"job_id": lease.job_id, "type": lease.type, "epoch": lease.epoch, "attempt": lease.attempt}
        log.info("job started" + (" (taken over)" if lease.reclaimed else ""), extra=fields)
        refused = self.metrics.refused if self.metrics else None
        try:
            spec = validate_spec(lease.type, lease.spec)
        except InvalidSpec as exc:
            spec, bad_spec = None, exc
        else:
            bad_spec = None
        ctx = JobContext(
            self.queue, self.store, lease, spec, stop_event=self.stop_event,
            on_refused=(lambda op, _reason: refused.inc(tags={"type": lease.type, "op": op})) if refused else None,
        )
        self._count_running(lease.type, +1)
        heartbeat = Heartbeat(ctx, interval=lease.lease_seconds / 3).start()
        outcome = "lease_lost"
        try:
            outcome = self._attempt(ctx, bad_spec, heartbeat)
        finally:
            heartbeat.stop()
            seconds = time.monotonic() - started
            self._count_running(lease.type, -1)
            if self.metrics:
                self.metrics.attempt_finished(lease.type, outcome, seconds)
                try:
                    self.metrics.refresh(self.queue, self.types)
                except TRANSIENT_REDIS_ERRORS:
                    pass
            log.info("attempt finished", extra={**fields, "outcome": outcome, "seconds": round(seconds, 3)})

    def _count_running(self, job_type: str, delta: int) -> None:
        with self._count_lock:
            n = self._running[job_type] = self._running.get(job_type, 0) + delta
        if self.metrics:
            self.metrics.running.set(n, tags={"type": job_type})

    def _attempt(self, ctx: JobContext, bad_spec: InvalidSpec | None, heartbeat: Heartbeat) -> str:
        """Run the handler and record how the attempt ended; returns the outcome name."""
        lease = ctx.lease
        try:
            if bad_spec is not None:
                raise PermanentError(f"the stored spec no longer validates: {bad_spec}")
            result = self.handlers[lease.type].fn(ctx)
            try:
                ctx.fenced("complete", lambda: self.queue.complete(lease, result))
            except LeaseLost:
                if not self._completion_accepted(lease):
                    raise
            log.info("job completed", extra={"job_id": lease.job_id, "epoch": lease.epoch, "attempt": lease.attempt})
            heartbeat.stop()
            self._publish(lease.job_id)
            return "succeeded"
        except Stopping:
            return self._finish(ctx, "release", lambda: self.queue.release(lease), "released")
        except Cancelled:
            return self._finish(ctx, "cancel", lambda: self.queue.mark_cancelled(lease), "cancelled")
        except LeaseLost as exc:
            log.warning("lease lost; abandoning the job", extra={"job_id": lease.job_id, "epoch": lease.epoch,
                                                                  "reason": str(exc)[:300]})
            return "lease_lost"
        except PermanentError as exc:
            return self._failed(ctx, f"{type(exc).__name__}: {exc}", retryable=False)
        except Exception as exc:  # noqa: BLE001 - any handler error is a failed attempt
            tb = traceback.format_exc(limit=8)
            log.error("job attempt failed", extra={"job_id": lease.job_id, "epoch": lease.epoch, "error": str(exc)[:500]})
            return self._failed(ctx, f"{type(exc).__name__}: {exc}\n{tb[-3000:]}", retryable=True)

    def _completion_accepted(self, lease: Lease) -> bool:
        """Whether this attempt's completion was accepted after all: a ``complete`` whose reply was lost (Redis
        died mid-call) and whose retries ran past the lease. Asks Redis for the winning epoch for a few seconds."""
        for delay in (0.0, 0.25, 0.5, 1.0, 2.0):
            time.sleep(delay)
            try:
                return self.queue.get(lease.job_id).winner_epoch == lease.epoch
            except TRANSIENT_REDIS_ERRORS:
                continue
            except QueueError:
                return False
        return False

    def _finish(self, ctx: JobContext, op: str, call, outcome: str) -> str:
        try:
            state = ctx.fenced(op, call)
        except LeaseLost:
            return "lease_lost"
        return "cancelled" if state == JobState.CANCELLED else outcome

    def _failed(self, ctx: JobContext, error: str, *, retryable: bool) -> str:
        try:
            state, delay = ctx.fenced("fail", lambda: self.queue.fail(ctx.lease, error, retryable=retryable))
        except LeaseLost:
            return "lease_lost"
        if state == JobState.QUEUED:
            log.info("job will be retried", extra={"job_id": ctx.job_id, "attempt": ctx.attempt, "delay_s": delay})
            return "retried"
        if state == JobState.DEAD:
            log.error("job is dead: no attempts left", extra={"job_id": ctx.job_id, "attempts": ctx.attempt})
        return state.value

    # --- publication ---

    def _publish(self, job_id: str) -> None:
        """Publish a completed job; on failure leave it to a later sweep (by this or any worker)."""
        try:
            publish(self.queue, self.store, job_id)
        except (StorageError, *TRANSIENT_REDIS_ERRORS) as exc:
            log.warning("publication failed; a sweep will retry it", extra={"job_id": job_id, "error": str(exc)[:300]})

    def _sweep_publications(self) -> None:
        """Finish publications of completed jobs that have waited longer than two leases (their worker died)."""
        try:
            stuck = self.queue.publishing(older_than_seconds=2 * self.queue.lease_seconds)
        except TRANSIENT_REDIS_ERRORS:
            return
        for job_id in stuck:
            log.info("finishing a publication another worker left", extra={"job_id": job_id})
            self._publish(job_id)
