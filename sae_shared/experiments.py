"""Batch intervention experiments (job type ``experiment``): an edit plan over a dataset, next to baselines.

An experiment names a backbone, a layer, an SAE, a head and a dataset (DESIGN.md §1, the paper's CUB-200 and ADE20K
experiments). Its **edit plan** is a list of :class:`PlanEntry`: latents edited together, optionally only in the
patches of one target class. The plan is either given (explicit latents) or **automatic per class**: for each class,
the latent that best predicts that class's patches, by the best F1 over activation thresholds and patch-purity
thresholds (:class:`LatentSelector`, after the reference code's ``get_latent_lookup``). With
``selection="f1-attribution"`` (models in process) the choice is made among the ``candidates`` best detectors of
the class: the one whose removal is estimated to lower the class's logit the most on the selection images (the
head's gradient at layer L times the latent's contribution ``f_s · decode direction_s``, summed over the patches
edited: every patch for a classifier, the class's patches for a segmenter, whose per-patch logits of the class are
summed; a first-order estimate, as attribution patching makes). A good detector is not always what the head reads:
on a small SAE the best face-patch detector can even raise a face probe's logit when removed.

Every entry runs with two **baselines** in the same pass over the data:

- ``random-latent``: the same edit on as many random latents (alive, not dense, not in the entry), seeded;
- ``random-direction``: instead of the SAE edit, a random unit direction (one per entry, seeded) added to every
  edited token with the norm of that token's SAE edit (``‖decode(f') - decode(f)‖``).

For each image the forward to layer L runs once (:meth:`Intervener.prepare`); every entry and baseline reuses it.

**Outputs.** Per (image, entry) a JSON-ready record with each arm's result; an aggregate report per arm:

- classification: ``flip_rate`` (share of images whose predicted class changes) and ``prob_drop`` (mean drop of the
  target class's probability; the target is the entry's class, or the unedited prediction when the entry has none);
- segmentation: ``target_change_rate`` (share of the class's patches whose predicted class changes),
  ``other_change_rate`` (share of the other patches of the same images that change) and ``target_prob_drop`` (mean
  over images of the drop of the class's probability averaged over its patches: a graded effect where no patch
  changes class), pooled and as mean / std across classes (the spread);
- for every arm the off-target drift (``sae_shared.interventions.Drift``, averaged over images).

The class's patches come from the dataset's masks (majority vote per patch; ``labels="dataset"``) or from the head's
own unedited prediction (``labels="prediction"``: e.g. the saliency head on unlabelled photos); image classes from
the dataset's labels or the unedited prediction.

**In process or through the services.** The backbone, SAE and head are used through a small interface
(``preprocess_batch``, ``forward_to``, ``forward_from``, ``layout``, ``id``; ``encode``, ``decode``,
``decode_change``, ``d_sae``, ``contract``, ``stats``; ``predict``, ``classes``, ``task``, ``kind``), which the
library's models implement and so do the stand-ins of :mod:`sae_shared.remote`, computing through the activations,
SAE and task-head services. Both give the same numbers, up to float rounding
(tests/services/test_experiment_via_services.py).

**Resumable.** :class:`Experiment` is a loop over image batches whose whole progress lives in an
:class:`ExperimentState` (JSON + tensors, :meth:`ExperimentState.to_checkpoint`). A job checkpoints the state after
each :meth:`Experiment.step` together with that step's records; a resumed run continues from the checkpoint and its
aggregate equals an undisturbed run's (every random draw is a function of the seed and the entry, and sums are
accumulated in image order).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from sae_shared.heads import TaskHead, mask_to_input, patch_majority
from sae_shared.interventions import AllPatches, Edit, EditOp, Intervener, InterventionResult, PatchMask, Prepared

STATE_SCHEMA = 1
ARMS: tuple[str, ...] = ("sae", "random-latent", "random-direction")
"""The planned edit, then the two baselines."""
BASELINES: tuple[str, ...] = ARMS[1:]
DRIFT_KEYS: tuple[str, ...] = ("mean_abs", "max_abs", "relative", "flips_per_token", "target_error")


# --------------------------------------------------------------------------------------------------------------
# Plan and configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanEntry:
    """Latents edited together, in the patches of ``target_class`` (or every patch of every image when None)."""

    latents: tuple[int, ...]
    """Latents edited (all with the experiment's op and value)."""
    target_class: int | None = None
    """Class whose images (classification) or patches (segmentation) are edited; None: all."""
    random_latents: tuple[int, ...] = ()
    """The random-latent baseline's latents (drawn when the plan is made if empty)."""
    score: float | None = None
    """Automatic plans: the latent's best F1 for the class."""
    activation_threshold: float | None = None
    """Automatic plans: the activation threshold of that F1."""
    purity_threshold: float | None = None
    """Automatic plans: the patch-purity threshold of that F1."""
    attribution: float | None = None
    """Automatic plans with ``selection="f1-attribution"``: the estimated drop of the class's logit per selection
    image when the latent is removed."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "latents", tuple(int(i) for i in self.latents))
        object.__setattr__(self, "random_latents", tuple(int(i) for i in self.random_latents))
        if not self.latents or any(i < 0 for i in self.latents):
            raise ValueError(f"a plan entry needs at least one latent index >= 0, got {self.latents}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["latents"], d["random_latents"] = list(self.latents), list(self.random_latents)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlanEntry:
        return cls(**{**d, "latents": tuple(d["latents"]), "random_latents": tuple(d.get("random_latents", ()))})


@dataclass(frozen=True)
class ExperimentConfig:
    """What to edit, where, how, and over which images."""

    layer: int | None = None
    """Block whose output is edited (0-based); None: the SAE's contract layer."""
    latents: tuple[int, ...] = ()
    """Explicit plan: these latents, edited together in every patch of every image. Empty: see ``plan``."""
    plan: tuple[PlanEntry, ...] | None = None
    """A full explicit plan (overrides ``latents``). With neither, the plan is automatic per class."""
    classes: tuple[int, ...] | None = None
    """Automatic plans: the classes to plan for (None: every class seen in the selection images but background)."""
    background: int | None = None
    """Class never planned for (ADE20K / saliency: 0)."""
    op: EditOp = "set"
    """Edit applied to each planned latent: 'set', 'scale' or 'add'."""
    value: float = 0.0
    """Its operand; the default ('set', 0) suppresses the latent."""
    relative: bool = False
    """``value`` in units of each latent's observed maximum (the SAE's saved statistics)."""
    baselines: tuple[str, ...] = BASELINES
    """Baselines run beside every entry: 'random-latent', 'random-direction'."""
    activation_thresholds: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)
    """Automatic plans: a latent 'predicts' a patch when its activation exceeds the threshold."""
    purity_thresholds: tuple[float, ...] = (0.5, 0.75, 1.0)
    """Automatic plans: patches count only when this share of their pixels hold their majority class."""
    max_frequency: float = 1e-2
    """Automatic plans and random latents: latents firing more often than this (dense) are not chosen."""
    selection: Literal["f1", "f1-attribution"] = "f1"
    """Automatic plans: 'f1' takes each class's best detector; 'f1-attribution' (models in process) the one among
    its ``candidates`` best detectors whose removal is estimated to lower the class's logit most."""
    candidates: int = 10
    """Detectors per class that ``selection="f1-attribution"`` chooses among."""
    labels: Literal["auto", "dataset", "prediction"] = "auto"
    """Where class labels come from: 'dataset' (image labels / masks), 'prediction' (the head's unedited output),
    'auto' (the dataset's when it has them)."""
    images: tuple[int, int] | None = None
    """Experiment images ``[start, stop)`` of the dataset (None: all)."""
    max_images: int | None = None
    """Cap on the experiment images."""
    selection_images: tuple[int, int] | None = None
    """Automatic plans: images used to choose latents (None: the experiment's own)."""
    batch_size: int = 8
    """Images per step (one checkpoint per step)."""
    seed: int = 0
    """Seeds the baselines' random latents and directions."""

    def __post_init__(self) -> None:
        if self.op not in ("set", "scale", "add"):
            raise ValueError(f"op must be 'set', 'scale' or 'add', got {self.op!r}")
        if self.relative and self.op == "scale":
            raise ValueError("relative=True does not apply to 'scale'")
        if not math.isfinite(self.value):
            raise ValueError("value must be finite")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; known: {', '.join(BASELINES)}")
        if self.labels not in ("auto", "dataset", "prediction"):
            raise ValueError(f"labels must be 'auto', 'dataset' or 'prediction', got {self.labels!r}")
        if self.selection not in ("f1", "f1-attribution"):
            raise ValueError(f"selection must be 'f1' or 'f1-attribution', got {self.selection!r}")
        if self.candidates <= 0:
            raise ValueError("candidates must be positive")
        removal = (self.op, self.value, self.relative) == ("set", 0.0, False)
        if self.plan is None and not self.latents and self.selection == "f1-attribution" and not removal:
            raise ValueError("selection='f1-attribution' ranks latents by the estimated effect of removing them: use "
                             "op='set' with value 0 (or selection='f1')")
        if self.batch_size <= 0 or (self.max_images is not None and self.max_images <= 0):
            raise ValueError("batch_size and max_images must be positive")
        if not self.activation_thresholds or not self.purity_thresholds:
            raise ValueError("activation_thresholds and purity_thresholds need at least one value each")
        if self.plan is not None:
            object.__setattr__(self, "plan", tuple(p if isinstance(p, PlanEntry) else PlanEntry.from_json(p)
                                                   for p in self.plan))
        object.__setattr__(self, "latents", tuple(int(i) for i in self.latents))

    @property
    def automatic(self) -> bool:
        return self.plan is None and not self.latents

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"] = None if self.plan is None else [p.to_json() for p in self.plan]
        return json.loads(json.dumps(d))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExperimentConfig:
        tup = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k != "plan"}
        plan = d.get("plan")
        return cls(**tup, plan=None if plan is None else tuple(PlanEntry.from_json(p) for p in plan))


