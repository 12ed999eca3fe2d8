"""A sweep's members split over several trainers: in this process, or over Ray actors (one GPU each).

:class:`~sae_shared.sae.training.Trainer` trains every member of a sweep on each batch. Members never interact (each
has its own weights, optimiser, dead-latent counters; the learning-rate schedule and the batch are shared), so a sweep
can be cut into contiguous **groups** of members, each trained by its own ``Trainer``, and give the same SAEs bit for
bit. :class:`TrainerGroups` is that cut behind the ``Trainer`` interface that
:class:`~sae_shared.sae.sharded.ShardSetTraining` drives (``step``, ``state_dict`` / ``load_state_dict``, ``saes``,
``history``, ``step_count``), so the data is still read once per step, whatever the number of groups, and a checkpoint
written with N groups resumes with any other number (its format is the single trainer's).

:class:`RayTrainerGroups` runs each group in a Ray actor: the batch is put in Ray's object store once per step and
every actor steps its members on it at the same time; metrics, checkpoints and the final SAEs come back to the caller
(on CPU), which evaluates them on the held-out split as for one trainer. Ray is imported only there.

::

    run = ShardSetTraining(config, store, acts_id, layer=11,
                           trainer_factory=ray_trainer_factory(actors=4))  # one GPU per actor on a GPU cluster
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from sae_shared.sae.config import TrainConfig
from sae_shared.sae.modeling import SparseAutoencoder
from sae_shared.sae.training import MetricsCallback, Trainer, TrainMetrics


def split_members(n_members: int, n_groups: int) -> list[range]:
    """Contiguous, balanced ranges of member indices (sizes differ by at most one; never an empty group)."""
    if n_members < 1 or n_groups < 1:
        raise ValueError(f"need at least one member and one group, got {n_members} members, {n_groups} groups")
    n_groups = min(n_groups, n_members)
    base, extra = divmod(n_members, n_groups)
    out, start = [], 0
    for g in range(n_groups):
        size = base + (g < extra)
        out.append(range(start, start + size))
        start += size
    return out


def _to_cpu(obj: Any) -> Any:
    """The same structure with every tensor moved to the CPU (state dicts cross processes without a GPU)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class MemberGroup:
    """One group's ``Trainer``, with plain-value methods (what a Ray actor exposes)."""

    def __init__(self, config: TrainConfig, total_steps: int, init_sample_nd: Tensor, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.trainer = Trainer(config, total_steps=total_steps, init_sample_nd=init_sample_nd)

    def step(self, batch_nd: Tensor) -> list[TrainMetrics]:
        return self.trainer.step(batch_nd)

    def state_dict(self) -> dict[str, Any]:
        return _to_cpu(self.trainer.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)

    def saes(self) -> list[SparseAutoencoder]:
        """Copies of the group's SAEs on the CPU."""
        out = []
        for sae in self.trainer.saes:
            copy = SparseAutoencoder(sae.cfg, contract=sae.contract)
            copy.load_state_dict(_to_cpu(sae.state_dict()))
            copy.threshold_updates = sae.threshold_updates
            out.append(copy)
        return out

    def device(self) -> str:
        return str(self.trainer.device)


class TrainerGroups:
    """The ``Trainer`` interface over ``n_groups`` groups of members trained in this process, one after the other.

    Of use on its own to check that grouping changes nothing; :class:`RayTrainerGroups` runs the groups in parallel.
    """

    def __init__(self, config: TrainConfig, *, total_steps: int, init_sample_nd: Tensor,
                 on_metrics: MetricsCallback | None = None, n_groups: int = 2):
        self.config = config
        self.total_steps = total_steps
        self.on_metrics = on_metrics
        self.device = torch.device(config.device)
        self.ranges = split_members(len(config.members), n_groups)
        self.step_count = 0
        self.tokens = 0
        self.window_tokens = 0
        self.history: list[list[TrainMetrics]] = [[] for _ in config.members]
        sub = [dataclasses.replace(config, members=config.members[r.start:r.stop]) for r in self.ranges]
        self._start_groups(sub, total_steps, init_sample_nd)

    # -- what subclasses change: where groups live and how a method runs on all of them ---------------------------

    def _start_groups(self, configs: list[TrainConfig], total_steps: int, init_sample_nd: Tensor) -> None:
        self.groups = [MemberGroup(c, total_steps, init_sample_nd) for c in configs]

    def _map(self, method: str, args_per_group: Sequence[tuple] | None = None, shared: tuple = ()) -> list[Any]:
        """``method`` called on every group (with that group's args, or ``shared``); results in group order."""
        return [getattr(g, method)(*(args_per_group[i] if args_per_group else shared))
                for i, g in enumerate(self.groups)]

    # -- the Trainer interface -----------------------------------------------------------------------------------

    def step(self, batch_nd: Tensor) -> list[TrainMetrics]:
        """One optimiser step of every member on ``batch_nd``; the metrics logged, members numbered sweep-wide."""
        logged: list[TrainMetrics] = []
        for r, group_logged in zip(self.ranges, self._map("step", shared=(batch_nd,))):
            for m in group_logged:
                m = m._replace(member=r.start + m.member)
                self.history[m.member].append(m)
                logged.append(m)
        logged.sort(key=lambda m: m.member)
        if self.on_metrics is not None:
            for m in logged:
                self.on_metrics(m)
        self.step_count += 1
        self.tokens += batch_nd.shape[0]
        self.window_tokens = 0 if logged else self.window_tokens + batch_nd.shape[0]
        return logged

    def state_dict(self) -> dict[str, Any]:
        """The single trainer's checkpoint format: the groups' members concatenated in sweep order."""
        states = self._map("state_dict")
        members = [m for s in states for m in s["members"]]
        for member, history in zip(members, self.history):  # a group numbers its members from 0
            member["history"] = [m._asdict() for m in history]
        return {"step_count": self.step_count, "tokens": self.tokens, "window_tokens": self.window_tokens,
                "members": members}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        members = state["members"]
        if len(members) != len(self.config.members):
            raise ValueError(f"checkpoint has {len(members)} members, this sweep {len(self.config.members)}")
        counters = {k: state[k] for k in ("step_count", "tokens", "window_tokens")}
        self._map("load_state_dict", [({**counters, "members": members[r.start:r.stop]},) for r in self.ranges])
        self.step_count, self.tokens, self.window_tokens = (int(state[k]) for k in counters)
        self.history = [[TrainMetrics(**m) for m in member["history"]] for member in members]

    @property
    def saes(self) -> list[SparseAutoencoder]:
        """Every member's SAE, in sweep order, on this trainer's device (copies, for evaluation and saving)."""
        return [sae.to(self.device) for group in self._map("saes") for sae in group]

    def close(self) -> None:
        self.groups = []


class RayTrainerGroups(TrainerGroups):
    """:class:`TrainerGroups` with each group in a Ray actor; every step runs on all actors at once.

    ``options`` are the actors' Ray resources (default: one GPU each where the cluster has GPUs, else a share of the
    free CPUs) plus ``threads`` (torch threads per actor). Ray is joined (``RAY_ADDRESS``) or started locally if it
    is not running, as for recording.
    """

    def __init__(self, config: TrainConfig, *, total_steps: int, init_sample_nd: Tensor,
                 on_metrics: MetricsCallback | None = None, n_groups: int = 2, options: dict | None = None,
                 start_timeout_s: float = 600.0):
        self._options = dict(options or {})
        self._start_timeout_s = start_timeout_s
        super().__init__(config, total_steps=total_steps, init_sample_nd=init_sample_nd, on_metrics=on_metrics,
                         n_groups=n_groups)

    def _start_groups(self, configs: list[TrainConfig], total_steps: int, init_sample_nd: Tensor) -> None:
        import ray

        from sae_shared.record_actors import actor_resources, default_ray_init

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            ray.init(**default_ray_init())
        resources, threads = actor_resources(len(configs), self._options)
        self.resources = resources
        on_gpu = bool(resources.get("num_gpus"))
        actor_cls = ray.remote(MemberGroup).options(**resources)
        sample_ref = ray.put(init_sample_nd.cpu())
        self.groups = [
            actor_cls.remote(dataclasses.replace(c, device="cuda" if on_gpu else "cpu"), total_steps, sample_ref,
                             threads)
            for c in configs
        ]
        try:
            self._get([g.device.remote() for g in self.groups], "starting the training actors", self._start_timeout_s)
        except BaseException:
            self.close()  # actors that did start would hold their CPUs / GPUs
            raise

    def _get(self, refs, what: str, timeout: float | None = None):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            raise RuntimeError(f"{what}: Ray did not start {len(self.groups)} actors with {self.resources} within "
                               f"{timeout:g} s (cluster: {ray.cluster_resources()})") from None
        except RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, ValueError):  # bad input (an unreadable checkpoint...): keeps its type for the caller
                raise cause from None
            raise RuntimeError(f"{what} failed in a training actor: {cause}") from None
        except RayActorError as exc:
            raise RuntimeError(f"{what}: a training actor died: {exc}") from None

    def _map(self, method: str, args_per_group: Sequence[tuple] | None = None, shared: tuple = ()) -> list[Any]:
        import ray

        if shared and isinstance(shared[0], Tensor):
            shared = (ray.put(shared[0].cpu()),) + shared[1:]  # one copy in the object store for every actor
        refs = [getattr(g, method).remote(*(args_per_group[i] if args_per_group else shared))
                for i, g in enumerate(self.groups)]
        return self._get(refs, method)

    def close(self) -> None:
        import ray

        for g in self.groups:
            ray.kill(g)
        self.groups = []


TrainerFactory = Callable[..., Any]
"""``factory(config, total_steps=..., init_sample_nd=..., on_metrics=...)`` -> a Trainer-like object."""


def ray_trainer_factory(actors: int, options: dict | None = None) -> TrainerFactory:
    """A factory for :class:`~sae_shared.sae.sharded.ShardSetTraining` that spreads the sweep over ``actors`` Ray
    actors (fewer when the sweep has fewer members)."""
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")

    def make(config: TrainConfig, **kwargs: Any) -> RayTrainerGroups:
        return RayTrainerGroups(config, n_groups=actors, options=options, **kwargs)

    return make
