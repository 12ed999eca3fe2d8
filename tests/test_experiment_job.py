"""The ``experiment`` job and ``saevctl experiment``, on a real Redis, a real S3 server and real worker processes.

Models: a random-weight DINOv2 ViT-S/14 at 56 px (``dinov2:vit_small_patch14_dinov2/random-init``, a 4x4 patch
grid), a face / non-face probe trained here on ``bundled-lfw``, and a TopK SAE trained here (``train_sae``) on the
backbone's layer-5 patch tokens, with the contract (backbone id, layer 5, patches) and held-out statistics. The
experiment plans automatically for both classes over 60 images (a selection phase, then the edits with both
baselines). A job watched through the CLI and a job whose worker is SIGKILLed mid-run and resumed by another both
publish the report and the records of the same experiment run undisturbed in this process, exactly.
"""

from __future__ import annotations

import json
import re
import secrets
import signal

import pytest
import torch

from sae_shared.queue import JobState
from workers_support import wait_for
from workers_support import cli, env, queue, workers  # noqa: F401 - fixtures

LEASE = 3.0
"""Seconds; a loaded machine can starve a busy worker's heartbeat past a 1 s lease (a takeover mid-test)."""
BACKBONE = "dinov2:vit_small_patch14_dinov2/random-init"
OPTIONS = {"image_size": 56}
LAYER = 5
SPEC = {"sae_id": "lfw-sae", "head_id": "lfw-probe", "dataset": "bundled-lfw", "classes": ["face", "non-face"],
        "images": [70, 130], "batch_size": 4, "max_frequency": 0.5}
"""Automatic plan for both classes over 30 faces and 30 non-faces; the backbone comes from the SAE's contract at
the head's image size."""
_REFERENCE: dict[str, object] = {}


@pytest.fixture
def namespace() -> str:
    return "e" + secrets.token_hex(4)


@pytest.fixture(autouse=True)
def one_thread():
    """One compute thread, and subnormals flushed as the job handlers do (``resolve_device``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    """(backbone, probe, SAE), built once for the module."""
    from sae_shared.datasets import open_dataset
    from sae_shared.heads import HeadContract, HeadTrainConfig, train_probe
    from sae_shared.recording import parse_backbone
    from sae_shared.sae import Contract, SAEConfig, TopK, TrainConfig, train_sae

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    backbone = parse_backbone(BACKBONE, **OPTIONS).load(device="cpu")
    ds = open_dataset("bundled-lfw")
    idx = list(range(0, 200, 3))
    with torch.inference_mode():
        imgs = backbone.preprocess_batch([ds.load_image(i) for i in idx])
        resid = backbone.forward_to(imgs, LAYER)
        pooled = backbone.pool(backbone.forward_from(resid, LAYER)).float()
    probe = train_probe(pooled, torch.tensor([ds.sample(i).label for i in idx]), classes=ds.classes,
                        contract=HeadContract.for_backbone(backbone, "pooled"),
                        config=HeadTrainConfig(epochs=30, heldout_fraction=0)).head
    acts = resid[:, backbone.layout.n_prefix_tokens:].reshape(-1, backbone.layout.d_model).clone()
    sae = train_sae(TrainConfig(members=SAEConfig(backbone.layout.d_model, 256, TopK(k=8, k_aux=0), seed=1),
                                batch_size=128, n_tokens=128 * 60, warmup_steps=5,
                                contract=Contract(backbone.id, LAYER, "patches")), acts).saes[0]
    torch.set_num_threads(n)
    return backbone, probe, sae


@pytest.fixture
def store(settings, bucket, models):
    """The test's bucket, holding the SAE at saes/lfw-sae and the probe at heads/lfw-probe."""
    from sae_shared.heads import save_head
    from sae_shared.sae import save_sae
    from sae_shared.settings import Settings
    from sae_shared.storage import open_store

    s = open_store(Settings(**{**settings.model_dump(), "storage_url": f"s3://{bucket}"}))
    _, probe, sae = models
    save_sae(sae, "saes/lfw-sae", store=s)
    save_head(probe, "heads/lfw-probe", store=s)
    return s


