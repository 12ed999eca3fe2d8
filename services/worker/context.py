"""What a handler sees while it runs a job, and how a completed job's artifacts become visible.

Handlers are functions ``handler(ctx: JobContext) -> result`` (a JSON-serialisable value). They must be idempotent
and resumable: the queue delivers a job at least once, and a job whose worker died is taken over by another worker,
which runs the handler again from the start. So a handler keeps its resume state in checkpoints
(:meth:`JobContext.checkpoint_put` / :meth:`JobContext.checkpoint_get`), and between steps calls
:meth:`JobContext.check_cancelled`, which raises when the job was cancelled, the worker is stopping, or the lease
was lost.

Fenced artifacts
----------------
A worker that stalls (GC pause, swapped out, SIGSTOP) past its lease is replaced, and may wake up and carry on.
Checking the lease and then writing a manifest leaves a window in which the stale worker passes the check and
stalls again before its write lands. So artifacts are never written in place by an attempt:

1. :meth:`JobContext.artifact` returns a :class:`StagedArtifact`: its files go to
   ``jobs/<id>/attempts/<epoch>/<token>/<n>/`` (a folder only this attempt writes), and its ``commit()`` records
   "this attempt wants ``<files>`` published at ``<prefix>``" in Redis with a fenced script (atomic with the epoch
   check, no window).
2. The queue's fenced ``complete`` picks the winning epoch, atomically.
3. :func:`publish` then copies the *winning* attempt's staged files to ``<prefix>`` through the store's
   :class:`~sae_shared.storage.ArtifactWriter`, whose manifest is written last, and writes ``jobs/<id>/result.json``.
   It is idempotent: any worker may redo it (a worker that dies while publishing leaves the job in ``publishing``,
   and another worker's sweep finishes it). A stale attempt can never make its files visible: its commit record is
   refused, and publication reads only the winner's.

Checkpoints are written in place (``jobs/<id>/checkpoints/<name>``) after a fence check: a stale attempt could
overwrite a checkpoint within that window, so each checkpoint must be a complete resume point by itself (one object
per resume state), which any later attempt may resume from.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import redis

from sae_shared.queue import JobState, LeaseLost, Queue, result_key
from sae_shared.storage import IncompleteArtifact, NotFound, ObjectStore, StorageError, validate_key, validate_prefix
from sae_shared.telemetry import get_logger

if TYPE_CHECKING:
    import torch

    from sae_shared.queue import Job, Lease

log = get_logger(__name__)

T = TypeVar("T")

COPY_IN_MEMORY_BYTES = 64 << 20
"""Staged files up to this size are copied through memory at publication; larger ones through a temporary file."""


class JobInterrupted(BaseException):
    """Raised inside a handler to unwind it between steps. A ``BaseException`` (like ``KeyboardInterrupt``) so that
    a handler's ``except Exception`` around a step does not swallow it."""


class Stopping(JobInterrupted):
    """The worker is shutting down (SIGTERM): the handler has saved its checkpoint at its last step; the job goes
    back to the queue without counting an attempt."""


class Cancelled(JobInterrupted):
    """The job was cancelled: the handler stops and the job ends ``cancelled``."""


class PermanentError(Exception):
    """Raise from a handler for a failure that retrying cannot fix (e.g. malformed input data): the job fails at
    once instead of being retried."""


