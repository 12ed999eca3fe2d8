"""Batch experiments: automatic latent selection (a synthetic case with a known answer, and a plain reference),
the plan and baselines, the shared forward, records against the aggregate, and resuming a killed run to the same
aggregate. Models are a tiny random-weight CLIP tower (4 blocks, width 64, 4x4 patches) with a random SAE.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from backbones_support import TINY_CLIP_OVERRIDES
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sae_shared.backbones import load_backbone
from sae_shared.datasets import Sample
from sae_shared.experiments import (
    Experiment,
    ExperimentConfig,
    ExperimentState,
    LatentSelector,
    PlanEntry,
    random_direction,
)
from sae_shared.heads import HeadContract, LinearProbe, PatchLinearHead, mask_to_input, patch_majority
from sae_shared.interventions import AllPatches, Edit, Intervener
from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder, compute_stats

LAYER = 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ClassifySet:
    """Random photos with image labels (3 classes), no masks."""

    def __init__(self, n: int, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.id = f"synthetic-{seed}"
        self.classes = ["other", "a", "b"]
        self.images = [Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)) for _ in range(n)]
        self.masks = [rng.integers(0, 3, (5, 6)).repeat(16, 0).repeat(16, 1).astype(np.uint16) for _ in range(n)]
        self.labels = [int(i % 3) for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, i: int) -> Sample:
        return Sample(f"img-{i:03d}", self.labels[i])

    def load_image(self, i: int) -> Image.Image:
        return self.images[i]


class SyntheticSet(ClassifySet):
    """The same with blocky 3-class masks, ADE20K-style (``load_mask``; 0 = other)."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__(n, seed)

    def load_mask(self, i: int) -> np.ndarray:
        return self.masks[i]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(2)
    return load_backbone("clip", model="ViT-B-16", pretrained=None, model_overrides=TINY_CLIP_OVERRIDES)


@pytest.fixture(scope="module")
def sae(clip):
    d = clip.layout.d_model
    sae = SparseAutoencoder(SAEConfig(d, 128, Relu(), seed=1), contract=Contract(clip.id, LAYER, "patches"))
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)  # sparser codes, so the latents differ in frequency
    with torch.inference_mode():
        acts = clip.forward_to(torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0)), LAYER)
    compute_stats(sae, acts[:, 1:].reshape(-1, d))
    return sae.eval()


@pytest.fixture(scope="module")
def seg_head(clip):
    torch.manual_seed(3)
    return PatchLinearHead(["other", "a", "b"], HeadContract.for_backbone(clip, "patches")).eval()


@pytest.fixture(scope="module")
def probe(clip):
    torch.manual_seed(4)
    return LinearProbe(["other", "a", "b"], HeadContract.for_backbone(clip, "pooled")).eval()


# -- automatic latent selection --------------------------------------------------------------------------------------


def test_automatic_selection_finds_the_known_best_latent_per_class():
    g = torch.Generator().manual_seed(0)
    n, s = 600, 12
    labels = torch.randint(0, 3, (n,), generator=g)
    purity = torch.where(torch.rand(n, generator=g) < 0.3, torch.tensor(0.6), torch.tensor(1.0))
    codes = torch.rand(n, s, generator=g) * 0.05  # faint noise everywhere, below the 0.1 threshold
    is1, is2 = labels == 1, labels == 2
    codes[:, 3] += torch.where(is1 | (is2 & (torch.rand(n, generator=g) < 0.3)), 2.0, 0.0)  # class 1, some 2s
    codes[:, 5] += torch.where(is1 & (purity == 1.0), 1.5, 0.0)  # exactly the pure class-1 patches
    codes[:, 7] += torch.where(is2, 2.0, 0.0)  # class 2 (and faint noise: needs threshold >= 0.1)
    codes[:, 9] += 5.0  # fires everywhere: excluded as dense
    sel = LatentSelector(3, s, (0.0, 0.1, 0.3, 1.0), (0.5, 0.75, 1.0))
    for chunk in range(0, n, 128):  # streaming in batches gives the same counts
        sel.update(codes[chunk:chunk + 128], labels[chunk:chunk + 128], purity[chunk:chunk + 128])
    allowed = torch.ones(s, dtype=torch.bool)
    allowed[9] = False
    best = {b.target_class: b for b in sel.best([1, 2], allowed)}
    assert (best[1].latent, best[1].f1, best[1].purity_threshold) == (5, 1.0, 0.75)
    assert (best[2].latent, best[2].f1, best[2].activation_threshold) == (7, 1.0, 0.1)
    assert best[1].n_patches == int((is1 & (purity >= 0.75)).sum())


