"""``saev.v1.Jobs`` over the Redis job queue (``sae_shared.queue``): submit, get, list, cancel and watch.

The queue's client is synchronous; every call runs in a worker thread. Watching polls the job (a cheap HGETALL)
and yields on every version change, so a client that goes away simply stops the loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from sae_shared.proto.saev.v1 import common_pb2 as pb
from sae_shared.proto.saev.v1 import jobs_pb2 as jpb
from services.common.errors import InvalidArgument, Unavailable

TYPES = {jpb.JOB_TYPE_RECORD: "record", jpb.JOB_TYPE_TRAIN: "train", jpb.JOB_TYPE_ANALYZE: "analyze",
         jpb.JOB_TYPE_TRAIN_HEAD: "train-head", jpb.JOB_TYPE_EXPERIMENT: "experiment"}
TYPE_ENUMS = {name: enum for enum, name in TYPES.items()}
STATES = {"queued": jpb.JOB_STATE_QUEUED, "running": jpb.JOB_STATE_RUNNING, "publishing": jpb.JOB_STATE_RUNNING,
          "succeeded": jpb.JOB_STATE_SUCCEEDED, "failed": jpb.JOB_STATE_FAILED, "dead": jpb.JOB_STATE_FAILED,
          "cancelled": jpb.JOB_STATE_CANCELLED, "cancelling": jpb.JOB_STATE_CANCELLING}
"""Queue state -> proto state (publishing is the tail of running; a dead job failed for good)."""
QUEUE_STATES: dict[int, list[str]] = {}
for _name, _enum in STATES.items():
    QUEUE_STATES.setdefault(_enum, []).append(_name)
DEFAULT_PAGE, MAX_PAGE = 50, 500
WATCH_POLL_S = 0.5


def job_to_proto(job) -> jpb.Job:
    """A queue ``Job`` -> ``saev.v1.Job``."""
    metrics = job.progress.metrics or {}
    done, total = int(metrics.get("done", 0) or 0), int(metrics.get("total", 0) or 0)
    if total <= 0 and job.progress.fraction > 0:  # only a fraction was reported: express it in basis points
        done, total = int(round(job.progress.fraction * 10_000)), 10_000
    out = jpb.Job(
        job_id=job.id, type=TYPE_ENUMS.get(job.type, jpb.JOB_TYPE_UNSPECIFIED), state=STATES[job.state.value],
        spec_json=json.dumps(job.spec, sort_keys=True),
        progress=jpb.JobProgress(done=done, total=total, stage=str(metrics.get("stage", "")),
                                 message=job.progress.message),
        created_at=job.created_at, updated_at=job.updated_at, attempts=job.attempts, worker_id=job.worker or "")
    if job.state.value == "succeeded":
        out.result_prefix = f"jobs/{job.id}/"
    if job.error and job.state.value in ("failed", "dead", "cancelled", "queued", "running"):
        code = {"cancelled": "CANCELLED"}.get(job.state.value, "FAILED")
        out.error.CopyFrom(pb.ErrorDetail(code=code, message=job.error))
    return out


class JobsFacade:
    """The Jobs RPCs on a lazily opened :class:`sae_shared.queue.Queue`."""

    def __init__(self, settings, namespace: str):
        self.settings, self.namespace = settings, namespace
        self._queue = None

    def queue(self):
        if self._queue is None:
            from sae_shared.queue import Queue
            from sae_shared.settings import ConfigError

            try:
                self._queue = Queue.from_settings(self.settings, namespace=self.namespace)
            except ConfigError as exc:
                raise Unavailable(f"the job queue is not configured: {exc}") from None
        return self._queue

    async def _run(self, fn, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def submit(self, request: jpb.SubmitJobRequest) -> jpb.SubmitJobResponse:
        job_type = TYPES.get(request.type)
        if job_type is None:
            raise InvalidArgument(f"type: choose one of {', '.join(n.upper() for n in TYPE_ENUMS)}", "type")
        spec = request.spec_json or "{}"
        queue = self.queue()
        job = await self._run(queue.submit, job_type, spec, idempotency_key=request.idempotency_key or None)
        return jpb.SubmitJobResponse(job=job_to_proto(job))

    async def get(self, request: jpb.GetJobRequest) -> jpb.GetJobResponse:
        _check_id(request.job_id)
        return jpb.GetJobResponse(job=job_to_proto(await self._run(self.queue().get, request.job_id)))

    async def list(self, request: jpb.ListJobsRequest) -> jpb.ListJobsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size: must be >= 0", "page_size")
        limit = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        types = None
        if request.type != jpb.JOB_TYPE_UNSPECIFIED:
            if request.type not in TYPES:
                raise InvalidArgument(f"type: unknown job type {request.type}", "type")
            types = [TYPES[request.type]]
        states = None
        if request.states:
            states = []
            for i, s in enumerate(request.states):
                if s not in QUEUE_STATES:
                    raise InvalidArgument(f"states[{i}]: unknown job state {s}", f"states[{i}]")
                states += QUEUE_STATES[s]
        try:
            jobs, token = await self._run(self.queue().list, states, types, limit=limit,
                                          before=request.page_token or None)
        except ValueError as exc:
            raise InvalidArgument(f"page_token: {exc}; pass the next_page_token of the previous page",
                                  "page_token") from None
        return jpb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=token or "")

    async def cancel(self, request: jpb.CancelJobRequest) -> jpb.CancelJobResponse:
        _check_id(request.job_id)
        job = await self._run(self.queue().cancel, request.job_id, request.reason or "cancelled")
        return jpb.CancelJobResponse(job=job_to_proto(job))

    async def watch(self, request: jpb.WatchJobRequest) -> AsyncIterator[jpb.WatchJobResponse]:
        """The job now, then after every change, ending after a terminal state."""
        _check_id(request.job_id)
        queue = self.queue()
        last_version = -1
        while True:
            job = await self._run(queue.get, request.job_id)
            if job.version != last_version:
                last_version = job.version
                yield jpb.WatchJobResponse(job=job_to_proto(job))
            if job.terminal:
                return
            await asyncio.sleep(WATCH_POLL_S)

    async def ping(self) -> None:
        await self._run(self.queue().client.ping)


def _check_id(job_id: str) -> None:
    if not job_id or len(job_id) > 256 or any(c.isspace() for c in job_id):
        raise InvalidArgument("job_id: required, at most 256 characters, no spaces", "job_id")
