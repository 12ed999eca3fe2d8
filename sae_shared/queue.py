"""The job queue on Redis: at-least-once delivery, fenced leases, retries, cancellation and watching.

Model
-----
A job is a hash ``<ns>:job:<id>`` (spec, state, attempts, lease epoch, progress, result, error, timestamps) plus one
entry in the Redis Stream of its type, ``<ns>:q:<type>``, read by the consumer group ``workers``. Every state change
is a Lua script, so each one is atomic with the checks it depends on:

- **submit** validates the spec (:mod:`sae_shared.jobs`) in Python, then creates the hash and ``XADD``\\ s the entry.
  With an idempotency key (``SET NX`` semantics inside the script), a repeated submit returns the first job.
- **claim**: a worker reads an entry (``XREADGROUP``) or takes over one whose holder went quiet (``XAUTOCLAIM`` with
  min-idle = the lease), and the claim script starts the job: it increments the job's **epoch** (the fencing token),
  counts an attempt and sets ``lease_until`` from the server's clock. The holder's lease lasts while it heartbeats.
- **heartbeat / progress / check / stage_artifact / complete / fail / release / cancelled** are *fenced*: each
  checks ``epoch == the caller's`` and ``state in (running, cancelling)`` in the same script that writes, and raises
  :class:`LeaseLost` otherwise. A worker that stalled past its lease and was replaced can therefore neither report
  progress, nor complete or fail the job, nor record an artifact for publication.
- **complete** records the result and the winning epoch and moves the job to ``publishing``; the worker (or any
  worker, if that one dies) then makes the winning attempt's staged artifacts visible and calls
  :meth:`Queue.mark_published`, which moves it to ``succeeded``. See ``services/worker/context.py``.
- **fail** re-queues with exponential backoff (the ``<ns>:delayed`` sorted set, promoted back into the stream by
  whoever claims next) until ``max_attempts``, then moves the job to ``dead`` (and the ``<ns>:dead`` list).
  A non-retryable failure goes to ``failed`` at once. A lease lost for good (the worker died) counts as a failed
  attempt too, so a job that kills every worker that runs it ends up ``dead``, not in a loop.
- **cancel** cancels a queued job at once; a running one goes to ``cancelling``, which the worker's heartbeat and
  the handler's ``check_cancelled()`` see between steps.

States: ``queued -> running -> publishing -> succeeded``; ``running -> queued`` (retry or release);
``running -> cancelling -> cancelled``; terminal: ``succeeded``, ``failed``, ``dead``, ``cancelled``.

Times come from the Redis server (``TIME``) inside the scripts, so workers on machines with skewed clocks agree on
leases. Lists and filters use one sorted set per (state, type), scored by submission time.

Durability: Redis must persist with AOF. With ``appendfsync everysec`` a crash of Redis itself may lose the last
second of changes (a job completed in that second would run again, at-least-once); ``appendfsync always`` closes
that window at some cost in submit throughput (see docs/benchmarks.md).

``redis`` is imported when a :class:`Queue` is created, so the library imports without it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from sae_shared.jobs import JOB_TYPES, InvalidSpec, spec_json, validate_spec
from sae_shared.telemetry import get_logger

if TYPE_CHECKING:
    import redis

    from sae_shared.settings import Settings

log = get_logger(__name__)

GROUP = "workers"
"""The consumer group every worker reads the job streams through."""
DEFAULT_NAMESPACE = "saev"
DEFAULT_LEASE_SECONDS = 30.0
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class JobState(str, Enum):
    """Lifecycle state of a job."""

    QUEUED = "queued"
    """Waiting for a worker (possibly until a retry backoff has passed: see ``Job.not_before``)."""
    RUNNING = "running"
    """A worker holds the lease."""
    CANCELLING = "cancelling"
    """Cancel requested while running; the worker stops at its next step."""
    PUBLISHING = "publishing"
    """Completed; the winning attempt's artifacts are being made visible."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """A non-retryable error."""
    DEAD = "dead"
    """Retries exhausted (dead letter)."""
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED})
STATES: tuple[str, ...] = tuple(s.value for s in JobState)


# ----------------------------------------------------------------------------------------------------- errors


class QueueError(RuntimeError):
    """A queue operation could not be done; the message says why."""


class JobNotFound(QueueError, KeyError):
    """No job with this id (in this namespace)."""

    def __str__(self) -> str:
        return str(self.args[0])


class LeaseLost(QueueError):
    """The caller no longer holds the job: another worker reclaimed it (a newer epoch), or it finished or was
    released. The caller must stop working on the job and touch nothing of it."""


class IdempotencyConflict(QueueError):
    """An idempotency key reused with a different job type or spec."""


# ------------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True)
class Progress:
    """Latest progress report of a job."""

    fraction: float = 0.0
    """Done fraction in [0, 1]."""
    message: str = ""
    """Latest status line, e.g. ``step 1200/5000``."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Numbers the handler reported with it, e.g. ``{"loss": 0.031}``."""


