"""Which function runs each job type.

A handler is ``fn(ctx: JobContext) -> result`` (see :mod:`services.worker.context`). Built-in handlers are named
here by import path and imported only when a worker serves their type, so a worker for ``count`` jobs never imports
torch. Other code (or a test) may add handlers with :func:`register`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from sae_shared.jobs import JOB_TYPES

BUILTIN: dict[str, str] = {
    "count": "services.worker.handlers:run_count",
    "record": "services.worker.record_handler:run_record",
    "train": "services.worker.train_handler:run_train",
    "analyze": "services.worker.analyze_handler:run_analyze",
    "train-head": "services.worker.train_head_handler:run_train_head",
    "experiment": "services.worker.experiment_handler:run_experiment",
}
"""Job type -> ``module:function`` of its handler."""


@dataclass(frozen=True)
class Handler:
    """A registered handler."""

    type: str
    fn: Callable[[Any], Any]


_REGISTERED: dict[str, Handler] = {}


class UnknownJobType(LookupError):
    """No handler for a job type; the message lists the types that have one."""


def register(job_type: str, fn: Callable[[Any], Any] | None = None) -> Any:
    """Register ``fn`` as the handler of ``job_type`` (usable as a decorator: ``@register("train")``)."""
    if job_type not in JOB_TYPES:
        raise UnknownJobType(f"{job_type!r} is not a job type ({', '.join(JOB_TYPES)})")

    def add(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        _REGISTERED[job_type] = Handler(job_type, f)
        return f

    return add(fn) if fn is not None else add


def available_types() -> list[str]:
    """Job types that have a handler, in the glossary's order."""
    return [t for t in JOB_TYPES if t in _REGISTERED or t in BUILTIN]


def get_handler(job_type: str) -> Handler:
    """The handler of ``job_type``, importing a built-in one on first use."""
    if job_type in _REGISTERED:
        return _REGISTERED[job_type]
    if job_type in BUILTIN:
        module_name, _, attr = BUILTIN[job_type].partition(":")
        fn = getattr(importlib.import_module(module_name), attr)
        return _REGISTERED.setdefault(job_type, Handler(job_type, fn))
    raise UnknownJobType(
        f"no handler for job type {job_type!r} in this worker (types with a handler: {', '.join(available_types())})"
    )