# --------------------------------------------------------------------------------------------------------------
# Automatic latent selection
# --------------------------------------------------------------------------------------------------------------


class SelectedLatent(NamedTuple):
    """The best latent for one class."""

    target_class: int
    latent: int
    f1: float
    activation_threshold: float
    purity_threshold: float
    n_patches: int
    """Patches of the class at that purity threshold."""
    attribution: float | None = None
    """With attribution (:meth:`LatentSelector.best` ``candidates``): the estimated logit drop per image."""


class LatentSelector:
    """Streaming F1 of every latent as a detector of every class's patches, over threshold grids.

    For purity threshold p (patches whose majority class holds at least that share of pixels), activation threshold
    t and latent s: TP = patches of class c where f_s > t, and F1 = 2TP / (2TP + FP + FN) = 2TP / (fires + n_c).
    Counts are int32 tensors ``[C, P, T, S]`` (TP), ``[P, T, S]`` (fires), ``[C, P]`` (class sizes).
    """

    def __init__(self, n_classes: int, d_sae: int, activation_thresholds: Sequence[float],
                 purity_thresholds: Sequence[float], device: torch.device | str = "cpu"):
        self.n_classes, self.d_sae = n_classes, d_sae
        self.thresholds = [float(t) for t in activation_thresholds]
        self.purities = [float(p) for p in purity_thresholds]
        self.act_t = torch.tensor(self.thresholds, dtype=torch.float64)
        self.purity_t = torch.tensor(self.purities, dtype=torch.float64)
        p, t = len(self.purities), len(self.thresholds)
        self.tp = torch.zeros(n_classes, p, t, d_sae, dtype=torch.int32, device=device)
        self.fires = torch.zeros(p, t, d_sae, dtype=torch.int32, device=device)
        self.n_class = torch.zeros(n_classes, p, dtype=torch.int32, device=device)
        self.attribution: Tensor | None = None
        """Optional ``[C, S]`` float64: summed estimated drops of each class's logit when a latent is removed
        (:meth:`update_attribution`), and ``attribution_n`` ``[C]`` the images summed."""
        self.attribution_n: Tensor | None = None

    @torch.no_grad()
    def update_attribution(self, drop_bs: Tensor, classes_b: Tensor) -> None:
        """Fold in estimated drops ``[K, S]``, one row per (image, class), of the class's logit (``classes_b``
        ``[K]``: each row's class)."""
        if self.attribution is None:
            self.attribution = torch.zeros(self.n_classes, self.d_sae, dtype=torch.float64)
            self.attribution_n = torch.zeros(self.n_classes, dtype=torch.float64)
        classes_b = classes_b.cpu().long()
        self.attribution.index_add_(0, classes_b, drop_bs.detach().cpu().double())
        self.attribution_n.index_add_(0, classes_b, torch.ones(len(classes_b), dtype=torch.float64))

    @torch.no_grad()
    def update(self, codes_ns: Tensor, labels_n: Tensor, purity_n: Tensor | None = None) -> None:
        """Fold in patches: codes ``[n, d_sae]``, class labels ``[n]``, purity ``[n]`` (None: all pure)."""
        dev = self.tp.device
        codes_ns, labels_n = codes_ns.to(dev), labels_n.to(dev).long()
        purity_n = torch.ones(len(labels_n), device=dev) if purity_n is None else purity_n.to(dev).float()
        if labels_n.numel() and (int(labels_n.min()) < 0 or int(labels_n.max()) >= self.n_classes):
            raise ValueError(f"patch labels must be in [0, {self.n_classes})")
        for pi, p in enumerate(self.purities):
            keep = purity_n >= p - 1e-6
            codes_v, labels_v = codes_ns[keep], labels_n[keep]
            self.n_class[:, pi] += torch.bincount(labels_v, minlength=self.n_classes).int()
            for ti, t in enumerate(self.thresholds):
                fires_vs = (codes_v > t).int()
                self.fires[pi, ti] += fires_vs.sum(0, dtype=torch.int32)
                self.tp[:, pi, ti].index_add_(0, labels_v, fires_vs)

    def f1(self) -> Tensor:
        """``[C, P, T, S]`` float64 F1 (0 where a class or latent never occurred)."""
        den = self.fires.double()[None] + self.n_class.double()[:, :, None, None]
        return torch.where(den > 0, 2 * self.tp.double() / den.clamp_min(1), torch.zeros_like(den))

    def best(self, classes: Sequence[int], allowed_s: Tensor | None = None, *,
             candidates: int | None = None) -> list[SelectedLatent]:
        """The best latent of each class in ``classes`` that occurred (ties: the first in (purity, threshold,
        latent) order). ``allowed_s`` (bool ``[d_sae]``) excludes the rest. With ``candidates`` (and attribution
        folded in), among the class's ``candidates`` best detectors the one with the largest estimated logit drop."""
        f1 = self.f1().cpu()
        if allowed_s is not None:
            f1 = f1.masked_fill(~allowed_s.cpu().bool()[None, None, None], -1.0)
        if candidates is not None and self.attribution is None:
            raise ValueError("attribution-based choice needs update_attribution() first")
        out = []
        p_n, t_n = len(self.purities), len(self.thresholds)
        for c in classes:
            if not 0 <= c < self.n_classes or int(self.n_class[c].max()) == 0:
                continue
            drop = None
            if candidates is None:
                flat = int(torch.argmax(f1[c].reshape(-1)))
                pi, rest = divmod(flat, t_n * self.d_sae)
                ti, s = divmod(rest, self.d_sae)
            else:
                best_s = f1[c].reshape(-1, self.d_sae).max(0).values  # each latent's best F1 over (purity, threshold)
                pool = torch.argsort(best_s, descending=True, stable=True)[:candidates]
                pool = pool[best_s[pool] > 0]  # allowed latents that detect the class at all
                if not len(pool) or float(self.attribution_n[c]) == 0:
                    continue
                per_image = self.attribution[c] / self.attribution_n[c]
                s = int(pool[int(torch.argmax(per_image[pool]))])
                drop = float(per_image[s])
                pi, ti = divmod(int(torch.argmax(f1[c, :, :, s].reshape(-1))), t_n)
            assert pi < p_n
            out.append(SelectedLatent(int(c), s, float(f1[c, pi, ti, s]), self.thresholds[ti], self.purities[pi],
                                      int(self.n_class[c, pi]), drop))
        return out

    def seen_classes(self) -> list[int]:
        return [int(c) for c in (self.n_class[:, 0] > 0).nonzero().squeeze(1).tolist()]

    def state_dict(self) -> dict[str, Tensor]:
        state = {"tp": self.tp.cpu(), "fires": self.fires.cpu(), "n_class": self.n_class.cpu(),
                 "activation_thresholds": self.act_t, "purity_thresholds": self.purity_t}
        if self.attribution is not None:
            state["attribution"], state["attribution_n"] = self.attribution, self.attribution_n
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not (torch.equal(state["activation_thresholds"], self.act_t)
                and torch.equal(state["purity_thresholds"], self.purity_t)):
            raise ValueError("the checkpointed selector used other thresholds than this experiment")
        dev = self.tp.device
        self.tp, self.fires, self.n_class = (state["tp"].to(dev), state["fires"].to(dev), state["n_class"].to(dev))
        self.attribution, self.attribution_n = state.get("attribution"), state.get("attribution_n")