@dataclass(frozen=True)
class Job:
    """A snapshot of one job as stored in Redis. Times are Unix seconds (server clock)."""

    id: str
    type: str
    state: JobState
    spec: dict[str, Any]
    """The validated spec (defaults filled in)."""
    attempts: int
    """Attempts started and counted (a release by a stopping worker is not counted)."""
    max_attempts: int
    epoch: int
    """Lease epoch (fencing token) of the latest claim; 0 before the first."""
    progress: Progress
    created_at: float
    updated_at: float
    version: int
    """Incremented by every change that watchers should see."""
    worker: str | None = None
    """Worker id of the holder (or of the last holder)."""
    result: Any = None
    """What the handler returned (JSON), once completed."""
    result_key: str | None = None
    """Object-store key of the result document (``jobs/<id>/result.json``), once completed."""
    winner_epoch: int | None = None
    """Epoch of the attempt whose completion was accepted."""
    error: str | None = None
    """Last error: of the failed attempt that is being retried, or why the job failed, died or was cancelled."""
    retries: int = 0
    """Times the job was re-queued after a failed attempt."""
    lost_leases: int = 0
    """Times a holder's lease expired and the job was taken over."""
    started_at: float | None = None
    finished_at: float | None = None
    not_before: float | None = None
    """While queued after a failure: the time the retry becomes claimable."""
    idempotency_key: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the CLI and services)."""
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__}
        doc["state"] = self.state.value
        doc["progress"] = {"fraction": self.progress.fraction, "message": self.progress.message,
                           "metrics": self.progress.metrics}
        return doc


@dataclass(frozen=True)
class Lease:
    """A claim on a job: what a worker needs to run it and to prove it still holds it."""

    job_id: str
    type: str
    epoch: int
    """Fencing token: every fenced call carries it."""
    attempt: int
    """Counted attempts including this one (1 on the first run)."""
    max_attempts: int
    spec: dict[str, Any]
    consumer: str
    """Stream consumer that holds the entry."""
    lease_seconds: float
    reclaimed: bool
    """True when this claim took the job over from a holder whose lease had expired."""


# ----------------------------------------------------------------------------------------------------- scripts

# Shared by every script. ARGV[1] is the key prefix (namespace); keys are built from it because which streams and
# indexes a script touches depends on the job's type and state, known only inside the script. (All of a namespace's
# keys would have to share one hash slot for Redis Cluster; the platform runs one Redis.)
_PRELUDE = """
local P = ARGV[1]
local G = 'workers'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function jkey(id) return P .. ':job:' .. id end
local function idx(state, typ) return P .. ':idx:' .. state .. ':' .. typ end
local function stream(typ) return P .. ':q:' .. typ end
local function set_state(id, jk, new)
  local cur = redis.call('HMGET', jk, 'state', 'type', 'created_ms')
  if cur[1] ~= new then
    redis.call('ZREM', idx(cur[1], cur[2]), id)
    redis.call('ZADD', idx(new, cur[2]), cur[3], id)
    redis.call('HSET', jk, 'state', new)
  end
end
local function touch(id, jk, now)
  redis.call('HSET', jk, 'updated_ms', now)
  local v = redis.call('HINCRBY', jk, 'version', 1)
  redis.call('PUBLISH', P .. ':events:' .. id, v)
end
-- Acknowledge and delete a job's stream entry (ack first: a deleted entry must never linger in a PEL).
local function drop_entry(jk)
  local j = redis.call('HMGET', jk, 'type', 'entry')
  if j[2] and j[2] ~= '' then
    redis.call('XACK', stream(j[1]), G, j[2])
    redis.call('XDEL', stream(j[1]), j[2])
  end
  redis.call('HSET', jk, 'entry', '')
end
local function enqueue(id, jk)
  local typ = redis.call('HGET', jk, 'type')
  local entry = redis.call('XADD', stream(typ), '*', 'id', id)
  redis.call('HSET', jk, 'entry', entry, 'not_before_ms', '')
  return entry
end
local function finish(id, jk, state, now)
  set_state(id, jk, state)
  redis.call('HSET', jk, 'finished_ms', now, 'lease_until', 0)
  redis.call('ZREM', P .. ':delayed', id)
  if state == 'dead' then redis.call('LPUSH', P .. ':dead', id) end
  touch(id, jk, now)
end
-- nil when (epoch, state) prove the caller holds the job, else the LEASE_LOST error text.
local function fence_error(jk, epoch)
  local j = redis.call('HMGET', jk, 'state', 'epoch')
  if not j[1] then return 'LEASE_LOST the job no longer exists' end
  if tonumber(j[2]) ~= tonumber(epoch) then
    return 'LEASE_LOST epoch ' .. epoch .. ' was superseded by epoch ' .. j[2] .. ' (the job was reclaimed)'
  end
  if j[1] ~= 'running' and j[1] ~= 'cancelling' then
    return 'LEASE_LOST the job is ' .. j[1] .. ', no longer running'
  end
  return nil
end
local function renew(jk, now)
  local j = redis.call('HMGET', jk, 'lease_ms', 'type', 'entry', 'consumer')
  redis.call('HSET', jk, 'lease_until', now + tonumber(j[1]))
  -- Reset the entry's idle time in the PEL, so XAUTOCLAIM leaves a live holder alone.
  if j[3] and j[3] ~= '' then redis.call('XCLAIM', stream(j[2]), G, j[4], 0, j[3], 'JUSTID') end
end
-- Start (or take over) the job behind a stream entry this consumer now owns.
-- Returns {'claimed', id, epoch, attempts, max_attempts, type, spec, reclaimed} or {'skip', reason}.
local function try_claim(st, entry, id, consumer, worker, lease_ms, now)
  local jk = jkey(id)
  local j = redis.call('HMGET', jk, 'state', 'entry', 'lease_until', 'consumer', 'attempts', 'max_attempts',
                       'epoch', 'type', 'spec')
  local state = j[1]
  if (not state) or j[2] ~= entry then
    -- A job deleted, or an entry superseded by a re-queue: drop the entry itself.
    redis.call('XACK', st, G, entry)
    redis.call('XDEL', st, entry)
    return {'skip', 'stale'}
  end
  local reclaimed = 0
  if state == 'running' or state == 'cancelling' then
    if j[4] == consumer and tonumber(j[3]) > now then
      -- This consumer already holds it (a retried call): the same lease, renewed.
      redis.call('HSET', jk, 'lease_until', now + lease_ms)
      return {'claimed', id, tonumber(j[7]), tonumber(j[5]), tonumber(j[6]), j[8], j[9], 0}
    end
    if tonumber(j[3]) > now then
      -- Still leased (its holder heartbeated after XAUTOCLAIM looked): give the entry back.
      redis.call('XCLAIM', st, G, j[4], 0, entry, 'JUSTID')
      return {'skip', 'leased'}
    end
    redis.call('HINCRBY', jk, 'lost_leases', 1)
    if state == 'cancelling' then
      drop_entry(jk)
      finish(id, jk, 'cancelled', now)
      return {'skip', 'cancelled'}
    end
    if tonumber(j[5]) >= tonumber(j[6]) then
      redis.call('HSET', jk, 'error', 'lease lost on attempt ' .. j[5] .. ' of ' .. j[6] ..
                 ' (the worker died or stalled); no attempts left')
      drop_entry(jk)
      finish(id, jk, 'dead', now)
      return {'skip', 'dead'}
    end
    reclaimed = 1
  elseif state ~= 'queued' then
    drop_entry(jk)
    return {'skip', state}
  end
  local epoch = redis.call('HINCRBY', jk, 'epoch', 1)
  local attempts = redis.call('HINCRBY', jk, 'attempts', 1)
  redis.call('HSET', jk, 'consumer', consumer, 'worker', worker, 'lease_ms', lease_ms,
             'lease_until', now + lease_ms, 'attempt_started_ms', now)
  redis.call('HSETNX', jk, 'started_ms', now)
  set_state(id, jk, 'running')
  touch(id, jk, now)
  return {'claimed', id, epoch, attempts, tonumber(j[6]), j[8], j[9], reclaimed}
