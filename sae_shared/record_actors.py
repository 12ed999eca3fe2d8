"""Scale-out of :func:`sae_shared.recording.record` over Ray actors.

Each actor is a :class:`~sae_shared.recording.RecordWorker` (the class that also runs in-process with
``workers=0``) holding its own backbone, opening its own connection to the object store (from a
:class:`~sae_shared.recording.StoreRecipe`) and uploading the shards it records itself: shard bytes never pass
through the driver or Ray's object store, so the driver stays light however many actors there are.

The driver hands out shard indices dynamically, two in flight per actor (one computing, one queued so its images are
decoded while the other finishes), and collects each actor's finished shards with a blocking ``results`` call
(the actors are threaded: ``max_concurrency`` > 1 lets ``submit`` and ``results`` run side by side).

Resources: one GPU per actor where the cluster has GPUs; otherwise a *fraction* of a CPU, so that the actors are
placed even when other work (Ray Serve replicas) holds CPUs, and torch threads split the cores between them. The
code is the same on a laptop and a cluster: ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` when set, or
starts a local one. Ray is imported only here, when ``workers >= 1``.
"""

from __future__ import annotations

import os
from typing import Any

from sae_shared.recording import RecordingError, RecordWorker, ShardJob, ShardResult

DESCRIBE_TIMEOUT_S = 600.0
"""How long the actors may take to start and load their backbones before the recording gives up."""


def ray_is_running() -> bool:
    import ray

    return ray.is_initialized()


def default_ray_init(overrides: dict | None = None) -> dict:
    """``ray.init`` arguments: join ``RAY_ADDRESS`` when set, else start a local instance on loopback without
    dashboard (``address="local"``: never the cluster that ``/tmp/ray/ray_current_cluster`` names, which may be
    someone else's, or gone)."""
    args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        args.update(address="local", _node_ip_address="127.0.0.1")
    args.update(overrides or {})
    return args


def actor_resources(n: int, options: dict | None = None) -> tuple[dict, int]:
    """(Ray resources per actor, torch threads per actor) for ``n`` actors on the connected cluster."""
    import ray

    options = dict(options or {})
    threads = options.pop("threads", None)
    total = ray.cluster_resources()
    if not ({"num_cpus", "num_gpus"} & set(options)):
        if total.get("GPU", 0) >= 1:
            options.update(num_gpus=1, num_cpus=min(1.0, max(0.01, total.get("CPU", 1) / n)))
        else:
            free = ray.available_resources().get("CPU", 0.0)
            options["num_cpus"] = round(min(1.0, max(0.01, free / n)), 2)
    if threads is None:
        cpus = total.get("CPU", os.cpu_count() or 1)
        threads = max(1, int(min(cpus, os.cpu_count() or 1) // n)) if not options.get("num_gpus") else 2
    return options, int(threads)


class RayPool:
    """``n`` RecordWorker actors behind the interface :func:`~sae_shared.recording.record` drives."""

    def __init__(self, n: int, store_recipe, dataset_ref, backbone, *, dtype: str, options: dict | None = None,
                 ray_init: dict | None = None, upload_threads: int = 2, prefetch_batches: int = 2):
        import ray

        if n < 1:
            raise RecordingError(f"workers must be >= 1 for Ray, got {n}")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.owns_ray = False
        if not ray.is_initialized():
            ray.init(**default_ray_init(ray_init))
            self.owns_ray = True
        self.n = n
        resources, threads = actor_resources(n, options)
        self.resources = resources
        from sae_shared.backbones import Backbone

        backbone_arg = ray.put(backbone) if isinstance(backbone, Backbone) else backbone
        actor_cls = ray.remote(RecordWorker).options(max_concurrency=4, **resources)
        self.actors = [
            actor_cls.remote(store_recipe, dataset_ref, backbone_arg, dtype=dtype, threads=threads,
                             upload_threads=upload_threads, prefetch_batches=prefetch_batches)
            for _ in range(n)
        ]
        self._pending: dict[int, Any] = {}

    def _get(self, refs, what: str, timeout: float | None = None):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            raise RecordingError(
                f"{what}: Ray did not start {self.n} record workers with {self.resources} within {timeout:g} s "
                f"(cluster: {ray.cluster_resources()}, free: {ray.available_resources()})") from None
        except RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, RecordingError):
                raise RecordingError(f"{what}: {cause}") from None
            raise RecordingError(f"{what} failed on a record worker: {exc}") from None
        except RayActorError as exc:
            raise RecordingError(f"{what}: a record worker died: {exc}") from None

    def describe(self) -> list[dict]:
        return self._get([a.describe.remote() for a in self.actors], "starting the record workers",
                         DESCRIBE_TIMEOUT_S)

    def scan(self, indices: list[int]) -> list[dict]:
        chunks = [indices[i::self.n] for i in range(self.n)]
        found = self._get([a.scan.remote(c) for a, c in zip(self.actors, chunks)], "scanning images")
        return sorted((s for part in found for s in part), key=lambda s: s["index"])

    def start(self, job: ShardJob) -> None:
        import ray

        job_ref = ray.put(job)
        self._get([a.start.remote(job_ref) for a in self.actors], "starting the recording")

    def submit(self, w: int, shard: int) -> None:
        self.actors[w].submit.remote(shard)

    def poll(self, timeout: float) -> list[tuple[int, ShardResult]]:
        import ray

        for w, actor in enumerate(self.actors):
            if w not in self._pending:
                self._pending[w] = actor.results.remote(1.0)
        by_ref = {ref: w for w, ref in self._pending.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            w = by_ref[ref]
            del self._pending[w]
            out += [(w, r) for r in self._get(ref, f"collecting shards from worker {w}")]
        return out

    def close(self, abort: bool = False) -> None:
        import ray

        try:
            if not abort:
                self._get([a.close.remote(True) for a in self.actors], "closing the record workers", 600)
        finally:
            for actor in self.actors:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.actors = []
            self._pending = {}