def test_selector_f1_matches_a_plain_count():
    g = torch.Generator().manual_seed(1)
    n, s, c = 200, 6, 4
    codes = torch.relu(torch.randn(n, s, generator=g))
    labels = torch.randint(0, c, (n,), generator=g)
    purity = torch.rand(n, generator=g)
    acts, purities = (0.0, 0.5), (0.3, 0.8)
    sel = LatentSelector(c, s, acts, purities)
    sel.update(codes, labels, purity)
    f1 = sel.f1()
    for ci in range(c):
        for pi, p in enumerate(purities):
            for ti, t in enumerate(acts):
                for si in range(s):
                    tp = fp = fn = 0
                    for k in range(n):
                        if purity[k] < p:
                            continue
                        fires, mine = bool(codes[k, si] > t), int(labels[k]) == ci
                        tp, fp, fn = tp + (fires and mine), fp + (fires and not mine), fn + (mine and not fires)
                    expected = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
                    assert float(f1[ci, pi, ti, si]) == pytest.approx(expected)


def test_the_experiments_automatic_plan_is_the_selectors_answer_on_its_patches(clip, sae, seg_head):
    ds = SyntheticSet(6)
    cfg = ExperimentConfig(batch_size=4, background=0, max_frequency=1.0)
    exp = Experiment(cfg, clip, sae, seg_head, ds)
    state = exp.new_state()
    while state.phase == "select":
        exp.step(state)
    lo = clip.layout
    imgs = clip.preprocess_batch([ds.load_image(i) for i in range(6)])
    with torch.inference_mode():
        codes = sae.encode(clip.forward_to(imgs, LAYER)[:, 1:].reshape(-1, lo.d_model))
    pixels = torch.stack([mask_to_input(ds.load_mask(i), clip.transform) for i in range(6)])
    labels, purity = patch_majority(pixels, lo.grid_rows, lo.grid_cols)
    ref = LatentSelector(3, sae.d_sae, cfg.activation_thresholds, cfg.purity_thresholds)
    ref.update(codes, labels.reshape(-1), purity.reshape(-1))
    expected = ref.best([1, 2])
    assert [(e.target_class, e.latents) for e in state.plan] == [(b.target_class, (b.latent,)) for b in expected]
    assert all(len(e.random_latents) == 1 and e.random_latents != e.latents for e in state.plan)


# -- the loop ------------------------------------------------------------------------------------------------------


def checkpoint_roundtrip(state: ExperimentState, one_file: bool = True) -> ExperimentState:
    """Through the bytes a job would store: one safetensors object, or JSON text beside a safetensors file."""
    if one_file:
        return ExperimentState.from_bytes(state.to_bytes())
    doc, tensors = state.to_checkpoint()
    doc = json.loads(json.dumps(doc))
    tensors = st_load(st_save(tensors)) if tensors else {}
    return ExperimentState.from_checkpoint(doc, tensors)


@pytest.mark.parametrize("kill_after", [1, 3])  # in the selection phase, in the run phase
def test_a_killed_experiment_resumes_to_the_same_aggregate(clip, sae, seg_head, kill_after):
    ds = SyntheticSet(10)
    cfg = ExperimentConfig(batch_size=3, background=0, max_frequency=1.0, op="add", value=-2.0, relative=True,
                           selection_images=(0, 6))
    undisturbed = Experiment(cfg, clip, sae, seg_head, ds).run()

    first = Experiment(cfg, clip, sae, seg_head, ds)
    state, records = first.new_state(), []
    for _ in range(kill_after):
        records += first.step(state)
    saved = checkpoint_roundtrip(state, one_file=kill_after == 1)
    resumed = Experiment(cfg, clip, sae, seg_head, ds).run(saved)  # a new worker, new objects
    assert resumed.report == undisturbed.report
    assert records + resumed.records == undisturbed.records
    report = undisturbed.report
    assert report["n_records"] == len(undisturbed.records) > 0
    assert set(report["arms"]) == {"sae", "random-latent", "random-direction"}
    assert report["arms"]["sae"]["target_change_rate"] is not None

    other = Experiment(ExperimentConfig(batch_size=2, background=0, max_frequency=1.0), clip, sae, seg_head, ds)
    with pytest.raises(ValueError, match="another experiment"):
        other.step(checkpoint_roundtrip(state))