end
"""

# ARGV: prefix, id, type, spec, max_attempts, idempotency key or '', backoff base ms, backoff max ms
_SUBMIT = """
local id, typ, idem = ARGV[2], ARGV[3], ARGV[6]
if idem ~= '' then
  local existing = redis.call('GET', P .. ':idem:' .. idem)
  if existing and redis.call('EXISTS', jkey(existing)) == 1 then return {'existing', existing} end
end
local jk = jkey(id)
if redis.call('EXISTS', jk) == 1 then return {'existing', id} end
local now = now_ms()
redis.call('HSET', jk, 'id', id, 'type', typ, 'state', 'queued', 'spec', ARGV[4], 'attempts', 0,
           'max_attempts', ARGV[5], 'epoch', 0, 'created_ms', now, 'updated_ms', now, 'version', 1,
           'backoff_base_ms', ARGV[7], 'backoff_max_ms', ARGV[8], 'idempotency_key', idem, 'retries', 0,
           'lost_leases', 0, 'lease_until', 0)
redis.call('ZADD', idx('queued', typ), now, id)
enqueue(id, jk)
if idem ~= '' then redis.call('SET', P .. ':idem:' .. idem, id) end
return {'created', id}
"""

# ARGV: prefix, stream, entry, id, consumer, worker, lease ms
_CLAIM = """
return try_claim(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), now_ms())
"""

# ARGV: prefix, stream, consumer, worker, lease ms, min idle ms, cursor, max entries to look at
# XAUTOCLAIM answers [cursor, entries] on Redis 6.2 and [cursor, entries, deleted ids] on 7.x: only the first two
# elements are read. Entries are taken one at a time so that none is left unexamined in this consumer's PEL.
_RECLAIM = """
local st, consumer, worker = ARGV[2], ARGV[3], ARGV[4]
local lease_ms, min_idle, cursor = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local now = now_ms()
for _ = 1, tonumber(ARGV[8]) do
  local res = redis.call('XAUTOCLAIM', st, G, consumer, min_idle, cursor, 'COUNT', 1)
  cursor = res[1]
  for _, e in ipairs(res[2]) do
    if e then
      local fields, id = e[2], nil
      for i = 1, #fields, 2 do if fields[i] == 'id' then id = fields[i + 1] end end
      if id then
        local r = try_claim(st, e[1], id, consumer, worker, lease_ms, now)
        if r[1] == 'claimed' then
          table.insert(r, cursor)
          return r
        end
      else
        redis.call('XACK', st, G, e[1])
        redis.call('XDEL', st, e[1])
      end
    end
  end
  if cursor == '0-0' then break end
end
return {'none', cursor}
"""

# ARGV: prefix, max jobs to promote. Returns {promoted, ms until the next one is due (-1: none), now}.
_PROMOTE = """
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', P .. ':delayed', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', P .. ':delayed', id)
  local jk = jkey(id)
  local j = redis.call('HMGET', jk, 'state', 'entry')
  if j[1] == 'queued' and (not j[2] or j[2] == '') then
    enqueue(id, jk)
    touch(id, jk, now)
  end
