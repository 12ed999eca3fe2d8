"""Prometheus metrics of a worker process (exported with ``saevctl worker --metrics-port``).

Per worker: jobs run by type and outcome, their durations, jobs running now, retries, dead letters and refused
fenced calls. Queue-wide (read from Redis every few seconds by each worker, so any one worker's scrape shows them):
jobs by type and state, queue depth and dead letters by type.
"""

from __future__ import annotations

from typing import Iterable

from sae_shared.queue import JobState, Queue
from sae_shared.telemetry import counter, gauge, histogram

OUTCOMES = ("succeeded", "retried", "failed", "dead", "cancelled", "released", "lease_lost")
"""How one attempt ended, from this worker's point of view."""


class WorkerMetrics:
    """The instruments (process-wide singletons: creating this twice returns the same ones)."""

    def __init__(self) -> None:
        self.jobs = counter("saev_worker_jobs_total", "Attempts this worker finished, by job type and outcome.",
                            ("type", "outcome"))
        self.duration = histogram("saev_worker_job_duration_seconds", "Duration of an attempt, by type and outcome.",
                                  ("type", "outcome"))
        self.running = gauge("saev_worker_jobs_running", "Jobs this worker is running now.", ("type",))
        self.retries = counter("saev_worker_job_retries_total", "Failed attempts re-queued for a retry.", ("type",))
        self.dead = counter("saev_worker_dead_letters_total", "Jobs this worker moved to the dead-letter state.",
                            ("type",))
        self.refused = counter("saev_worker_fence_refusals_total",
                               "Fenced calls refused because this worker no longer held the job's lease.",
                               ("type", "op"))
        self.jobs_by_state = gauge("saev_jobs", "Jobs in the queue by type and state.", ("type", "state"))
        self.depth = gauge("saev_queue_depth", "Queued jobs (including retries waiting for their backoff).", ("type",))
        self.dead_letters = gauge("saev_queue_dead_letters", "Jobs in the dead-letter state.", ("type",))

    def attempt_finished(self, job_type: str, outcome: str, seconds: float) -> None:
        self.jobs.inc(tags={"type": job_type, "outcome": outcome})
        self.duration.observe(seconds, tags={"type": job_type, "outcome": outcome})
        if outcome == "retried":
            self.retries.inc(tags={"type": job_type})
        elif outcome == "dead":
            self.dead.inc(tags={"type": job_type})

    def refresh(self, queue: Queue, types: Iterable[str]) -> None:
        """Read the queue-wide gauges from Redis."""
        for (job_type, state), n in queue.counts(types).items():
            self.jobs_by_state.set(n, tags={"type": job_type, "state": state})
            if state == JobState.QUEUED.value:
                self.depth.set(n, tags={"type": job_type})
            elif state == JobState.DEAD.value:
                self.dead_letters.set(n, tags={"type": job_type})
