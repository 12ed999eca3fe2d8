"""The ``analyze`` job and the ``saevctl analyze`` / ``saevctl analysis`` commands, on a real Redis, a real S3 server
and real worker processes.

A synthetic shard set (d_model 16; 1 CLS + 16 patch tokens on a 4 x 4 grid; 2 views per image of a small
ImageFolder written to a temporary folder) and a tiny ReLU SAE saved to the store. A job whose worker is SIGKILLed
mid-pass is resumed by another worker from its checkpoint and publishes exactly what an undisturbed run computes;
submitting it again reuses the published analysis.
"""

from __future__ import annotations

import json
import secrets
import signal

import numpy as np
import pytest
import torch

from sae_shared.queue import JobState
from workers_support import wait_for
from workers_support import cli, env, queue, store, workers  # noqa: F401 - fixtures

LEASE = 1.0
D, S, GRID = 16, 48, (4, 4)
N_IMAGES, VIEWS = 120, 2
N_ROWS = N_IMAGES * VIEWS
BACKBONE = "fake:vit"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def namespace() -> str:
    return "a" + secrets.token_hex(4)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def inputs(store, tmp_path):
    """(sae_id, acts_id, dataset spec): images on disk, a shard set of their views, an SAE with statistics."""
    from PIL import Image

    from sae_shared.datasets import Augmentation
    from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder, save_sae
    from sae_shared.sae.stats import LOG_FREQ_EDGES, LatentStats, log_frequency_histogram
    from sae_shared.shards import ShardSetMetadata, ShardSetWriter, TokenLayout, compute_acts_id

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + i % 5, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    from sae_shared.datasets import ImageFolder

    ds = ImageFolder(root)
    aug = Augmentation(seed=3, views_per_image=VIEWS)
    rows = []
    for i in range(N_IMAGES):
        w, h = ds.load_image(i).size
        for v in range(VIEWS):
            rows.append({"image_index": i, "image_id": ds.sample(i).image_id, "label": ds.sample(i).label,
                         "view_index": v, "view": aug.view(i, v, w, h).to_json()})

    layout = TokenLayout(n_tokens=1 + 16, cls_index=0, register_indices=(), patch_start=1, patch_grid=GRID)
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(N_ROWS, 1, layout.n_tokens, D, generator=g)
    meta = ShardSetMetadata(
        acts_id=compute_acts_id(dataset_id=ds.id, dataset_hash="h", backbone_id=BACKBONE, layers=[6], tokens="all",
                                dtype="float32", augmentation=aug.to_json()),
        backbone_id=BACKBONE, layers=(6,), tokens="all", token_layout=layout, d_model=D, dtype="float32",
        n_rows=N_ROWS, rows_per_shard=64, dataset_id=ds.id, dataset_hash="h", augmentation=aug.to_json(),
    )
    writer = ShardSetWriter(store, meta)
    for s in range(meta.n_shards):
        r = meta.shard_rows(s)
        writer.write_shard(s, acts[r.start:r.stop].contiguous(), rows[r.start:r.stop])
    writer.commit()

    sae = SparseAutoencoder(SAEConfig(d_model=D, d_sae=S, variant=Relu(), seed=1),
                            contract=Contract(backbone_id=BACKBONE, layer=6, tokens="patches"))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.5, -4.0, S))
    # Statistics that make latents 5, 9 and 11 worth looking at (the job renders tiles for at most two).
    freq = torch.full((S,), 0.05, dtype=torch.float64)
    freq[[5, 9, 11]] = 1e-3
    mean = torch.ones(S)
    sae.stats = LatentStats(n_tokens=10_000, frequency=freq, mean_when_firing=mean, max=mean.clone(),
                            p99=mean.clone(), log_freq_edges=LOG_FREQ_EDGES.clone(),
                            log_freq_counts=log_frequency_histogram(freq))
    save_sae(sae, "saes/sae1", store=store)
    return "sae1", meta.acts_id, f"imagefolder:{root}"


# ------------------------------------------------------------------------------------------------ tests