end
local nxt = redis.call('ZRANGE', P .. ':delayed', 0, 0, 'WITHSCORES')
local wait = -1
if nxt[2] then wait = math.max(0, tonumber(nxt[2]) - now) end
return {#ids, wait, now}
"""

# ARGV: prefix, id, epoch. Renews the lease; returns the state (the holder learns of a cancel request).
_HEARTBEAT = """
local jk = jkey(ARGV[2])
local err = fence_error(jk, ARGV[3])
if err then return redis.error_reply(err) end
renew(jk, now_ms())
return redis.call('HGET', jk, 'state')
"""

# ARGV: prefix, id, epoch. Read-only fence check; returns the state.
_CHECK = """
local jk = jkey(ARGV[2])
local err = fence_error(jk, ARGV[3])
if err then return redis.error_reply(err) end
return redis.call('HGET', jk, 'state')
"""

# ARGV: prefix, id, epoch, fraction, message, metrics json
_PROGRESS = """
local id = ARGV[2]
local jk = jkey(id)
local err = fence_error(jk, ARGV[3])
if err then return redis.error_reply(err) end
local now = now_ms()
redis.call('HSET', jk, 'progress_fraction', ARGV[4], 'progress_message', ARGV[5], 'progress_metrics', ARGV[6])
renew(jk, now)
touch(id, jk, now)
return redis.call('HGET', jk, 'state')
"""

# ARGV: prefix, id, epoch, final prefix, record json. Records an artifact staged by this attempt; only the winning
# attempt's records are ever published.
_STAGE = """
local id = ARGV[2]
local jk = jkey(id)
local err = fence_error(jk, ARGV[3])
if err then return redis.error_reply(err) end
redis.call('HSET', P .. ':staged:' .. id .. ':' .. ARGV[3], ARGV[4], ARGV[5])
return redis.call('HGET', jk, 'state')
"""

# ARGV: prefix, id, epoch, result json, result key
_COMPLETE = """
local id, epoch = ARGV[2], ARGV[3]
local jk = jkey(id)
local j = redis.call('HMGET', jk, 'state', 'winner_epoch')
if (j[1] == 'publishing' or j[1] == 'succeeded') and j[2] == epoch then return j[1] end  -- a retried call
local err = fence_error(jk, epoch)
if err then return redis.error_reply(err) end
local now = now_ms()
drop_entry(jk)
redis.call('HSET', jk, 'result', ARGV[4], 'result_key', ARGV[5], 'winner_epoch', epoch, 'progress_fraction', 1,
           'error', '', 'lease_until', 0)
set_state(id, jk, 'publishing')
redis.call('ZADD', P .. ':publishing', now, id)
touch(id, jk, now)
return 'publishing'
"""

# ARGV: prefix, id. Idempotent: whoever published the winning attempt's artifacts calls it.
_PUBLISHED = """
local id = ARGV[2]
local jk = jkey(id)
local state = redis.call('HGET', jk, 'state')
if state == 'publishing' then
  finish(id, jk, 'succeeded', now_ms())
  state = 'succeeded'
end
redis.call('ZREM', P .. ':publishing', id)
return state or ''
"""

# ARGV: prefix, id, epoch, error, retryable (1/0), jitter factor. Returns {new state, retry delay ms}.
_FAIL = """
local id = ARGV[2]
local jk = jkey(id)
local err = fence_error(jk, ARGV[3])
if err then return redis.error_reply(err) end
local now = now_ms()
local j = redis.call('HMGET', jk, 'state', 'attempts', 'max_attempts', 'backoff_base_ms', 'backoff_max_ms')
drop_entry(jk)
redis.call('HSET', jk, 'error', ARGV[4], 'lease_until', 0)
if j[1] == 'cancelling' then
  finish(id, jk, 'cancelled', now)
  return {'cancelled', 0}
end
local attempts, max_attempts = tonumber(j[2]), tonumber(j[3])
if ARGV[5] == '1' and attempts < max_attempts then
  local delay = math.min(tonumber(j[5]), tonumber(j[4]) * 2 ^ (attempts - 1)) * tonumber(ARGV[6])
  delay = math.floor(delay)
  redis.call('HSET', jk, 'not_before_ms', now + delay)
  redis.call('HINCRBY', jk, 'retries', 1)
  set_state(id, jk, 'queued')
  redis.call('ZADD', P .. ':delayed', now + delay, id)
  touch(id, jk, now)
  return {'queued', delay}
end
if ARGV[5] == '1' then
  finish(id, jk, 'dead', now)
  return {'dead', 0}
end
finish(id, jk, 'failed', now)
return {'failed', 0}
"""

# ARGV: prefix, id, epoch. A stopping worker hands the job back at once, without counting the attempt.
_RELEASE = """
local id = ARGV[2]
local jk = jkey(id)
local err = fence_error(jk, ARGV[3])
if err then return redis.error_reply(err) end
local now = now_ms()
drop_entry(jk)
if redis.call('HGET', jk, 'state') == 'cancelling' then
  finish(id, jk, 'cancelled', now)
  return 'cancelled'
end
redis.call('HINCRBY', jk, 'attempts', -1)
redis.call('HSET', jk, 'lease_until', 0, 'consumer', '')
set_state(id, jk, 'queued')
enqueue(id, jk)
touch(id, jk, now)
return 'queued'
"""

# ARGV: prefix, id, epoch. The handler saw the cancel request and stopped.
_CANCELLED = """
local id = ARGV[2]
local jk = jkey(id)
local err = fence_error(jk, ARGV[3])
if err then return redis.error_reply(err) end
drop_entry(jk)
finish(id, jk, 'cancelled', now_ms())
return 'cancelled'
"""

# ARGV: prefix, id, reason. Returns the new state ('' when the job does not exist).
_CANCEL = """
local id = ARGV[2]
local jk = jkey(id)
local state = redis.call('HGET', jk, 'state')
if not state then return '' end
local now = now_ms()
if state == 'queued' then
  -- The stream entry, if delivered meanwhile, is dropped by the claim script when it sees the state.
  redis.call('HSET', jk, 'error', ARGV[3])
  finish(id, jk, 'cancelled', now)
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', jk, 'error', ARGV[3])
  set_state(id, jk, 'cancelling')
  touch(id, jk, now)
  return 'cancelling'
end
return state
"""

# ARGV: prefix, stream, entry, id. Hand back an entry this consumer read but did not start (a stopping worker).
_UNREAD = """
local st, entry, id = ARGV[2], ARGV[3], ARGV[4]
local jk = jkey(id)
local j = redis.call('HMGET', jk, 'state', 'entry')
if j[2] ~= entry then  -- superseded or deleted job: drop the stale entry
  redis.call('XACK', st, G, entry)
  redis.call('XDEL', st, entry)
  return 0
end
if j[1] == 'running' or j[1] == 'cancelling' then
  return 0  -- another consumer took the entry over and started the job: it is theirs now
end
drop_entry(jk)
if j[1] == 'queued' then
  enqueue(id, jk)
  return 1
end
return 0
"""

# ARGV: prefix, id. Put a failed, dead or cancelled job back in the queue with a fresh set of attempts.
_REQUEUE = """
local id = ARGV[2]
local jk = jkey(id)
local state = redis.call('HGET', jk, 'state')
if not state then return '' end
if state ~= 'failed' and state ~= 'dead' and state ~= 'cancelled' then return state end
local now = now_ms()
redis.call('HSET', jk, 'attempts', 0, 'finished_ms', '', 'lease_until', 0, 'consumer', '')
redis.call('LREM', P .. ':dead', 0, id)
set_state(id, jk, 'queued')
enqueue(id, jk)
touch(id, jk, now)
return 'queued'
"""

_SCRIPTS = {
    "submit": _SUBMIT, "claim": _CLAIM, "reclaim": _RECLAIM, "promote": _PROMOTE, "heartbeat": _HEARTBEAT,
    "check": _CHECK, "progress": _PROGRESS, "stage": _STAGE, "complete": _COMPLETE, "published": _PUBLISHED,
    "fail": _FAIL, "release": _RELEASE, "cancelled": _CANCELLED, "cancel": _CANCEL, "unread": _UNREAD,
    "requeue": _REQUEUE,
}


# ------------------------------------------------------------------------------------------------------ helpers


def new_job_id() -> str:
    """A new job id: 16 hex digits, time-ordered in its first 8 (seconds) so ids sort roughly by submission."""
    return f"{int(time.time()) & 0xFFFFFFFF:08x}{secrets.token_hex(4)}"


def default_worker_id() -> str:
    """``host:pid:random``; unique per process, readable in ``jobs get``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A Redis client for the queue: text replies, a socket timeout longer than any blocking read the queue does,
    and a few quick retries on a dropped connection (longer outages surface as ``redis.ConnectionError``)."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": 15.0,
        "socket_connect_timeout": 3.0,
        "health_check_interval": 15,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    options.update(kwargs)
    return redis.Redis.from_url(url, **options)


def _ms_to_s(value: str | None) -> float | None:
    if value in (None, ""):
        return None
    return int(value) / 1000.0


def _json_or(value: str | None, default: Any) -> Any:
    if not value:
        return default
    return json.loads(value)


def _job_from_hash(h: dict[str, str]) -> Job:
    epoch = int(h.get("winner_epoch") or 0)
    return Job(
        id=h["id"],
        type=h["type"],
        state=JobState(h["state"]),
        spec=json.loads(h["spec"]),
        attempts=int(h.get("attempts", 0)),
        max_attempts=int(h.get("max_attempts", 1)),
        epoch=int(h.get("epoch", 0)),
        progress=Progress(
            fraction=float(h.get("progress_fraction") or 0.0),
            message=h.get("progress_message", ""),
            metrics=_json_or(h.get("progress_metrics"), {}),
        ),
        created_at=int(h["created_ms"]) / 1000.0,
        updated_at=int(h["updated_ms"]) / 1000.0,
        version=int(h.get("version", 0)),
        worker=h.get("worker") or None,
        result=_json_or(h.get("result"), None),
        result_key=h.get("result_key") or None,
        winner_epoch=epoch or None,
        error=h.get("error") or None,
        retries=int(h.get("retries", 0)),
        lost_leases=int(h.get("lost_leases", 0)),
        started_at=_ms_to_s(h.get("started_ms")),
        finished_at=_ms_to_s(h.get("finished_ms")),
        not_before=_ms_to_s(h.get("not_before_ms")),
        idempotency_key=h.get("idempotency_key") or None,
    )


def result_key(job_id: str) -> str:
    """Where a job's result document lives in the object store."""
    return f"jobs/{job_id}/result.json"


# -------------------------------------------------------------------------------------------------------- queue


class Queue:
    """The job queue in one namespace of one Redis. Thread-safe (the client's connection pool is).

    ``lease_seconds`` is the lease this process's claims take (and the idle time after which it takes over entries
    of silent holders); holders must heartbeat well within it (the worker does every third of it).
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        reclaim_interval: float | None = None,
    ):
        import redis as redis_module

        if not namespace or any(c in namespace for c in " \t\n{}"):
            raise ValueError(f"namespace must be a non-empty word without spaces or braces, got {namespace!r}")
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.client = client
        self.namespace = namespace
        self.lease_seconds = float(lease_seconds)
        self.reclaim_interval = reclaim_interval if reclaim_interval is not None else min(5.0, self.lease_seconds / 2)
        self._redis = redis_module
        self._scripts = {name: client.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()}
        self._groups: set[str] = set()
        self._reclaim_cursor: dict[str, str] = {}
        self._next_reclaim = 0.0
        self._unread: dict[str, list[tuple[str, str, str]]] = {}
        """consumer -> entries it read from a stream but has not tried to claim yet (stream, entry, job id)."""
        self._rotation = 0  # which type a claim looks at first (round robin, so no type starves another)

    @classmethod
    def from_settings(cls, settings: Settings, namespace: str = DEFAULT_NAMESPACE, **kwargs: Any) -> Queue:
        """A queue on ``settings.redis_url`` (``SAEV_REDIS_URL``)."""
        return cls(connect(settings.require_redis()), namespace, **kwargs)

    # --- keys and script calls ---

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def stream_key(self, job_type: str) -> str:
        return self._key("q", job_type)

    def _run(self, name: str, *args: Any) -> Any:
        try:
            return self._scripts[name](args=[self.namespace, *args])
        except self._redis.ResponseError as exc:
            text = str(exc)
            if "LEASE_LOST" in text:
                raise LeaseLost(text.split("LEASE_LOST", 1)[1].strip()) from None
            raise

    def server_time(self) -> float:
        """The Redis server's clock (Unix seconds): the clock every lease and timestamp uses."""
        sec, usec = self.client.time()
        return sec + usec / 1e6

    # --- submitting and reading ---

    def submit(
        self,
        job_type: str,
        spec: dict[str, Any] | str | Any,
        *,
        idempotency_key: str | None = None,
        max_attempts: int = 3,
        backoff_seconds: float = 5.0,
        max_backoff_seconds: float = 300.0,
        job_id: str | None = None,
    ) -> Job:
        """Validate ``spec`` for ``job_type`` and queue the job; returns it.

        With an ``idempotency_key``, submitting again returns the job the key first created (raising
        :class:`IdempotencyConflict` if the type or spec differ). A failed attempt is retried after
        ``backoff_seconds * 2**(attempt - 1)`` (capped at ``max_backoff_seconds``, times a random factor in
        [0.5, 1]) until ``max_attempts`` attempts have run. Raises :class:`InvalidSpec` for a bad spec, before
        anything is written.
        """
        model = validate_spec(job_type, spec)
        if not 1 <= max_attempts <= 1000:
            raise InvalidSpec(f"max_attempts must be between 1 and 1000, got {max_attempts}")
        if backoff_seconds < 0 or max_backoff_seconds < 0:
            raise InvalidSpec("backoff_seconds and max_backoff_seconds must be >= 0")
        if idempotency_key is not None and (not idempotency_key or len(idempotency_key) > 256):
            raise InvalidSpec("idempotency_key must be 1 to 256 characters")
        body = spec_json(model)
        job_id = job_id or new_job_id()
        if not _JOB_ID.fullmatch(job_id):
            raise InvalidSpec(f"job id {job_id!r} must be 1 to 64 letters, digits, '-' or '_'")
        self._ensure_group(job_type)
        outcome, found_id = self._run(
            "submit", job_id, job_type, body, max_attempts, idempotency_key or "",
            int(backoff_seconds * 1000), int(max_backoff_seconds * 1000),
        )
        job = self.get(found_id)
        if outcome == "existing" and idempotency_key and (job.type != job_type or not _same_spec(job, body)):
            raise IdempotencyConflict(
                f"idempotency key {idempotency_key!r} already names job {job.id} ({job.type}) with a different "
                "spec: use a new key for a different job"
            )
        if outcome == "created":
            log.debug("job submitted", extra={"job_id": job.id, "type": job_type})
        return job

    def get(self, job_id: str) -> Job:
        """The job's current state; :class:`JobNotFound` if there is none."""
        h = self.client.hgetall(self._key("job", job_id))
        if not h:
            raise JobNotFound(f"no job {job_id!r} in namespace {self.namespace!r}")
        return _job_from_hash(h)

    def list(
        self,
        states: Iterable[str | JobState] | None = None,
        types: Iterable[str] | None = None,
        *,
        limit: int = 50,
        before: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first, filtered by state(s) and type(s); returns (jobs, token of the next page or None).

        ``before`` is the token a previous call returned.
        """
        states = [JobState(s).value for s in (states or STATES)]
        types = list(types or JOB_TYPES)
        for t in types:
            if t not in JOB_TYPES:
                raise InvalidSpec(f"unknown job type {t!r}: choose from {', '.join(JOB_TYPES)}")
        if limit <= 0:
            raise ValueError(f"limit must be > 0, got {limit}")
        cursor_score, cursor_id = math.inf, ""
        if before:
            try:
                score_text, cursor_id = before.split(":", 1)
                cursor_score = int(score_text)
            except ValueError:
                raise ValueError(f"bad page token {before!r}") from None
        keys = [self._key("idx", s, t) for s in states for t in types]
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            if before:
                # Same-millisecond jobs are ordered by id (descending), so a page may end between them.
                pipe.zrangebyscore(key, cursor_score, cursor_score, withscores=True)
                pipe.zrevrangebyscore(key, f"({cursor_score}", "-inf", start=0, num=limit, withscores=True)
            else:
                pipe.zrevrangebyscore(key, "+inf", "-inf", start=0, num=limit, withscores=True)
        found: list[tuple[float, str]] = []
        results = pipe.execute()
        if before:
            for ties, older in zip(results[0::2], results[1::2]):
                found += [(score, m) for m, score in ties if m < cursor_id]
                found += [(score, m) for m, score in older]
        else:
            for rows in results:
                found += [(score, m) for m, score in rows]
        found.sort(key=lambda sm: (sm[0], sm[1]), reverse=True)
        page = found[:limit]
        pipe = self.client.pipeline(transaction=False)
        for _, job_id in page:
            pipe.hgetall(self._key("job", job_id))
        jobs = [_job_from_hash(h) for h in pipe.execute() if h]
        token = f"{int(page[-1][0])}:{page[-1][1]}" if len(found) > limit else None
        return jobs, token

    def counts(self, types: Iterable[str] | None = None) -> dict[tuple[str, str], int]:
        """Number of jobs per (type, state)."""
        types = list(types or JOB_TYPES)
        pairs = [(t, s) for t in types for s in STATES]
        pipe = self.client.pipeline(transaction=False)
        for t, s in pairs:
            pipe.zcard(self._key("idx", s, t))
        return dict(zip(pairs, pipe.execute()))

    def dead_letters(self, limit: int = 100) -> list[str]:
        """Ids of dead jobs, most recent first."""
        return self.client.lrange(self._key("dead"), 0, limit - 1)

    def watch(
        self, job_id: str, *, poll_seconds: float = 0.5, timeout: float | None = None
    ) -> Iterator[Job]:
        """Yield the job now, then a new snapshot after each change, until it is terminal (or ``timeout`` seconds
        pass: :class:`TimeoutError`). Snapshots are the latest state, so changes in quick succession may arrive as
        one (versions only increase; the terminal state always arrives). Changes are pushed with pub/sub; polling
        every ``poll_seconds`` covers lost messages and Redis restarts (a watcher rides out an outage)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self._key("events", job_id)
        pubsub = None
        last_version = -1
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                        pubsub.subscribe(channel)
                    job = self.get(job_id)
                    if job.version != last_version:
                        last_version = job.version
                        yield job
                    if job.terminal:
                        return
                    wait = poll_seconds if deadline is None else min(poll_seconds, max(0.0, deadline - time.monotonic()))
                    pubsub.get_message(timeout=wait)
                except (self._redis.ConnectionError, self._redis.TimeoutError):
                    if pubsub is not None:
                        try:
                            pubsub.close()
                        except Exception:  # noqa: BLE001 - the connection is already broken
                            pass
                        pubsub = None
                    time.sleep(min(poll_seconds, 0.5))
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout:g}s")
        finally:
            if pubsub is not None:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is terminal; returns it (see :meth:`watch`)."""
        job = None
        for job in self.watch(job_id, timeout=timeout):
            pass
        assert job is not None
        return job

    # --- operators ---

    def cancel(self, job_id: str, reason: str = "cancelled") -> Job:
        """Cancel a queued job, or ask a running one to stop at its next step (state ``cancelling``). A finished
        job is left as it is. Returns the job after the change."""
        if not self._run("cancel", job_id, reason or "cancelled"):
            raise JobNotFound(f"no job {job_id!r} in namespace {self.namespace!r}")
        return self.get(job_id)

    def requeue(self, job_id: str) -> Job:
        """Queue a failed, dead or cancelled job again with a fresh set of attempts (it resumes from its
        checkpoints, if its handler left any)."""
        state = self._run("requeue", job_id)
        if not state:
            raise JobNotFound(f"no job {job_id!r} in namespace {self.namespace!r}")
        if state != "queued":
            raise QueueError(f"job {job_id} is {state}: only failed, dead or cancelled jobs can be requeued")
        return self.get(job_id)

    # --- workers: claiming ---

    def _ensure_group(self, job_type: str, force: bool = False) -> None:
        if job_type in self._groups and not force:
            return
        try:
            self.client.xgroup_create(self.stream_key(job_type), GROUP, id="0", mkstream=True)
        except self._redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(job_type)

    def promote_due(self, limit: int = 100) -> float | None:
        """Move retries whose backoff has passed back into their streams. Returns seconds until the next one is
        due (None when none waits)."""
        _, wait_ms, _ = self._run("promote", limit)
        return None if int(wait_ms) < 0 else int(wait_ms) / 1000.0

    def _lease_from(self, reply: list[Any], consumer: str) -> Lease:
        _, job_id, epoch, attempts, max_attempts, job_type, spec, reclaimed = reply[:8]
        return Lease(
            job_id=job_id, type=job_type, epoch=int(epoch), attempt=int(attempts), max_attempts=int(max_attempts),
            spec=json.loads(spec), consumer=consumer, lease_seconds=self.lease_seconds, reclaimed=bool(int(reclaimed)),
        )

    def _try_entry(self, stream: str, entry: str, job_id: str, consumer: str, worker: str) -> Lease | None:
        reply = self._run("claim", stream, entry, job_id, consumer, worker, int(self.lease_seconds * 1000))
        if reply[0] == "claimed":
            return self._lease_from(reply, consumer)
        return None

    def reclaim(self, consumer: str, types: Iterable[str], worker: str | None = None, max_scan: int = 50) -> Lease | None:
        """Take over one job whose holder has not heartbeated for a whole lease (or an entry read by a worker
        that died before starting it). Returns its lease, or None."""
        worker = worker or consumer
        for job_type in types:
            self._ensure_group(job_type)
            stream = self.stream_key(job_type)
            reply = self._run(
                "reclaim", stream, consumer, worker, int(self.lease_seconds * 1000), int(self.lease_seconds * 1000),
                self._reclaim_cursor.get(stream, "0-0"), max_scan,
            )
            self._reclaim_cursor[stream] = reply[-1]
            if reply[0] == "claimed":
                lease = self._lease_from(reply, consumer)
                log.warning(
                    "reclaimed a job whose lease expired",
                    extra={"job_id": lease.job_id, "epoch": lease.epoch, "attempt": lease.attempt},
                )
                return lease
        return None

    def claim(
        self, consumer: str, types: Iterable[str], *, worker: str | None = None, block_seconds: float = 1.0
    ) -> Lease | None:
        """Start the next job of one of ``types`` for ``consumer`` (a name unique to one worker slot), waiting up
        to ``block_seconds`` for one to arrive. Returns its lease, or None when there is none.

        In order: retries whose backoff has passed are promoted; jobs whose holder went silent are taken over
        (checked every ``reclaim_interval``); then new entries are read.
        """
        types = list(types)
        worker = worker or consumer
        for job_type in types:
            self._ensure_group(job_type)
        streams = {self.stream_key(t): ">" for t in types}
        deadline = time.monotonic() + block_seconds
        while True:
            next_due = self.promote_due()
            # Entries read earlier but not yet tried (one read can return one entry per stream).
            pending = self._unread.get(consumer, [])
            while pending:
                stream, entry, job_id = pending.pop(0)
                lease = self._try_entry(stream, entry, job_id, consumer, worker)
                if lease:
                    return lease
            now = time.monotonic()
            if now >= self._next_reclaim:
                self._next_reclaim = now + self.reclaim_interval
                lease = self.reclaim(consumer, types, worker)
                if lease:
                    return lease
            # New entries, one type at a time from a rotating start, without blocking: a read of several streams
            # at once returns one entry per stream, and the entries not started would wait for this consumer
            # (others take them only after a lease), while another slot may be free.
            start = self._rotation % len(types)
            self._rotation += 1
            for job_type in types[start:] + types[:start]:
                for stream, rows in self._read_new(consumer, {self.stream_key(job_type): ">"}, types, None) or []:
                    for entry_id, fields in rows:
                        lease = self._try_entry(stream, entry_id, fields.get("id", ""), consumer, worker)
                        if lease:
                            return lease
            # Wait for a new entry, but no longer than until the next retry is due (then promote it).
            block = min(deadline - time.monotonic(), 10.0)  # well under the client's socket timeout
            if next_due is not None:
                block = min(block, next_due + 0.002)
            reply = self._read_new(consumer, streams, types, max(1, int(block * 1000)))
            self._unread[consumer] = pending = [
                (stream, entry_id, fields.get("id", "")) for stream, rows in (reply or []) for entry_id, fields in rows
            ]
            while pending:
                stream, entry, job_id = pending.pop(0)
                lease = self._try_entry(stream, entry, job_id, consumer, worker)
                if lease:
                    return lease
            if time.monotonic() >= deadline:
                return None

    def _read_new(self, consumer: str, streams: dict[str, str], types: list[str], block_ms: int | None):
        """``XREADGROUP COUNT 1`` of ``streams`` (blocking up to ``block_ms``, or not at all when None)."""
        try:
            return self.client.xreadgroup(GROUP, consumer, streams, count=1, block=block_ms)
        except self._redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            for job_type in types:  # Redis lost its data (no persistence?): recreate the groups
                self._ensure_group(job_type, force=True)
            return None

    def unread(self, consumer: str) -> int:
        """Hand back entries ``consumer`` read but did not start (call when a worker stops). Returns how many."""
        pending = self._unread.pop(consumer, [])
        for stream, entry, job_id in pending:
            self._run("unread", stream, entry, job_id)
        return len(pending)

    def forget_consumer(self, consumer: str, types: Iterable[str]) -> None:
        """Remove a stopping worker's consumer from the group of each stream, if it holds no entries."""
        for job_type in types:
            stream = self.stream_key(job_type)
            try:
                info = self.client.xpending_range(stream, GROUP, "-", "+", 1, consumername=consumer)
                if not info:
                    self.client.xgroup_delconsumer(stream, GROUP, consumer)
            except self._redis.ResponseError:
                pass

    # --- workers: fenced calls (raise LeaseLost unless the caller still holds the job) ---

    def heartbeat(self, lease: Lease) -> JobState:
        """Renew the lease; returns the state (``cancelling`` when a cancel was asked for)."""
        return JobState(self._run("heartbeat", lease.job_id, lease.epoch))

    def check_lease(self, lease: Lease) -> JobState:
        """Raise :class:`LeaseLost` unless ``lease`` still holds its job; returns the state. Use as a fence."""
        return JobState(self._run("check", lease.job_id, lease.epoch))

    def progress(self, lease: Lease, fraction: float, message: str = "", metrics: dict[str, Any] | None = None) -> JobState:
        """Record progress (which also renews the lease); returns the state."""
        if not (0.0 <= fraction <= 1.0) or math.isnan(fraction):
            raise ValueError(f"progress fraction must be in [0, 1], got {fraction}")
        body = json.dumps(metrics or {}, default=float, allow_nan=False)
        return JobState(self._run("progress", lease.job_id, lease.epoch, repr(float(fraction)), message[:1000], body))

    def stage_artifact(self, lease: Lease, prefix: str, record: dict[str, Any]) -> None:
        """Record that this attempt staged an artifact for ``prefix``; published only if this attempt wins."""
        self._run("stage", lease.job_id, lease.epoch, prefix, json.dumps(record))

    def staged_artifacts(self, job_id: str, epoch: int) -> dict[str, dict[str, Any]]:
        """Final prefix -> staging record of the artifacts attempt ``epoch`` staged."""
        raw = self.client.hgetall(self._key("staged", job_id, str(epoch)))
        return {prefix: json.loads(body) for prefix, body in sorted(raw.items())}

    def drop_staged(self, job_id: str, up_to_epoch: int) -> None:
        """Forget the staging records of every attempt up to ``up_to_epoch`` (after publication)."""
        keys = [self._key("staged", job_id, str(e)) for e in range(1, up_to_epoch + 1)]
        if keys:
            self.client.delete(*keys)

    def complete(self, lease: Lease, result: Any = None) -> JobState:
        """Accept this attempt's result (JSON-serialisable): the job moves to ``publishing``; publish the staged
        artifacts, then call :meth:`mark_published`. A retried call by the winner is accepted again."""
        body = json.dumps(result, allow_nan=False)
        return JobState(self._run("complete", lease.job_id, lease.epoch, body, result_key(lease.job_id)))

    def mark_published(self, job_id: str) -> JobState:
        """The winning attempt's artifacts are visible: ``publishing -> succeeded`` (idempotent)."""
        state = self._run("published", job_id)
        if not state:
            raise JobNotFound(f"no job {job_id!r} in namespace {self.namespace!r}")
        return JobState(state)

    def publishing(self, older_than_seconds: float = 0.0, limit: int = 100) -> list[str]:
        """Ids of completed jobs still waiting for publication since at least ``older_than_seconds`` ago."""
        cutoff = int((self.server_time() - older_than_seconds) * 1000)
        return self.client.zrangebyscore(self._key("publishing"), "-inf", cutoff, start=0, num=limit)

    def fail(self, lease: Lease, error: str, *, retryable: bool = True) -> tuple[JobState, float]:
        """Record a failed attempt. Retryable and attempts left: re-queued after a backoff (returns ``queued`` and
        the delay in seconds); retryable and none left: ``dead``; not retryable: ``failed``; cancel requested:
        ``cancelled``."""
        state, delay_ms = self._run(
            "fail", lease.job_id, lease.epoch, error[:4000], "1" if retryable else "0", repr(random.uniform(0.5, 1.0))
        )
        return JobState(state), int(delay_ms) / 1000.0

    def release(self, lease: Lease) -> JobState:
        """Hand the job back to the queue at once without counting the attempt (a worker shutting down);
        ``cancelled`` instead if a cancel was requested."""
        return JobState(self._run("release", lease.job_id, lease.epoch))

    def mark_cancelled(self, lease: Lease) -> JobState:
        """The handler stopped because of a cancel request."""
        return JobState(self._run("cancelled", lease.job_id, lease.epoch))


def _same_spec(job: Job, body: str) -> bool:
    """Whether a stored job's spec is the one just submitted, both read by this version's model: a job stored by
    an older version (without a field added since, with its default) is still the same job."""
    if job.spec == json.loads(body):
        return True
    try:
        return spec_json(validate_spec(job.type, job.spec)) == body
    except InvalidSpec:
        return False