def allowed_latents(sae, max_frequency: float) -> Tensor:
    """Latents eligible for plans and baselines: firing at all and at most ``max_frequency`` of the time (all
    latents when the SAE has no statistics)."""
    if sae.stats is None:
        return torch.ones(sae.d_sae, dtype=torch.bool)
    freq = sae.stats.frequency
    return (freq > 0) & (freq <= max_frequency)


def draw_random_latents(allowed_s: Tensor, exclude: Sequence[int], k: int, seed: int, entry: int) -> tuple[int, ...]:
    """``k`` distinct random latents among the allowed ones, not in ``exclude``; a function of (seed, entry)."""
    pool = allowed_s.clone()
    pool[list(exclude)] = False
    candidates = pool.nonzero().squeeze(1).numpy()
    if len(candidates) < k:
        candidates = np.setdiff1d(np.arange(len(allowed_s)), np.asarray(exclude, dtype=np.int64))
    rng = np.random.default_rng([seed, entry, 0])
    return tuple(int(i) for i in np.sort(rng.choice(candidates, size=k, replace=False)))


def random_direction(seed: int, entry: int, d_model: int) -> Tensor:
    """A unit vector ``[d_model]``, a function of (seed, entry)."""
    v = torch.from_numpy(np.random.default_rng([seed, entry, 1]).standard_normal(d_model)).float()
    return v / v.norm()