class JobContext:
    """The handler's view of one attempt at one job.

    Attributes: ``job_id``, ``type``, ``spec`` (the validated spec model), ``epoch`` (this attempt's fencing
    token), ``attempt`` (1 on the first run), ``store`` (the object store, for reading inputs), ``log``.
    """

    def __init__(
        self,
        queue: Queue,
        store: ObjectStore,
        lease: Lease,
        spec: Any,
        *,
        stop_event: threading.Event | None = None,
        on_refused: Callable[[str, str], None] | None = None,
    ):
        self.queue = queue
        self.store = store
        self.lease = lease
        self.job_id = lease.job_id
        self.type = lease.type
        self.spec = spec
        self.epoch = lease.epoch
        self.attempt = lease.attempt
        self.log = get_logger(f"saev.job.{lease.type}")
        self._stop = stop_event or threading.Event()
        self._lost = threading.Event()
        self._cancel_requested = threading.Event()
        self._on_refused = on_refused
        self._deadline = time.monotonic() + lease.lease_seconds
        self._last_check = 0.0
        self._token = secrets.token_hex(3)
        self._n_artifacts = 0

    # --- lease keeping ---

    @property
    def lease_lost(self) -> bool:
        return self._lost.is_set()

    @property
    def stopping(self) -> bool:
        """True once the worker was asked to stop (SIGTERM)."""
        return self._stop.is_set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    def _refused(self, op: str, reason: str) -> LeaseLost:
        self._lost.set()
        log.warning("fenced call refused", extra={"job_id": self.job_id, "epoch": self.epoch, "op": op, "reason": reason})
        if self._on_refused:
            self._on_refused(op, reason)
        return LeaseLost(f"{op} refused for job {self.job_id} epoch {self.epoch}: {reason}")

    def fenced(self, op: str, call: Callable[[], T], *, renews: bool = False, retry: bool = True) -> T:
        """Run a fenced queue call for this attempt. Raises :class:`LeaseLost` when the queue refuses it, or when
        Redis stays unreachable until this attempt's lease has run out (someone else may have the job by then).
        Transient connection errors are retried until then (unless ``retry`` is false)."""
        if self._lost.is_set():
            raise self._refused(op, "the lease was already lost")
        delay = 0.05
        while True:
            sent = time.monotonic()
            try:
                state = call()
            except LeaseLost as exc:
                raise self._refused(op, str(exc)) from None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                now = time.monotonic()
                if now >= self._deadline:
                    raise self._refused(op, f"Redis unreachable until the lease ran out ({exc})") from exc
                if not retry:
                    raise
                time.sleep(min(delay, max(0.01, self._deadline - now)))
                delay = min(delay * 2, 1.0)
                continue
            if renews:
                self._deadline = sent + self.lease.lease_seconds
            if state == JobState.CANCELLING:
                self._cancel_requested.set()
            return state

    def _fence(self, op: str) -> None:
        self.fenced(op, lambda: self.queue.check_lease(self.lease))

    # --- the handler's API ---

    def progress(self, fraction: float, message: str = "", **metrics: float) -> None:
        """Report progress (fraction in [0, 1], a status line and numbers such as ``loss=0.03``); also renews the
        lease. Raises :class:`LeaseLost` if this attempt no longer holds the job."""
        fraction = min(1.0, max(0.0, float(fraction)))
        self.fenced("progress", lambda: self.queue.progress(self.lease, fraction, message, metrics), renews=True)

    def check_cancelled(self) -> None:
        """Call between steps: raises :class:`Cancelled`, :class:`Stopping` or :class:`LeaseLost` when the handler
        must stop. Asks Redis at most about once a second (the heartbeat also brings cancel requests)."""
        if self._lost.is_set():
            raise self._refused("check", "the lease was lost")
        now = time.monotonic()
        if now - self._last_check >= min(1.0, self.lease.lease_seconds / 3):
            self._last_check = now
            self._fence("check")
        if self._cancel_requested.is_set():
            raise Cancelled(f"job {self.job_id} was cancelled")
        if self._stop.is_set():
            raise Stopping(f"worker stopping; job {self.job_id} goes back to the queue")

    def _checkpoint_key(self, name: str) -> str:
        validate_key(name)
        return f"jobs/{self.job_id}/checkpoints/{name}"

    def checkpoint_put(self, name: str, obj: Any) -> None:
        """Save a checkpoint (fenced). The name's extension picks the encoding: ``.json`` (any JSON value),
        ``.safetensors`` (a dict of tensors), anything else raw bytes. Put a whole resume point in one checkpoint:
        checkpoints are read back one by one, possibly written by different attempts."""
        key = self._checkpoint_key(name)
        self._fence("checkpoint")
        if name.endswith(".json"):
            self.store.put_json(key, obj)
        elif name.endswith(".safetensors"):
            self.store.put_tensors(key, obj)
        else:
            self.store.put_bytes(key, obj)

    def checkpoint_get(self, name: str, default: Any = None) -> Any:
        """The checkpoint saved under ``name`` (by this or an earlier attempt), or ``default``."""
        key = self._checkpoint_key(name)
        try:
            if name.endswith(".json"):
                return self.store.get_json(key)
            if name.endswith(".safetensors"):
                return self.store.get_tensors(key)
            return self.store.get_bytes(key)
        except NotFound:
            return default

    def artifact(self, prefix: str, *, overwrite: bool = False) -> StagedArtifact:
        """A writer for the artifact folder ``prefix``, made visible only if this attempt's completion is the one
        accepted (see the module docs). Refuses a prefix that already holds a committed artifact unless
        ``overwrite``."""
        prefix = validate_prefix(prefix, allow_empty=False).rstrip("/")
        own = f"jobs/{self.job_id}/"
        if prefix.startswith(own + "attempts") or prefix.startswith(own + "checkpoints") or prefix + "/" == own:
            raise StorageError(f"artifact prefix {prefix!r} is reserved for the queue; use e.g. {own}out")
        if not overwrite and self.store.is_complete(prefix):
            raise StorageError(
                f"artifact {prefix!r} is already committed; pass overwrite=True to replace it (or use a new prefix)"
            )
        self._n_artifacts += 1
        staged = f"jobs/{self.job_id}/attempts/{self.epoch}/{self._token}/{self._n_artifacts:03d}"
        return StagedArtifact(self, prefix, staged, overwrite)

    def commit_artifact(self, writer: StagedArtifact, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Same as ``writer.commit(extra)``."""
        return writer.commit(extra)


class StagedArtifact:
    """Writes the files of an artifact to this attempt's staging folder; :meth:`commit` records them for
    publication (fenced). Same ``put_*`` methods as :class:`~sae_shared.storage.ArtifactWriter`."""

    def __init__(self, ctx: JobContext, prefix: str, staged_prefix: str, overwrite: bool):
        self.ctx = ctx
        self.prefix = prefix
        """Where the artifact becomes visible."""
        self.staged_prefix = staged_prefix
        self.overwrite = overwrite
        self._writer = ctx.store.artifact(staged_prefix, overwrite=True)
        self.record: dict[str, Any] | None = None

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self._writer.files

    def put_bytes(self, name: str, data: bytes | bytearray | memoryview, content_type: str = "application/octet-stream") -> None:
        self.ctx._fence("artifact write")
        self._writer.put_bytes(name, data, content_type=content_type)

    def put_json(self, name: str, obj: Any) -> None:
        self.ctx._fence("artifact write")
        self._writer.put_json(name, obj)

    def put_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        self.ctx._fence("artifact write")
        self._writer.put_tensors(name, tensors, metadata)

    def put_file(self, name: str, path: str | os.PathLike) -> None:
        self.ctx._fence("artifact write")
        self._writer.put_file(name, path)

    def commit(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record the artifact for publication if this attempt wins (fenced: raises :class:`LeaseLost` otherwise).
        Returns the staging record. The artifact is visible once the job has succeeded."""
        if self.record is not None:
            raise StorageError(f"artifact {self.prefix!r} is already committed by this attempt")
        record = {
            "staged": self.staged_prefix,
            "files": dict(sorted(self._writer.files.items())),
            "extra": extra or {},
            "overwrite": self.overwrite,
        }
        self.ctx.fenced("artifact commit", lambda: self.ctx.queue.stage_artifact(self.ctx.lease, self.prefix, record))
        self.record = record
        return record


# ------------------------------------------------------------------------------------------------ publication


def _publish_artifact(store: ObjectStore, prefix: str, record: dict[str, Any], produced_by: dict[str, Any]) -> None:
    """Copy one staged artifact to ``prefix`` and write its manifest last. Idempotent."""
    try:
        manifest = store.read_manifest(prefix)
    except IncompleteArtifact:
        manifest = None
    if manifest is not None:
        if manifest.get("extra", {}).get("produced_by") == produced_by:
            return  # this publication already happened (a retried or concurrent one)
        if not record["overwrite"]:
            log.warning(
                "artifact already committed by someone else; keeping it",
                extra={"prefix": prefix, "job_id": produced_by["job_id"]},
            )
            return
    writer = store.artifact(prefix, overwrite=True)
    for name, meta in record["files"].items():
        source = f"{record['staged']}/{name}"
        if meta["size"] <= COPY_IN_MEMORY_BYTES:
            writer.put_bytes(name, store.get_bytes(source))
        else:
            with tempfile.TemporaryDirectory(prefix="saev-publish-") as tmp:
                path = os.path.join(tmp, "file")
                store.get_file(source, path)
                writer.put_file(name, path)
        if writer.files[name]["sha256"] != meta["sha256"]:
            raise StorageError(f"staged file {source!r} does not match what the attempt wrote (sha256 differs)")
    writer.commit(extra={**record["extra"], "produced_by": produced_by})


def publish(queue: Queue, store: ObjectStore, job_id: str) -> Job:
    """Make a completed job's winning attempt visible: its artifacts, then ``jobs/<id>/result.json``, then the
    state ``succeeded``; then remove staging files and checkpoints (best effort). Safe to call again, by any
    worker, at any time; does nothing unless the job is ``publishing``. Returns the job."""
    job = queue.get(job_id)
    if job.state is not JobState.PUBLISHING:
        return job
    assert job.winner_epoch is not None
    staged = queue.staged_artifacts(job_id, job.winner_epoch)
    produced_by = {"job_id": job_id, "type": job.type, "epoch": job.winner_epoch}
    for prefix, record in staged.items():
        _publish_artifact(store, prefix, record, produced_by)
    store.put_json(
        result_key(job_id),
        {
            "job_id": job_id,
            "type": job.type,
            "spec": job.spec,
            "result": job.result,
            "artifacts": list(staged),
            "epoch": job.winner_epoch,
            "attempts": job.attempts,
            "created_at": job.created_at,
        },
    )
    queue.mark_published(job_id)
    log.info("job published", extra={"job_id": job_id, "epoch": job.winner_epoch, "artifacts": len(staged)})
    for folder in (f"jobs/{job_id}/attempts/", f"jobs/{job_id}/checkpoints/"):
        try:
            store.delete_prefix(folder)
        except StorageError as exc:
            log.warning("could not remove %s", folder, extra={"job_id": job_id, "error": str(exc)[:300]})
    queue.drop_staged(job_id, job.epoch)
    return queue.get(job_id)