def test_the_forward_to_layer_l_runs_once_per_image_for_every_edit_and_baseline(clip, sae, seg_head, monkeypatch):
    ds = SyntheticSet(7)
    plan = (PlanEntry((3,), 1), PlanEntry((5, 6), 2), PlanEntry((8,), None))
    exp = Experiment(ExperimentConfig(plan=plan, batch_size=4, max_frequency=1.0), clip, sae, seg_head, ds)
    seen = []
    forward_to = clip.forward_to
    monkeypatch.setattr(clip, "forward_to", lambda imgs, layer: (seen.append(len(imgs)), forward_to(imgs, layer))[1])
    result = exp.run()
    assert sum(seen) == len(ds) and len(seen) == 2  # two batches, each image once
    n_with = {1: 0, 2: 0}
    for i in range(len(ds)):
        labels, _ = patch_majority(mask_to_input(ds.load_mask(i), clip.transform), 4, 4)
        for c in n_with:
            n_with[c] += bool((labels == c).any())
    per_entry = result.report["per_entry"]
    assert [p["arms"]["sae"]["n_images"] for p in per_entry] == [n_with[1], n_with[2], len(ds)]
    assert per_entry[2]["arms"]["sae"]["other_change_rate"] is None  # every patch is a target patch


def test_segmentation_records_add_up_to_the_aggregate(clip, sae, seg_head):
    ds = SyntheticSet(8, seed=3)
    cfg = ExperimentConfig(plan=(PlanEntry((3,), 1), PlanEntry((4,), 2)), op="set", value=8.0, batch_size=8,
                           max_frequency=1.0)
    result = Experiment(cfg, clip, sae, seg_head, ds).run()
    for arm in ("sae", "random-latent", "random-direction"):
        recs = [r["arms"][arm] for r in result.records]
        agg = result.report["arms"][arm]
        assert agg["target_change_rate"] == pytest.approx(sum(r["n_target_changed"] for r in recs) /
                                                          sum(r["n_target"] for r in recs))
        assert agg["other_change_rate"] == pytest.approx(sum(r["n_other_changed"] for r in recs) /
                                                         sum(r["n_other"] for r in recs))
        per_class = [p["arms"][arm]["target_change_rate"] for p in result.report["per_entry"]]
        assert agg["target_change_rate_across_classes"]["std"] == pytest.approx(float(np.std(per_class)))
        assert agg["target_prob_drop"] == pytest.approx(np.mean([r["p_target_before"] - r["p_target_after"]
                                                                 for r in recs]))
    first = result.records[0]
    labels, _ = patch_majority(mask_to_input(ds.load_mask(first["image_index"]), clip.transform), 4, 4)
    assert first["arms"]["sae"]["n_target"] == int((labels == first["class"]).sum())
    assert first["arms"]["sae"]["n_target"] + first["arms"]["sae"]["n_other"] == 16
    # the class's probability over its patches, from the head's own per-patch output
    iv = Intervener(clip, sae, seg_head)
    before = iv.prepare([ds.load_image(first["image_index"])]).before.patch_probs[0, first["class"]]
    assert first["arms"]["sae"]["p_target_before"] == pytest.approx(float(before[labels == first["class"]].mean()),
                                                                    rel=1e-5)