def test_killed_analysis_resumes_to_the_same_result_and_a_second_run_reuses_it(
    store, inputs, workers, queue, one_thread
):
    from sae_shared.analysis import ANALYSIS_JSON, ExemplarAnalysis, analysis_prefix, open_analysis
    from sae_shared.sae import load_sae
    from sae_shared.shards import ShardSet
    from sae_shared.tiles import get_tile

    sae_id, acts_id, dataset = inputs
    spec = {"sae_id": sae_id, "acts_id": acts_id, "top_k": 6, "reverse_n": 5, "batch_rows": 2,
            "checkpoint_seconds": 0, "dataset": dataset, "max_tiles": 2, "tiles_per_latent": 3, "device": "cpu"}
    job = queue.submit("analyze", spec)
    first = workers.start("--types", "analyze", lease=LEASE)
    checkpoint = f"jobs/{job.id}/checkpoints/analyze.state"
    wait_for(lambda: store.exists(checkpoint), timeout=60, interval=0.02, what="a first checkpoint")
    first.signal(signal.SIGKILL)
    first.wait()
    assert queue.get(job.id).progress.fraction < 0.85, "the pass ended before the kill; make the job longer"
    assert not store.is_complete(analysis_prefix(sae_id))

    second = workers.start("--types", "analyze", lease=LEASE)
    done = queue.wait(job.id, timeout=90)
    assert done.state is JobState.SUCCEEDED, (done.error, second.output()[-3000:])
    assert done.attempts == 2 and done.lost_leases == 1
    result = done.result
    assert result["reused"] is False and 0 < result["resumed_from"] < N_ROWS
    assert result["n_rows"] == N_ROWS and result["n_images"] == N_IMAGES and result["tiles"] == 2
    assert result["tokens_per_s"] > 0

    # An undisturbed run, in this process, computes the same bytes.
    shard_set = ShardSet(store, acts_id)
    reference = ExemplarAnalysis(load_sae(f"saes/{sae_id}", store=store), shard_set, top_k=6, reverse_n=5,
                                 batch_rows=2)
    reference.run()
    expected = reference.finish()
    shard_set.close()
    prefix = analysis_prefix(sae_id)
    for name, data in expected.files().items():
        assert store.get_bytes(f"{prefix}/{name}") == data, name
    doc = store.get_json(f"{prefix}/{ANALYSIS_JSON}")
    assert doc["analysis_id"] == result["analysis_id"] and doc["resumed_from"] == result["resumed_from"]
    assert doc["tiles"]["latents"] == [5, 9] and doc["tiles"]["per_latent"] == 3
    manifest = store.read_manifest(prefix)
    assert manifest["extra"]["produced_by"]["job_id"] == job.id
    assert not store.list(f"jobs/{job.id}/checkpoints/")  # cleaned up after publication

    # The tiles: pre-rendered ones come from the pack, byte for byte what rendering them again gives.
    reader = open_analysis(store, sae_id)
    packed = get_tile(store, sae_id, 5, 2)
    from sae_shared.tiles import model_input_pixels, overlay, encode_png, open_view_dataset

    e = reader.exemplars(5)[2]
    ds = open_view_dataset(dataset, store)
    assert e.view == expected.exemplar("patch", 5, 2).view and e.image_id == ds.sample(e.image_index).image_id
    pixels = model_input_pixels(ds.load_image(e.image_index), e.view, {}, GRID)
    assert packed == encode_png(overlay(pixels, e.heatmap, reader.scale(5)))
    assert pixels.shape == (64, 64, 3)  # no recorded transform: 16 pixels per patch

    # Submitting the same analysis again reuses it.
    again = queue.submit("analyze", spec)
    redone = queue.wait(again.id, timeout=60)
    assert redone.state is JobState.SUCCEEDED and redone.result["reused"] is True
    assert store.read_manifest(prefix)["committed_at"] == manifest["committed_at"]
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


def test_cli_analyze_watch_and_the_analysis_commands(cli, store, inputs, workers, namespace, tmp_path):
    sae_id, acts_id, dataset = inputs
    for args in (["analyze"], ["analysis"], ["analysis", "show"], ["analysis", "exemplars"], ["analysis", "image"],
                 ["analysis", "tile"]):
        result = cli(*args, "--help")
        assert result.exit_code == 0, (args, result.output)
    # refused at submit
    missing = cli("analyze", "nope", "--acts", acts_id, "--namespace", namespace)
    assert missing.exit_code == 1 and "no SAE 'nope'" in missing.output
    wrong_layer = cli("analyze", sae_id, "--acts", acts_id, "--layer", "3", "--namespace", namespace)
    assert wrong_layer.exit_code == 2 and "layer 3 was not recorded" in wrong_layer.output
    not_yet = cli("analysis", "show", sae_id)
    assert not_yet.exit_code == 1 and f"saevctl analyze {sae_id}" in not_yet.output

    worker = workers.start("--types", "analyze", lease=LEASE)
    watched = cli("analyze", sae_id, "--acts", acts_id, "--top-k", "4", "--no-tiles", "--watch",
                  "--namespace", namespace)
    assert watched.exit_code == 0, watched.output + worker.output()[-3000:]
    assert "succeeded" in watched.output and f"saes/{sae_id}/analysis/" in watched.output

    shown = cli("analysis", "show", sae_id)
    assert shown.exit_code == 0 and f"{N_ROWS} views of {N_IMAGES} images" in shown.output
    assert "top 4 per latent (patch, cls)" in shown.output and "tiles not requested" in shown.output
    listed = cli("analysis", "exemplars", sae_id, "0", "--json", "--heatmaps")
    assert listed.exit_code == 0, listed.output
    exemplars = json.loads(listed.output)
    assert len(exemplars) == 4 and [e["rank"] for e in exemplars] == [0, 1, 2, 3]
    assert exemplars[0]["value"] >= exemplars[-1]["value"] and np.asarray(exemplars[0]["heatmap"]).shape == GRID
    assert exemplars[0]["view"]["crop"] and exemplars[0]["image_id"].endswith(".png")
    image = cli("analysis", "image", sae_id, exemplars[0]["image_id"], "--json")
    assert image.exit_code == 0 and 0 in [x["latent"] for x in json.loads(image.output)]
    assert cli("analysis", "exemplars", sae_id, "999").exit_code == 2

    # No tiles were pre-rendered and the recording names no openable dataset: a tile needs --dataset.
    out = tmp_path / "tile.png"
    no_dataset = cli("analysis", "tile", sae_id, "0", "-o", str(out))
    assert no_dataset.exit_code == 2 and "dataset" in no_dataset.output
    tile = cli("analysis", "tile", sae_id, "0", "-o", str(out), "--rank", "1", "--dataset", dataset)
    assert tile.exit_code == 0, tile.output
    assert out.read_bytes()[:4] == b"\x89PNG"

    # The same inputs here, in process: reused.
    local = cli("analyze", sae_id, "--acts", acts_id, "--top-k", "4", "--no-tiles", "--local", "--json")
    assert local.exit_code == 0, local.output
    assert json.loads(local.output[local.output.index("{"):])["reused"] is True
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