def reference(store):
    """(report, records.jsonl bytes) of the experiment run undisturbed in this process (computed once)."""
    if not _REFERENCE:
        from sae_shared.experiments import records_jsonl
        from sae_shared.jobs import validate_spec
        from services.worker.experiment_handler import open_experiment

        result = open_experiment(validate_spec("experiment", SPEC), store).run()
        _REFERENCE.update(report=result.report, records=records_jsonl(result.records))
    return _REFERENCE["report"], _REFERENCE["records"]


def check_output(store, output: str, job_id: str) -> dict:
    report, records = reference(store)
    published = store.get_json(f"{output}/report.json")
    assert published == json.loads(json.dumps(report))
    assert store.get_bytes(f"{output}/records.jsonl") == records
    meta = store.get_json(f"{output}/experiment.json")
    assert meta["job_id"] == job_id and meta["backbone_id"] == BACKBONE and meta["layer"] == LAYER
    assert store.read_manifest(output)["extra"]["produced_by"]["job_id"] == job_id
    wait_for(lambda: not store.list(f"jobs/{job_id}/checkpoints/"), timeout=10, what="checkpoints removed")
    return published


# ------------------------------------------------------------------------------------------------ tests


def test_experiment_refuses_bad_specs_at_submit(cli, queue, store, namespace):
    from sae_shared.jobs import InvalidSpec

    assert cli("experiment", "--help").exit_code == 0
    store.artifact("experiments/taken").commit()
    base = ["experiment", "--sae", "lfw-sae", "--head", "lfw-probe", "--dataset", "bundled-lfw", "--namespace",
            namespace]
    cases = [
        (["--sae", "nope"], "no SAE at saes/nope/"),
        (["--head", "nope"], "no head at heads/nope/"),
        (["--classes", "face,cat"], "class 'cat' is not one of the head's classes"),
        (["--latent", "3,999"], "latents [999] are beyond this SAE's 256 latents"),
        (["--latent", "3", "--plan", '[{"latents": [4]}]'], "give one plan: latents or plan"),
        (["--plan", '[{"latents": [4], "target_class": "cat"}]'], "class 'cat' is not one of"),
        (["--op", "scale", "--relative"], "relative=true does not apply to op 'scale'"),
        (["--op", "zero"], "op: Input should be 'set', 'scale' or 'add'"),
        (["--images", "5"], "--images takes start:stop"),
        (["--images", "9:3"], "images is [start, stop) with start < stop"),
        (["--baselines", "random-latent,shuffle"], "baselines.1: Input should be"),
        (["--output", "experiments/taken"], "already committed at experiments/taken"),
        (["--dataset", "stored:absent"], "no dataset datasets/absent/"),
        (["--spec", '{"max_frequency": 2}'], "max_frequency: Input should be less than or equal to 1"),
        (["--via", "services", "--spec", '{"services_url": "grpc://attacker:1"}'], "services_url: unknown field"),
        (["--via", "elsewhere"], "via: Input should be 'local' or 'services'"),
    ]
    for args, expected in cases:
        result = cli(*base, *args)
        assert result.exit_code == 2 and expected in result.output, (args, result.output)
    with pytest.raises(InvalidSpec, match="one op, value and relative"):
        queue.submit("experiment", {**SPEC, "classes": None, "edits": [{"latent": 1, "op": "set", "value": 0},
                                                                       {"latent": 2, "op": "add", "value": 1}]})
    assert not list(queue.client.scan_iter(f"{namespace}:*"))  # nothing was queued