def test_classification_flip_rate_and_probability_drop(clip, sae, probe):
    ds = ClassifySet(9)
    assert not hasattr(ds, "load_mask")
    plan = (PlanEntry((3, 4), 1), PlanEntry((5,), 2), PlanEntry((6,), None))
    cfg = ExperimentConfig(plan=plan, op="set", value=20.0, batch_size=5, max_frequency=1.0)
    result = Experiment(cfg, clip, sae, probe, ds).run()
    assert {r["class"] for r in result.records} == {1, 2, None}
    for r in result.records:
        assert r["class"] is None or ds.labels[r["image_index"]] == r["class"]  # images of the entry's class
        for arm in r["arms"].values():
            assert arm["flipped"] == (arm["pred_before"] != arm["pred_after"])
    sae_recs = [r["arms"]["sae"] for r in result.records]
    agg = result.report["arms"]["sae"]
    assert agg["n_images"] == len(sae_recs) == 3 + 3 + 9
    assert agg["flip_rate"] == pytest.approx(np.mean([a["flipped"] for a in sae_recs]))
    assert agg["prob_drop"] == pytest.approx(np.mean([a["p_target_before"] - a["p_target_after"] for a in sae_recs]))
    assert agg["drift"]["relative"] > 0

    identity = ExperimentConfig(plan=plan, op="scale", value=1.0, batch_size=5, max_frequency=1.0)
    same = Experiment(identity, clip, sae, probe, ds).run().report["arms"]
    for arm in ("sae", "random-latent", "random-direction"):  # an edit that changes no code changes nothing
        assert same[arm]["flip_rate"] == 0.0 and same[arm]["prob_drop"] == 0.0
        assert same[arm]["drift"]["mean_abs"] == 0.0


def test_the_random_direction_baseline_matches_the_edits_norm_per_token(clip, sae, seg_head):
    iv = Intervener(clip, sae, seg_head)
    imgs = clip.preprocess_batch([SyntheticSet(2).load_image(i) for i in range(2)])
    prepared = iv.prepare(imgs)
    edit = iv.run(prepared, [Edit(3, "set", 5.0, patches=AllPatches())])
    u = random_direction(0, 0, clip.layout.d_model)
    assert float(u.norm()) == pytest.approx(1.0)
    delta = edit.delta_norm[edit.edited_tokens][:, None] * u[None]
    baseline = iv.run_delta(prepared, edit.edited_tokens, delta)
    torch.testing.assert_close(baseline.delta_norm, edit.delta_norm)
    assert torch.equal(baseline.edited_tokens, edit.edited_tokens)
    assert baseline.drift.target_error.abs().max() == 0 and float(baseline.drift.relative.min()) > 0


def test_labels_can_come_from_the_heads_own_prediction(clip, sae, seg_head):
    ds = ClassifySet(4)
    cfg = ExperimentConfig(labels="prediction", background=0, batch_size=4, max_frequency=1.0)
    result = Experiment(cfg, clip, sae, seg_head, ds).run()
    assert result.state.phase == "done" and result.report["per_entry"]
    with pytest.raises(ValueError, match="needs masks"):
        Experiment(ExperimentConfig(labels="dataset"), clip, sae, seg_head, ds).run()


def test_attribution_selection_takes_the_detector_whose_removal_lowers_the_class_logit_most(clip, sae, probe,
                                                                                            seg_head):
    ds = ClassifySet(12)
    sae = copy.deepcopy(sae)  # a normalisation that is not the identity: directions scale with it
    sae.set_normalisation(torch.full((clip.layout.d_model,), 0.1), 3.0)
    cfg = ExperimentConfig(classes=(1,), selection="f1-attribution", candidates=5, max_frequency=1.0, batch_size=4)
    exp = Experiment(cfg, clip, sae, probe, ds)
    state = exp.new_state()
    while state.phase == "select":  # through a checkpoint after every step, as a job resumes
        exp.step(state)
        state = ExperimentState.from_bytes(state.to_bytes())
    (entry,) = state.plan

    # the reference: the class's 5 best detectors by F1, and for each the derivative of the centred class-1 logit
    # along "remove the latent from every patch" (central differences, no autograd), per class-1 image
    lo, ones = clip.layout, [i for i in range(len(ds)) if ds.labels[i] == 1]
    with torch.no_grad():
        resid = clip.forward_to(clip.preprocess_batch([ds.load_image(i) for i in range(len(ds))]), LAYER)
        codes_bps = sae.encode(resid[:, lo.n_prefix_tokens:])
    ref = LatentSelector(3, sae.d_sae, cfg.activation_thresholds, cfg.purity_thresholds)
    ref.update(codes_bps.reshape(-1, sae.d_sae), torch.tensor(ds.labels).repeat_interleave(lo.n_patches))
    pool = torch.argsort(ref.f1()[1].reshape(-1, sae.d_sae).max(0).values, descending=True, stable=True)[:5]

    def centred_logit(r):
        logits = probe.predict(clip, clip.forward_from(r, LAYER)).logits
        return (logits[:, 1] - logits.mean(1)).sum()

    drops = {}
    for s in pool.tolist():
        v = torch.zeros_like(resid[ones])
        one = torch.zeros(2, sae.d_sae)
        one[0, s] = 1.0
        with torch.no_grad():
            decoded = sae.decode(one)
        direction = decoded[0] - decoded[1]  # the latent's decoded direction in raw activation space
        v[:, lo.n_prefix_tokens:] = -codes_bps[ones][:, :, s, None] * direction
        eps = 1e-2
        with torch.no_grad():
            slope = (centred_logit(resid[ones] + eps * v) - centred_logit(resid[ones] - eps * v)) / (2 * eps)
        drops[s] = -float(slope) / len(ones)
    best = max(drops, key=drops.get)
    assert entry.latents == (best,) and entry.target_class == 1
    assert entry.attribution == pytest.approx(drops[best], rel=2e-2, abs=1e-5)
    assert entry.score == pytest.approx(float(ref.f1()[1, :, :, best].max()))

    with pytest.raises(ValueError, match="effect of removing them"):
        ExperimentConfig(selection="f1-attribution", op="scale", value=2.0)
    # a backbone computing in bfloat16: the gradient meets the float32 dictionary
    half = Experiment(cfg, clip.with_dtype("bfloat16"), sae, probe, ds)
    state = half.new_state()
    while state.phase == "select":
        half.step(state)
    assert len(state.plan) == 1 and state.plan[0].attribution is not None


