"""Built-in handlers that need nothing but the queue and the store.

``count`` is the queue's own test and demo job: deterministic, one checkpoint and one progress report per step,
resumable from any checkpoint, with a result that records which attempt (lease epoch) ran which step.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

from sae_shared.jobs import CountSpec
from sae_shared.queue import LeaseLost
from services.worker.context import JobContext, PermanentError

CHECKPOINT = "count.json"


def _step_value(value: str, step: int) -> str:
    """The running value after ``step``: a hash chain, so any skipped or repeated step changes the result."""
    return hashlib.sha256(f"{value}:{step}".encode()).hexdigest()


def run_count(ctx: JobContext) -> dict[str, Any]:
    spec: CountSpec = ctx.spec
    if spec.fail_permanently:
        raise PermanentError("the spec asks this job to fail (fail_permanently=true)")
    if ctx.attempt <= spec.fail_attempts:
        raise RuntimeError(f"planned failure on attempt {ctx.attempt} (fail_attempts={spec.fail_attempts})")

    def fenced(call: Callable[[], Any]) -> None:
        """Run a fenced call; a test job may be told to ignore refusals, as a stalled worker that does not notice."""
        try:
            call()
        except LeaseLost:
            if not spec.ignore_lease_loss:
                raise

    state = ctx.checkpoint_get(CHECKPOINT) or {
        "next": 0,
        "value": hashlib.sha256(spec.seed.encode()).hexdigest(),
        "executed": [],
    }
    for step in range(state["next"], spec.steps):
        fenced(ctx.check_cancelled)
        time.sleep(spec.step_seconds)
        state = {
            "next": step + 1,
            "value": _step_value(state["value"], step),
            "executed": state["executed"] + [[ctx.epoch, step]],
        }
        fenced(lambda: ctx.checkpoint_put(CHECKPOINT, state))
        fenced(lambda: ctx.progress((step + 1) / spec.steps, f"step {step + 1}/{spec.steps}", step=step + 1))
    result = {"value": state["value"], "steps": spec.steps, "executed": state["executed"], "epoch": ctx.epoch}
    if spec.artifact_prefix:
        writer = ctx.artifact(spec.artifact_prefix, overwrite=True)
        fenced(lambda: writer.put_json("result.json", result))
        fenced(lambda: writer.commit({"kind": "count"}))
    return result