def test_cli_experiment_with_watch_publishes_the_report_and_records(cli, store, workers, queue, namespace):
    worker = workers.start("--types", "experiment", lease=LEASE)
    result = cli("experiment", "--sae", "lfw-sae", "--head", "lfw-probe", "--dataset", "bundled-lfw", "--classes",
                 "face,non-face", "--images", "70:130", "--batch-size", "4", "--max-frequency", "0.5", "--watch",
                 "--namespace", namespace)
    assert result.exit_code == 0, result.output + worker.output()[-3000:]
    job_id = result.output.split()[0]
    assert f"output  experiments/{job_id}" in result.output and "succeeded" in result.output
    job = queue.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.attempts == 1 and job.result["resumed_from"] is None
    report = check_output(store, f"experiments/{job_id}", job_id)

    assert report["task"] == "classify" and report["n_images"] == 60 and report["phase"] == "done"
    assert [e["class_name"] for e in report["per_entry"]] == ["face", "non-face"]
    assert all(e["score"] is not None and e["latents"] != e["random_latents"] for e in report["per_entry"])
    assert set(report["arms"]) == {"sae", "random-latent", "random-direction"}
    assert report["arms"]["sae"]["n_images"] == 60  # each image is edited by its own class's entry
    assert job.result["arms"] == report["arms"] and job.result["n_records"] == 60
    lines = store.get_bytes(f"experiments/{job_id}/records.jsonl").decode().splitlines()
    first = json.loads(lines[0])
    assert first["image_index"] == 70 and set(first["arms"]) == {"sae", "random-latent", "random-direction"}
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_sigkilled_experiment_resumes_to_the_same_aggregate(store, workers, queue):
    job = queue.submit("experiment", {**SPEC, "checkpoint_seconds": 0})
    # Two workers start together (so the second one's start-up overlaps the run); whichever takes the job is killed.
    pair = [workers.start("--types", "experiment", lease=LEASE) for _ in range(2)]
    parts = f"jobs/{job.id}/checkpoints/records/"
    wait_for(lambda: len(store.list(parts)) >= 2, timeout=90, interval=0.02, what="two record parts of the run phase")
    (holder,) = [w for w in pair if w.messages("job started", job_id=job.id)]
    assert queue.get(job.id).lost_leases == 0
    holder.signal(signal.SIGKILL)
    holder.wait()
    assert queue.get(job.id).progress.fraction < 0.97, "the run ended before the kill; make the experiment longer"

    other = pair[1 - pair.index(holder)]
    done = queue.wait(job.id, timeout=90)
    assert done.state is JobState.SUCCEEDED, (done.error, other.output()[-3000:])
    assert done.attempts == 2 and done.lost_leases == 1 and other.messages("job started (taken over)", job_id=job.id)
    assert done.result["resumed_from"] > 15  # past the 15 selection steps (60 images, 4 per step)
    check_output(store, f"experiments/{job.id}", job.id)


def test_via_services_spec_and_error_mapping():
    """Spec checks of ``via``; a service's answer to bad input fails the job at once, overload is retried."""
    from sae_shared.client import ClientError
    from sae_shared.jobs import InvalidSpec, validate_spec
    from services.worker.context import PermanentError
    from services.worker.experiment_handler import open_experiment, service_errors

    spec = validate_spec("experiment", {**SPEC, "via": "services"})
    assert spec.via == "services" and validate_spec("experiment", SPEC).via == "local"
    for extra, message in [({"via": "services", "services_url": "grpc://127.0.0.1:9000"}, "services_url: unknown field"),
                           ({"via": "services", "checkpoint": "w.onnx"}, "checkpoint apply to via='local' only"),
                           ({"via": "services", "device": "cuda"}, "device apply to via='local' only"),
                           ({"via": "services", "selection": "f1-attribution"}, "needs the head's gradient"),
                           ({"via": "remote"}, "via: Input should be 'local' or 'services'")]:
        with pytest.raises(InvalidSpec, match=re.escape(message)):
            validate_spec("experiment", {**SPEC, **extra})
    with pytest.raises(ValueError, match="needs a client of the services"):
        open_experiment(spec, store=None)
    with pytest.raises(PermanentError, match="NOT_FOUND"):
        with service_errors("SAE saes/x"):
            raise ClientError("NOT_FOUND", "no SAE 'x'")
    with pytest.raises(ClientError, match="UNAVAILABLE"):
        with service_errors("experiment step"):
            raise ClientError("UNAVAILABLE", "replica restarting")