def test_attribution_selection_for_a_segmenter_sums_the_class_patch_logits_over_its_patches(clip, sae, seg_head):
    ds = SyntheticSet(6, seed=3)
    cfg = ExperimentConfig(classes=(1,), selection="f1-attribution", candidates=4, max_frequency=1.0, batch_size=3,
                           purity_thresholds=(0.5,))
    result = Experiment(cfg, clip, sae, seg_head, ds).run()
    (entry,) = result.report["per_entry"]

    lo = clip.layout
    with torch.no_grad():
        resid = clip.forward_to(clip.preprocess_batch([ds.load_image(i) for i in range(len(ds))]), LAYER)
        codes_bps = sae.encode(resid[:, lo.n_prefix_tokens:])
    labels_bp, purity_bp = zip(*(patch_majority(mask_to_input(ds.load_mask(i), clip.transform), 4, 4)
                                 for i in range(len(ds))))
    labels_bp, purity_bp = torch.stack(labels_bp).flatten(1), torch.stack(purity_bp).flatten(1)
    ref = LatentSelector(3, sae.d_sae, cfg.activation_thresholds, cfg.purity_thresholds)
    ref.update(codes_bps.reshape(-1, sae.d_sae), labels_bp.reshape(-1), purity_bp.reshape(-1))
    pool = torch.argsort(ref.f1()[1].reshape(-1, sae.d_sae).max(0).values, descending=True, stable=True)[:4]
    mask = labels_bp == 1
    having = mask.any(1)

    def class_logit(r):  # class 1's centred patch logits, summed over the class's patches
        patch = seg_head.predict(clip, clip.forward_from(r, LAYER)).patch_logits.flatten(2)
        return ((patch[:, 1] - patch.mean(1)) * mask[having]).sum()

    drops = {}
    for s in pool.tolist():
        one = torch.zeros(2, sae.d_sae)
        one[0, s] = 1.0
        with torch.no_grad():
            decoded = sae.decode(one)
            v = torch.zeros_like(resid[having])  # remove the latent from the class's patches only
            v[:, lo.n_prefix_tokens:] = (-codes_bps[having][:, :, s, None] * (decoded[0] - decoded[1])
                                         * mask[having][..., None])
            eps = 1e-2
            slope = (class_logit(resid[having] + eps * v) - class_logit(resid[having] - eps * v)) / (2 * eps)
        drops[s] = -float(slope) / int(having.sum())
    best = max(drops, key=drops.get)
    assert entry["latents"] == [best] and entry["class"] == 1
    assert entry["attribution"] == pytest.approx(drops[best], rel=2e-2, abs=1e-5)