# --------------------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ExperimentState:
    """All progress of an experiment: enough to resume it exactly (:meth:`to_checkpoint`)."""

    fingerprint: str
    """Digest of the configuration, models and images; a checkpoint resumes only the experiment that wrote it."""
    phase: Literal["select", "run", "done"] = "run"
    """'select' (automatic plan: counting F1 over the selection images), 'run', 'done'."""
    position: int = 0
    """Images of the current phase already processed."""
    plan: list[PlanEntry] | None = None
    """The edit plan (set when the run phase starts)."""
    totals: dict[str, Any] = field(default_factory=dict)
    """Accumulators per entry and arm (see ``Experiment.report``)."""
    n_records: int = 0
    """Per-image records produced so far."""
    n_skipped: int = 0
    """Images that could not be read."""
    steps: int = 0
    """Steps taken (each one batch)."""
    selector: dict[str, Tensor] | None = None
    """The selection phase's counts (tensors)."""

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(JSON document, tensors): save both (e.g. ``state.json`` + ``selector.safetensors``)."""
        doc = {"schema": STATE_SCHEMA, "fingerprint": self.fingerprint, "phase": self.phase,
               "position": self.position, "plan": None if self.plan is None else [p.to_json() for p in self.plan],
               "totals": self.totals, "n_records": self.n_records, "n_skipped": self.n_skipped, "steps": self.steps}
        return doc, dict(self.selector or {})

    def to_bytes(self) -> bytes:
        """The whole state as one safetensors file (the JSON document in its header metadata): one object per
        resume point, as job checkpoints want."""
        doc, tensors = self.to_checkpoint()
        return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"experiment_state": json.dumps(doc)})

    @classmethod
    def from_bytes(cls, data: bytes) -> ExperimentState:
        """Inverse of :meth:`to_bytes`."""
        try:
            (n,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
            doc = json.loads(meta["experiment_state"])
            tensors = st_load(bytes(data))
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not an experiment state checkpoint: {exc}") from None
        return cls.from_checkpoint(doc, tensors)

    @classmethod
    def from_checkpoint(cls, doc: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> ExperimentState:
        if doc.get("schema") != STATE_SCHEMA:
            raise ValueError(f"experiment state has schema {doc.get('schema')!r}; this version reads {STATE_SCHEMA}")
        plan = doc.get("plan")
        return cls(fingerprint=doc["fingerprint"], phase=doc["phase"], position=int(doc["position"]),
                   plan=None if plan is None else [PlanEntry.from_json(p) for p in plan],
                   totals=doc.get("totals") or {}, n_records=int(doc.get("n_records", 0)),
                   n_skipped=int(doc.get("n_skipped", 0)), steps=int(doc.get("steps", 0)),
                   selector=dict(tensors) if tensors else None)


class ExperimentResult(NamedTuple):
    """What :meth:`Experiment.run` returns."""

    report: dict[str, Any]
    """The aggregate report (JSON-ready)."""
    records: list[dict[str, Any]]
    """Per-image records produced by this call (a resumed run returns only the new ones)."""
    state: ExperimentState
    """The final state."""


# --------------------------------------------------------------------------------------------------------------
# The experiment loop
# --------------------------------------------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class Experiment:
    """A resumable loop over image batches: ``state = exp.new_state()``, then ``exp.step(state)`` until
    ``state.phase == "done"``; ``exp.report(state)`` aggregates at any time."""

    def __init__(self, config: ExperimentConfig, backbone, sae, head: TaskHead, dataset, *,
                 check_contract: bool = True):
        self.config, self.dataset = config, dataset
        self.iv = Intervener(backbone, sae, head, layer=config.layer, check_contract=check_contract)
        self.backbone, self.sae, self.head = backbone, sae, head
        self.task = head.task
        self.images = self._range(config.images, config.max_images)
        self.selection = self._range(config.selection_images, None) if config.selection_images else self.images
        self._position = {i: p for p, i in enumerate(self.images)}
        self.allowed = allowed_latents(sae, config.max_frequency)
        if config.relative:
            sae.require_stats()  # fail now, not after the selection phase
        for e in self._explicit_plan() or []:
            if max(e.latents + e.random_latents) >= sae.d_sae:
                raise ValueError(f"plan latent out of range: this SAE has {sae.d_sae} latents, entry {e}")
            if e.target_class is not None and not 0 <= e.target_class < head.n_classes:
                raise ValueError(f"plan class {e.target_class} is not one of the head's {head.n_classes} classes")
        bad = [c for c in (config.classes or ()) if not 0 <= c < head.n_classes]
        if bad:
            raise ValueError(f"classes {bad} are not among the head's {head.n_classes} classes")
        if self.task == "segment" and self._use_dataset_labels() and getattr(backbone, "transform", None) is None:
            raise ValueError("patch labels from the dataset's masks need the backbone's image transform, which this "
                             f"backbone ({backbone!r}) does not have (a served backbone); run in process, or use "
                             "labels='prediction'")
        if config.selection == "f1-attribution" and config.automatic:
            if not getattr(backbone, "differentiable", True) or not getattr(head, "differentiable", True):
                raise ValueError("selection='f1-attribution' needs the head's gradient, which served models do not "
                                 "give; run in process, or use selection='f1'")
        self.fingerprint = self._fingerprint()

    # -- setup ----------------------------------------------------------------------------------------------------

    def _range(self, span: tuple[int, int] | None, cap: int | None) -> list[int]:
        n = len(self.dataset)
        lo, hi = (0, n) if span is None else (max(0, span[0]), min(n, span[1]))
        idx = list(range(lo, hi))
        return idx[:cap] if cap is not None else idx

    def _explicit_plan(self) -> list[PlanEntry] | None:
        c = self.config
        if c.plan is not None:
            return list(c.plan)
        if c.latents:
            return [PlanEntry(c.latents)]
        return None

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.config.to_json(), sort_keys=True).encode())
        h.update(json.dumps([self.backbone.id, self.iv.layer, self.sae.d_sae, self.head.kind, self.head.classes,
                             getattr(self.dataset, "id", ""), self.images, self.selection]).encode())
        return h.hexdigest()[:16]

    def _with_baselines(self, plan: list[PlanEntry]) -> list[PlanEntry]:
        out = []
        for k, e in enumerate(plan):
            if not e.random_latents:
                e = PlanEntry(e.latents, e.target_class,
                              draw_random_latents(self.allowed, e.latents, len(e.latents), self.config.seed, k),
                              e.score, e.activation_threshold, e.purity_threshold, e.attribution)
            out.append(e)
        return out

    def new_state(self) -> ExperimentState:
        """The state before the first step."""
        plan = self._explicit_plan()
        if plan is None:
            sel = LatentSelector(self.head.n_classes, self.sae.d_sae, self.config.activation_thresholds,
                                 self.config.purity_thresholds, device=self.sae.W_dec.device)
            return ExperimentState(self.fingerprint, "select", selector=sel.state_dict())
        return self._start_run(ExperimentState(self.fingerprint), plan)

    def _start_run(self, state: ExperimentState, plan: list[PlanEntry]) -> ExperimentState:
        state.plan = self._with_baselines(plan)
        state.phase, state.position, state.selector = "run", 0, None
        state.totals = {str(k): {arm: {} for arm in self.arms} for k in range(len(state.plan))}
        if not state.plan:
            state.phase = "done"
        return state

    @property
    def arms(self) -> tuple[str, ...]:
        return ("sae",) + tuple(b for b in BASELINES if b in self.config.baselines)

    # -- labels ---------------------------------------------------------------------------------------------------

    def _use_dataset_labels(self) -> bool:
        mode = self.config.labels
        if self.task == "segment":
            has = hasattr(self.dataset, "load_mask")
            if mode == "dataset" and not has:
                raise ValueError(f"labels='dataset' needs masks, and dataset {getattr(self.dataset, 'id', '?')} has "
                                 "none; use labels='prediction'")
            return has and mode != "prediction"
        return mode != "prediction"

    def _needs_prediction(self, indices: list[int]) -> bool:
        """Whether labels for these images come (at least partly) from the head's unedited prediction."""
        if not self._use_dataset_labels():
            return True
        return self.task == "classify" and any(self.dataset.sample(i).label is None for i in indices)

    def _image_classes(self, indices: list[int], prepared: Prepared) -> Tensor:
        """Classification: one class per image ``[B]``."""
        if not self._use_dataset_labels():
            return prepared.before.labels.cpu()
        labels = [self.dataset.sample(i).label for i in indices]
        if any(lab is None for lab in labels):
            if self.config.labels == "dataset":
                raise ValueError("labels='dataset' but some images have no label")
            pred = prepared.before.labels.cpu()
            labels = [int(pred[j]) if lab is None else lab for j, lab in enumerate(labels)]
        return torch.tensor(labels, dtype=torch.long)

    def _patch_labels(self, indices: list[int], prepared: Prepared) -> tuple[Tensor, Tensor]:
        """Segmentation: majority class and purity per patch, ``[B, rows, cols]`` each."""
        lo = self.backbone.layout
        if self._use_dataset_labels():
            pixels = torch.stack([mask_to_input(self.dataset.load_mask(i), self.backbone.transform) for i in indices])
        else:
            pixels = prepared.before.labels.cpu()
        return patch_majority(pixels, lo.grid_rows, lo.grid_cols)

    def _load(self, indices: list[int], state: ExperimentState, *, count: bool) -> tuple[list[int], Tensor | None]:
        """Load and preprocess images; unreadable ones are skipped (and counted with ``count``)."""
        from sae_shared.datasets import ImageError

        ok, images = [], []
        for i in indices:
            try:
                images.append(self.dataset.load_image(i))
                ok.append(i)
            except ImageError:
                state.n_skipped += int(count)
        if not images:
            return ok, None
        return ok, self.backbone.preprocess_batch(images)

    # -- steps ----------------------------------------------------------------------------------------------------

    def check_state(self, state: ExperimentState) -> None:
        if state.fingerprint != self.fingerprint:
            raise ValueError(f"this checkpoint belongs to another experiment (fingerprint {state.fingerprint}, "
                             f"this one is {self.fingerprint}): same config, models and images are needed to resume")

    @torch.inference_mode()
    def step(self, state: ExperimentState) -> list[dict[str, Any]]:
        """Process the next batch of the current phase, advancing ``state`` in place; returns the batch's per-image
        records (none in the selection phase or when done)."""
        self.check_state(state)
        if state.phase == "select":
            self._select_step(state)
            return []
        if state.phase == "run":
            return self._run_step(state)
        return []

    def _select_step(self, state: ExperimentState) -> None:
        cfg = self.config
        batch = self.selection[state.position:state.position + cfg.batch_size]
        sel = LatentSelector(self.head.n_classes, self.sae.d_sae, cfg.activation_thresholds, cfg.purity_thresholds,
                             device=self.sae.W_dec.device)
        sel.load_state_dict(state.selector)
        ok, imgs = self._load(batch, state, count=False)
        if imgs is not None:
            resid_btd = self.backbone.forward_to(imgs, self.iv.layer)
            # the unedited prediction is computed only when labels come from it
            prepared = self.iv.prepare(resid_btd=resid_btd) if self._needs_prediction(ok) else Prepared(resid_btd, None)
            lo = self.backbone.layout
            patches_bpd = prepared.resid_btd[:, lo.n_prefix_tokens:]
            codes_ns = self.sae.encode(patches_bpd.reshape(-1, lo.d_model).to(self.sae.W_dec.device))
            if self.task == "classify":
                classes_b = self._image_classes(ok, prepared)
                labels = classes_b.repeat_interleave(lo.n_patches)
                purity = None
            else:
                labels_b, purity_b = self._patch_labels(ok, prepared)
                labels, purity = labels_b.reshape(-1), purity_b.reshape(-1)
            sel.update(codes_ns, labels, purity)  # checks the labels are the head's classes
            if cfg.selection == "f1-attribution":
                if self.task == "classify":
                    drops, rows = self._removal_drops(prepared.resid_btd, codes_ns, classes_b=classes_b)
                else:
                    drops, rows = self._removal_drops(prepared.resid_btd, codes_ns, labels_bp=labels_b.flatten(1))
                sel.update_attribution(drops, rows)
        state.selector = sel.state_dict()
        state.position += len(batch)
        state.steps += 1
        if state.position >= len(self.selection):
            classes = self.config.classes
            if classes is None:
                classes = [c for c in sel.seen_classes() if c != self.config.background]
            candidates = self.config.candidates if self.config.selection == "f1-attribution" else None
            chosen = sel.best(classes, self.allowed, candidates=candidates)
            plan = [PlanEntry((s.latent,), s.target_class, (), s.f1, s.activation_threshold, s.purity_threshold,
                              s.attribution) for s in chosen]
            self._start_run(state, plan)

    def _removal_drops(self, resid_btd: Tensor, codes_ns: Tensor, classes_b: Tensor | None = None,
                       labels_bp: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """First-order estimates of how much removing each latent lowers a class's logit (centred over classes), one
        row per (image, class): ``Σ_patches f_s · (direction_s · ∇ logit)``, with ``direction_s`` the latent's decoded
        direction in raw activation space (``W_dec[s] · σ``). Classification (``classes_b [B]``): each image's class
        logit, the latent removed from every patch. Segmentation (``labels_bp [B, P]``, majority class per patch):
        for each wanted class present, the class's patch logits summed over its patches, the latent removed from
        those patches. Returns drops ``[K, S]`` and the rows' classes ``[K]``."""
        lo, sae = self.backbone.layout, self.sae
        b = resid_btd.shape[0]
        with torch.inference_mode(False), torch.enable_grad():
            resid = resid_btd.detach().clone().requires_grad_(True)  # a normal tensor, also from inference mode
            out = self.head.predict(self.backbone, self.backbone.forward_from(resid, self.iv.layer))
            if classes_b is not None:
                logits = out.logits.float()
                centred = logits - logits.mean(1, keepdim=True)
                index = classes_b.to(logits.device)[:, None].clone()  # gather saves its index: no inference tensor
                objectives = [(centred.gather(1, index).sum(), None)]  # each image's own class, one gradient
            else:
                patch = out.patch_logits.float()
                centred = (patch - patch.mean(1, keepdim=True)).flatten(2)  # [B, C, P]
                labels = labels_bp.to(patch.device).clone()
                objectives = [((centred[:, c] * (labels == c)).sum(), c) for c in self._attributed_classes(labels_bp)]
            grads = [(torch.autograd.grad(obj, resid, retain_graph=i + 1 < len(objectives))[0], c)
                     for i, (obj, c) in enumerate(objectives)]
        rows, row_classes = [], []
        with torch.no_grad():
            codes_bps = codes_ns.float().reshape(b, lo.n_patches, sae.d_sae)
            for grad, c in grads:
                grad_nd = grad[:, lo.n_prefix_tokens:].reshape(-1, lo.d_model).to(sae.W_dec.device, torch.float32)
                proj_bps = ((grad_nd * sae.norm_scale) @ sae.W_dec.float().T).reshape(b, lo.n_patches, sae.d_sae)
                contrib_bps = codes_bps * proj_bps  # ∇ logit · direction_s · f_s, per patch
                if c is None:
                    rows.append(contrib_bps.sum(1))
                    row_classes.append(classes_b.cpu().long())
                else:
                    mask_bp = (labels_bp == c).to(contrib_bps.device)
                    present = mask_bp.any(1)
                    rows.append((contrib_bps * mask_bp[..., None]).sum(1)[present])
                    row_classes.append(torch.full((int(present.sum()),), c, dtype=torch.long))
        if not rows:
            return torch.zeros(0, sae.d_sae), torch.zeros(0, dtype=torch.long)
        return torch.cat(rows), torch.cat(row_classes)

    def _attributed_classes(self, labels_bp: Tensor) -> list[int]:
        """Segmentation: the classes of this batch whose latents an automatic plan chooses."""
        wanted = self.config.classes
        present = [int(c) for c in torch.unique(labels_bp).tolist()]
        return [c for c in present if c != self.config.background and (wanted is None or c in wanted)]

    def _edits(self, latents: Sequence[int], patches) -> list[Edit]:
        c = self.config
        return [Edit(int(i), c.op, float(c.value), c.relative, patches) for i in latents]

    def _run_step(self, state: ExperimentState) -> list[dict[str, Any]]:
        cfg = self.config
        batch = self.images[state.position:state.position + cfg.batch_size]
        ok, imgs = self._load(batch, state, count=True)
        records: list[dict[str, Any]] = []
        if imgs is not None:
            prepared = self.iv.prepare(imgs)  # the one forward to layer L for this batch
            if self.task == "classify":
                classes = self._image_classes(ok, prepared)
                patch_labels = None
            else:
                classes = None
                patch_labels, _ = self._patch_labels(ok, prepared)
            for k, entry in enumerate(state.plan):
                records += self._run_entry(state, k, entry, ok, prepared, classes, patch_labels)
        records.sort(key=lambda r: (r["position"], r["entry"]))
        state.position += len(batch)
        state.steps += 1
        state.n_records += len(records)
        if state.position >= len(self.images):
            state.phase = "done"
        return records

    def _run_entry(self, state: ExperimentState, k: int, entry: PlanEntry, ok: list[int], prepared: Prepared,
                   classes: Tensor | None, patch_labels: Tensor | None) -> list[dict[str, Any]]:
        c = entry.target_class
        if self.task == "classify":
            idx = torch.arange(len(ok)) if c is None else (classes == c).nonzero().squeeze(1)
            patches = AllPatches()
        else:
            if c is None:
                idx = torch.arange(len(ok))
                patches = AllPatches()
            else:
                present = (patch_labels == c).flatten(1).any(1)
                idx = present.nonzero().squeeze(1)
                patches = PatchMask(patch_labels[idx] == c)
        if idx.numel() == 0:
            return []
        if idx.numel() == prepared.resid_btd.shape[0]:
            sub = prepared
        else:
            # The unedited prediction is recomputed on this entry's sub-batch: the batch's composition changes
            # floating-point results (at the 1e-9 level on CPU BLAS), which would otherwise count as changes.
            sub = self.iv.prepare(resid_btd=prepared.resid_btd[idx.to(prepared.resid_btd.device)])
        results: dict[str, InterventionResult] = {"sae": self.iv.run(sub, self._edits(entry.latents, patches))}
        if "random-latent" in self.arms:
            results["random-latent"] = self.iv.run(sub, self._edits(entry.random_latents, patches))
        if "random-direction" in self.arms:
            sae_res = results["sae"]
            tokens_bt = sae_res.edited_tokens
            u_d = random_direction(self.config.seed, k, self.backbone.layout.d_model).to(sae_res.delta_norm.device)
            delta_nd = sae_res.delta_norm[tokens_bt][:, None] * u_d[None, :]
            results["random-direction"] = self.iv.run_delta(sub, tokens_bt, delta_nd)
        records = []
        totals = state.totals[str(k)]
        for j, img_pos in enumerate(idx.tolist()):
            image_index = ok[img_pos]
            rec = {"position": self._position[image_index], "image_index": image_index,
                   "image_id": self.dataset.sample(image_index).image_id, "entry": k, "class": c,
                   "latents": list(entry.latents), "arms": {}}
            for arm, res in results.items():
                if self.task == "classify":
                    target = c if c is not None else int(res.before.labels[j])
                    arm_rec = self._classify_record(res, j, target)
                else:
                    sel_patches = (patch_labels[img_pos] == c) if c is not None else None
                    arm_rec = self._segment_record(res, j, sel_patches, c)
                arm_rec["drift"] = {key: _finite(float(getattr(res.drift, key)[j])) for key in DRIFT_KEYS}
                rec["arms"][arm] = arm_rec
                _accumulate(totals[arm], arm_rec)
            records.append(rec)
        return records

    @staticmethod
    def _classify_record(res: InterventionResult, j: int, target: int) -> dict[str, Any]:
        pb, pa = int(res.before.labels[j]), int(res.after.labels[j])
        return {"target": target, "pred_before": pb, "pred_after": pa, "flipped": pb != pa,
                "p_target_before": float(res.before.probs[j, target]),
                "p_target_after": float(res.after.probs[j, target])}

    @staticmethod
    def _segment_record(res: InterventionResult, j: int, target_patches: Tensor | None,
                        target_class: int | None) -> dict[str, Any]:
        changed = res.changed_patches[j].cpu()
        tgt = torch.ones_like(changed) if target_patches is None else target_patches.cpu()
        rec = {"n_target": int(tgt.sum()), "n_target_changed": int((changed & tgt).sum()),
               "n_other": int((~tgt).sum()), "n_other_changed": int((changed & ~tgt).sum()),
               "pixels_changed": int(res.changed[j].sum())}
        if tgt.any():  # the class's probability over its patches (no class: each patch's unedited prediction)
            cls = (res.before.patch_labels[j] if target_class is None else
                   torch.full_like(res.before.patch_labels[j], target_class)).cpu()
            before = res.before.patch_probs[j].cpu().gather(0, cls[None])[0][tgt]
            after = res.after.patch_probs[j].cpu().gather(0, cls[None])[0][tgt]
            rec["p_target_before"], rec["p_target_after"] = float(before.mean()), float(after.mean())
        return rec

    # -- driving and reporting ------------------------------------------------------------------------------------

    def run(self, state: ExperimentState | None = None,
            on_step: Callable[[ExperimentState, list[dict[str, Any]]], None] | None = None) -> ExperimentResult:
        """Step until done (from ``state`` when resuming); ``on_step(state, records)`` after every step (the job
        checkpoints there)."""
        state = self.new_state() if state is None else state
        self.check_state(state)
        records: list[dict[str, Any]] = []
        while state.phase != "done":
            out = self.step(state)
            records += out
            if on_step is not None:
                on_step(state, out)
        return ExperimentResult(self.report(state), records, state)

    def progress(self, state: ExperimentState) -> float:
        """Fraction done, counting the selection phase (when there is one) as images too."""
        sel = len(self.selection) if self.config.automatic else 0
        total = max(1, sel + len(self.images))
        done = state.position if state.phase == "select" else sel + (
            len(self.images) if state.phase == "done" else state.position)
        return min(1.0, done / total)

    def report(self, state: ExperimentState) -> dict[str, Any]:
        """The aggregate report (JSON-ready) of everything processed so far."""
        head = self.head
        plan = state.plan or []
        per_entry = []
        for k, e in enumerate(plan):
            t = state.totals.get(str(k), {})
            per_entry.append({"entry": k, "class": e.target_class,
                              "class_name": None if e.target_class is None else head.classes[e.target_class],
                              "latents": list(e.latents), "random_latents": list(e.random_latents),
                              "score": e.score, "attribution": e.attribution,
                              "activation_threshold": e.activation_threshold,
                              "purity_threshold": e.purity_threshold,
                              "arms": {arm: _summarise(t.get(arm, {}), self.task) for arm in self.arms}})
        arms = {arm: _pool([state.totals.get(str(k), {}).get(arm, {}) for k in range(len(plan))], self.task)
                for arm in self.arms}
        return {"task": self.task, "phase": state.phase, "backbone_id": self.backbone.id, "layer": self.iv.layer,
                "head_kind": head.kind, "dataset_id": getattr(self.dataset, "id", None),
                "n_images": len(self.images), "n_skipped": state.n_skipped, "n_records": state.n_records,
                "config": self.config.to_json(), "arms": arms, "per_entry": per_entry}


# --------------------------------------------------------------------------------------------------------------
# Accumulation
# --------------------------------------------------------------------------------------------------------------

def _accumulate(t: dict[str, Any], rec: dict[str, Any]) -> None:
    """Fold one arm record into its accumulator (plain JSON numbers, summed in image order)."""
    t["n"] = t.get("n", 0) + 1
    if "flipped" in rec:
        t["flipped"] = t.get("flipped", 0) + int(rec["flipped"])
        t["sum_prob_drop"] = t.get("sum_prob_drop", 0.0) + (rec["p_target_before"] - rec["p_target_after"])
    else:
        for key in ("n_target", "n_target_changed", "n_other", "n_other_changed"):
            t[key] = t.get(key, 0) + rec[key]
        if "p_target_before" in rec:
            t["sum_prob_drop"] = t.get("sum_prob_drop", 0.0) + (rec["p_target_before"] - rec["p_target_after"])
            t["n_prob"] = t.get("n_prob", 0) + 1
    for key, v in rec["drift"].items():
        if v is not None:
            t[f"drift_sum_{key}"] = t.get(f"drift_sum_{key}", 0.0) + v
            t[f"drift_n_{key}"] = t.get(f"drift_n_{key}", 0) + 1


def _rate(num: float, den: float) -> float | None:
    return num / den if den else None


def _drift(t: dict[str, Any]) -> dict[str, float | None]:
    return {key: _rate(t.get(f"drift_sum_{key}", 0.0), t.get(f"drift_n_{key}", 0)) for key in DRIFT_KEYS}


def _summarise(t: dict[str, Any], task: str) -> dict[str, Any]:
    """One entry and arm."""
    if task == "classify":
        return {"n_images": t.get("n", 0), "flip_rate": _rate(t.get("flipped", 0), t.get("n", 0)),
                "prob_drop": _rate(t.get("sum_prob_drop", 0.0), t.get("n", 0)), "drift": _drift(t)}
    return {"n_images": t.get("n", 0), "n_target": t.get("n_target", 0), "n_other": t.get("n_other", 0),
            "target_change_rate": _rate(t.get("n_target_changed", 0), t.get("n_target", 0)),
            "other_change_rate": _rate(t.get("n_other_changed", 0), t.get("n_other", 0)),
            "target_prob_drop": _rate(t.get("sum_prob_drop", 0.0), t.get("n_prob", 0)), "drift": _drift(t)}


def _spread(values: list[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n_classes": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n_classes": len(vals)}


def _pool(ts: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """All entries of one arm: pooled rates, their spread across entries (classes), mean drift."""
    merged: dict[str, Any] = {}
    for t in ts:
        for key, v in t.items():
            merged[key] = merged.get(key, 0) + v
    out = _summarise(merged, task)
    per = [_summarise(t, task) for t in ts]
    if task == "classify":
        out["flip_rate_across_classes"] = _spread([p["flip_rate"] for p in per])
        out["prob_drop_across_classes"] = _spread([p["prob_drop"] for p in per])
    else:
        out["target_change_rate_across_classes"] = _spread([p["target_change_rate"] for p in per])
        out["other_change_rate_across_classes"] = _spread([p["other_change_rate"] for p in per])
        out["target_prob_drop_across_classes"] = _spread([p["target_prob_drop"] for p in per])
    return out


def records_jsonl(records: Sequence[dict[str, Any]]) -> bytes:
    """Per-image records as JSON lines (one object per line, keys sorted)."""
    return b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records)


__all__ = [
    "ARMS", "Experiment", "ExperimentConfig", "ExperimentResult", "ExperimentState", "LatentSelector", "PlanEntry",
    "SelectedLatent", "allowed_latents", "draw_random_latents", "random_direction", "records_jsonl",
]
