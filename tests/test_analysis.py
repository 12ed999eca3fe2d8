"""Feature analysis (``sae_shared.analysis``) and tiles (``sae_shared.tiles``) on the real S3 server.

Small shard sets are written directly with ``ShardSetWriter``; tiny SAEs are built by hand. The streaming top-k is
compared with a brute force over every row, a planted latent checks that heatmaps land on the right patch (on a
non-square grid, so a transposition shows), and tiles are checked pixel by pixel on images whose halves differ in
colour, drawn through a flipped view.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from sae_shared.analysis import (AnalysisError, AnalyzeOptions, ExemplarAnalysis, NotAnalysed, analysis_prefix,
                                 analyze, open_analysis)
from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder, save_sae
from sae_shared.shards import ShardSet, ShardSetMetadata, ShardSetWriter, TokenLayout, compute_acts_id

BACKBONE = "fake:vit"


@pytest.fixture
def store(settings, bucket):
    from sae_shared.settings import Settings
    from sae_shared.storage import open_store

    return open_store(Settings(**{**settings.model_dump(), "storage_url": f"s3://{bucket}"}))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_set(store, acts_nltd: torch.Tensor, layout: TokenLayout, layers, rows: list[dict], *, rows_per_shard: int,
              transform: dict | None = None, dataset_id: str = "fake", tag: str = "") -> str:
    aug = {"seed": 0, "views_per_image": 1, "tag": tag}
    n = acts_nltd.shape[0]
    meta = ShardSetMetadata(
        acts_id=compute_acts_id(dataset_id=dataset_id, dataset_hash="h", backbone_id=BACKBONE, layers=layers,
                                tokens="all", dtype="float32", augmentation=aug),
        backbone_id=BACKBONE, layers=tuple(layers), tokens="all", token_layout=layout, d_model=acts_nltd.shape[-1],
        dtype="float32", n_rows=n, rows_per_shard=rows_per_shard, dataset_id=dataset_id, dataset_hash="h",
        augmentation=aug, transform=transform or {},
    )
    writer = ShardSetWriter(store, meta)
    for s in range(meta.n_shards):
        r = meta.shard_rows(s)
        writer.write_shard(s, acts_nltd[r.start:r.stop].contiguous(), rows[r.start:r.stop])
    writer.commit()
    return meta.acts_id


def make_sae(d: int, s: int, layer: int, seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_model=d, d_sae=s, variant=Relu(), seed=seed),
                            contract=Contract(backbone_id=BACKBONE, layer=layer, tokens="patches"))
    with torch.no_grad():
        # Thresholds from easy to hard: some latents fire often, some on a handful of views, some never.
        sae.b_enc.copy_(torch.linspace(-0.2, -15.0, s))
    return sae.eval()


# ------------------------------------------------------------------------------------------------ random data

N_ROWS, D, S, GRID = 58, 8, 24, (2, 3)
LAYOUT = TokenLayout(n_tokens=1 + 1 + 6, cls_index=0, register_indices=(1,), patch_start=2, patch_grid=GRID)
LAYERS = (2, 4)


@pytest.fixture
def random_set(store):
    g = torch.Generator().manual_seed(7)
    acts = torch.randn(N_ROWS, len(LAYERS), LAYOUT.n_tokens, D, generator=g)
    acts[3:9] *= 3.0  # strong rows, and exact copies of them much later: ties the merge must break by row order
    acts[40:46] = acts[3:9]
    # two views per image; view 1 is a flipped crop
    rows = [{"image_index": r // 2, "image_id": f"img{r // 2}", "label": r % 3,
             "view": {"crop": [0, 0, 10, 10], "flip": False} if r % 2 == 0 else {"crop": [1, 2, 8, 9], "flip": True}}
            for r in range(N_ROWS)]
    acts_id = write_set(store, acts, LAYOUT, LAYERS, rows, rows_per_shard=16)
    return acts_id, acts[:, 1], rows  # layer 4


def brute_force(sae, acts_ntd, k):
    with torch.no_grad():
        patch = sae.encode(acts_ntd[:, 2:]).float()  # [N, P, S]
        cls = sae.encode(acts_ntd[:, 0]).float()  # [N, S]
    out = {}
    for kind, val_ns in (("patch", patch.amax(1)), ("cls", cls)):
        order = torch.sort(val_ns.t(), dim=1, descending=True, stable=True).indices[:, :k]  # [S, k]
        values = val_ns.t().gather(1, order)
        rows = torch.where(values > 0, order, -1)
        out[kind] = (torch.where(values > 0, values, 0.0), rows)
    return patch, cls, out


def test_streaming_top_k_equals_brute_force_and_resumes_exactly(store, random_set):
    acts_id, acts_ntd, rows = random_set
    sae = make_sae(D, S, layer=4)
    k = 5
    patch, cls, expected = brute_force(sae, acts_ntd, k)
    ss = ShardSet(store, acts_id)
    run = ExemplarAnalysis(sae, ss, top_k=k, reverse_n=4, batch_rows=5)
    run.run()
    result = run.finish()
    fired = (expected["patch"][1] >= 0).sum(1)
    assert (fired == k).any() and ((fired > 0) & (fired < k)).any() and (fired == 0).any(), "make the data varied"
    for kind in ("patch", "cls"):
        ex = result.exemplars[kind]
        values, brows = expected[kind]
        assert torch.equal(ex["rows"], brows), kind
        torch.testing.assert_close(ex["values"], values)
        # every kept view's heatmap is the latent's activation on each of its patches, on the (2, 3) grid
        r = brows.clamp(min=0)
        maps = patch[r, :, torch.arange(S).unsqueeze(1)]  # [S, k, P]
        maps = torch.where((brows >= 0).unsqueeze(-1), maps, 0.0).reshape(S, k, *GRID)
        assert ex["maps"].dtype == torch.float16 and ex["maps"].shape == (S, k, *GRID)
        torch.testing.assert_close(ex["maps"].float(), maps, atol=2e-3, rtol=1e-3)
        # provenance of every slot
        for lat, rank in [(0, 0), (3, 1), (int(fired.argmin()), 0)]:
            row = int(brows[lat, rank])
            if row < 0:
                assert ex["image"][lat, rank] == -1 and ex["image_index"][lat, rank] == -1
                continue
            assert ex["image_index"][lat, rank] == row // 2
            assert result.images["image_id"][int(ex["image"][lat, rank])] == f"img{row // 2}"
            assert ex["crop"][lat, rank].tolist() == rows[row]["view"]["crop"]
            assert bool(ex["flip"][lat, rank]) == rows[row]["view"]["flip"]
    # patch top-1 is the largest activation anywhere: the colour scale
    torch.testing.assert_close(result.stats["scale"], result.exemplars["patch"]["maps"].float().flatten(1).amax(1))
    torch.testing.assert_close(result.stats["max_patch"], patch.amax((0, 1)))
    torch.testing.assert_close(result.stats["frequency"], (patch > 0).double().mean((0, 1)))
    torch.testing.assert_close(result.stats["view_frequency"], (patch.amax(1) > 0).double().mean(0))

    # reverse index: per image, the max over its two views, top-4
    per_image = patch.amax(1).view(N_ROWS // 2, 2, S).amax(1)
    assert result.images["image_id"] == [f"img{i}" for i in range(N_ROWS // 2)]
    for i in range(N_ROWS // 2):
        want_v, want_l = per_image[i].topk(4)
        n_pos = int((want_v > 0).sum())
        got_l = result.reverse["latents"][i]
        assert set(got_l[:n_pos].tolist()) == set(want_l[:n_pos].tolist()) and (got_l[n_pos:] == -1).all()
        torch.testing.assert_close(result.reverse["values"][i, :n_pos], want_v[:n_pos])

    # Stopped after some batches and resumed from the state bytes: the same result, bit for bit.
    first = ExemplarAnalysis(sae, ss, top_k=k, reverse_n=4, batch_rows=5)
    for done in first.batches():
        if done >= 25:
            break
    state = first.state_bytes()
    second = ExemplarAnalysis(sae, ss, top_k=k, reverse_n=4, batch_rows=5, state=state)
    assert second.next_row == first.next_row == 26  # batches stop at shard ends: 0, 5, 10, 15 | 16, 21 | 26
    second.run()
    resumed = second.finish()
    assert resumed.files() == result.files()
    with pytest.raises(AnalysisError, match="another analysis"):
        ExemplarAnalysis(sae, ss, top_k=k + 1, reverse_n=4, batch_rows=5, state=state)
    with pytest.raises(AnalysisError, match="unreadable"):
        ExemplarAnalysis(sae, ss, top_k=k, reverse_n=4, batch_rows=5, state=b"garbage")
    # ties: the copies (rows 40-45) never displace their earlier originals (rows 3-8)
    # (the brute force's stable sort breaks them so; the exact equality above held with them in play)
    got = result.exemplars["patch"]["rows"]
    assert any(set(got[lat].tolist()) & set(range(3, 9)) for lat in range(S))
    for lat in range(S):
        kept = set(got[lat].tolist())
        assert all(r - 37 in kept for r in kept & set(range(40, 46))), (lat, kept)
    # the first rows only
    head = ExemplarAnalysis(sae, ss, top_k=k, reverse_n=4, batch_rows=7, max_rows=20)
    head.run()
    _, _, head_expected = brute_force(sae, acts_ntd[:20], k)
    assert torch.equal(head.finish().exemplars["cls"]["rows"], head_expected["cls"][1])
    # the batch size does not change the answer
    other = ExemplarAnalysis(sae, ss, top_k=k, reverse_n=4, batch_rows=16)
    other.run()
    assert torch.equal(other.finish().exemplars["patch"]["rows"], result.exemplars["patch"]["rows"])
    ss.close()


def test_contract_is_checked(store, random_set):
    from sae_shared.sae import ContractMismatch

    acts_id, _, _ = random_set
    ss = ShardSet(store, acts_id)
    sae = make_sae(D, S, layer=4)
    sae.contract = Contract(backbone_id="other:vit", layer=4, tokens="patches")
    with pytest.raises(ContractMismatch, match="other:vit"):
        ExemplarAnalysis(sae, ss)
    sae.contract = Contract(backbone_id=BACKBONE, layer=3, tokens="patches")
    with pytest.raises(Exception, match="layer 3 was not recorded"):
        ExemplarAnalysis(sae, ss)
    ss.close()


# ------------------------------------------------------------------------------------------------ planted latent

PGRID = (3, 4)
PLAYOUT = TokenLayout(n_tokens=1 + 12, cls_index=0, register_indices=(), patch_start=1, patch_grid=PGRID)
PD, PS = 6, 5


def planted_sae() -> SparseAutoencoder:
    """Latent j reads dimension j (j < 5) and fires above 0.5."""
    sae = make_sae(PD, PS, layer=0)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[torch.arange(PS), torch.arange(PS)] = 1.0
        sae.b_enc.fill_(-0.5)
        sae.W_dec.copy_(sae.W_enc.t())
    return sae


def planted_acts(n_rows: int, patch_of_row) -> torch.Tensor:
    """Noise below the threshold; latent 0 planted on one patch per row (value rising with the row), latent 1 on
    the CLS token (value falling with the row)."""
    g = torch.Generator().manual_seed(3)
    acts = 0.2 * torch.rand(n_rows, 1, PLAYOUT.n_tokens, PD, generator=g)
    for r in range(n_rows):
        acts[r, 0, 1 + patch_of_row(r), 0] = 1.0 + 0.01 * r
        acts[r, 0, 0, 1] = 2.0 - 0.01 * r
    return acts


def test_planted_latent_lights_its_patch(store):
    n_rows = 30
    patch_of_row = lambda r: (7 * r) % 12  # noqa: E731
    rows = [{"image_index": r, "image_id": f"i{r}", "label": None, "view": None} for r in range(n_rows)]
    acts_id = write_set(store, planted_acts(n_rows, patch_of_row), PLAYOUT, (0,), rows, rows_per_shard=8)
    ss = ShardSet(store, acts_id)
    run = ExemplarAnalysis(planted_sae(), ss, top_k=4, reverse_n=2, batch_rows=3)
    run.run()
    result = run.finish()
    ex = result.exemplars["patch"]
    assert ex["rows"][0].tolist() == [29, 28, 27, 26]  # the largest planted values
    for rank, row in enumerate(ex["rows"][0].tolist()):
        heat = ex["maps"][0, rank].float()
        assert heat.shape == PGRID
        r, c = divmod(patch_of_row(row), PGRID[1])
        assert (heat > 0).sum() == 1 and heat[r, c] == pytest.approx(0.5 + 0.01 * row, abs=1e-3), (rank, row)
        e = result.exemplar("patch", 0, rank)
        assert e.image_id == f"i{row}" and e.view is None and e.heatmap[r, c] > 0
    # CLS exemplars of latent 1: the earliest rows, and no patch of theirs fires for latent 1
    cls = result.exemplars["cls"]
    assert cls["rows"][1].tolist() == [0, 1, 2, 3]
    assert (cls["maps"][1] == 0).all() and cls["values"][1, 0] == pytest.approx(1.5)
    assert (result.exemplars["patch"]["rows"][1] == -1).all()  # latent 1 never fires on a patch
    assert (result.exemplars["patch"]["rows"][2:] == -1).all()
    assert result.reverse["latents"][:, 0].tolist() == [0] * n_rows
    assert (result.reverse["latents"][:, 1] == -1).all()
    ss.close()


# ------------------------------------------------------------------------------------------------ tiles

TGRID = (3, 4)
TLAYOUT = TokenLayout(n_tokens=1 + 12, cls_index=0, register_indices=(), patch_start=1, patch_grid=TGRID)
RED, BLUE = (200, 0, 0), (0, 0, 200)


def _half_image(i: int):
    from PIL import Image

    arr = np.zeros((48, 64, 3), dtype=np.uint8)
    arr[:, :32] = RED
    arr[:, 32:] = BLUE
    arr[0, 0] = (i, i, i)  # makes every file differ
    return Image.fromarray(arr)


@pytest.fixture
def image_set(store, tmp_path):
    """Four images (left half red, right half blue) in an ImageFolder; rows: each image whole, then flipped.
    Latent 0 is planted on patch (1, 0) of the flipped views, latent 2 on patch (2, 3) of the unflipped ones."""
    from sae_shared.backbones.transforms import ImageTransform

    root = tmp_path / "imgs"
    (root / "c").mkdir(parents=True)
    for i in range(4):
        _half_image(i).save(root / "c" / f"im{i}.png")
    n_rows = 8
    rows = [{"image_index": r // 2, "image_id": f"c/im{r // 2}.png", "label": 0,
             "view": {"crop": [0, 0, 64, 48], "flip": bool(r % 2)}} for r in range(n_rows)]
    g = torch.Generator().manual_seed(1)
    acts = 0.2 * torch.rand(n_rows, 1, TLAYOUT.n_tokens, PD, generator=g)
    for r in range(n_rows):
        if r % 2:
            acts[r, 0, 1 + 1 * 4 + 0, 0] = 1.5 + 0.1 * r
        else:
            acts[r, 0, 1 + 2 * 4 + 3, 2] = 1.0 + 0.1 * r
        acts[r, 0, 0, 1] = 1.0 + 0.05 * r  # latent 1 on the CLS token only
    transform = ImageTransform(size=(36, 48), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize_mode="squash",
                               interpolation="bilinear").to_dict()
    acts_id = write_set(store, acts, TLAYOUT, (0,), rows, rows_per_shard=3, transform=transform,
                        dataset_id="imagefolder:imgs", tag="tiles")
    return acts_id, f"imagefolder:{root}"


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int64)


def test_tiles_overlay_the_right_patch_of_the_redrawn_view(store, image_set):
    from sae_shared.sae.stats import LOG_FREQ_EDGES, LatentStats, log_frequency_histogram
    from sae_shared.tiles import ALPHA, _LUT, get_tile, select_latents, tile_cache_key

    acts_id, dataset = image_set
    sae = planted_sae()
    # Held-out statistics: latent 0 is worth looking at; latent 2 fires too often (no pre-rendered tiles).
    freq = torch.tensor([1e-3, 0.0, 5e-2, 0.0, 0.0], dtype=torch.float64)
    mean = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    sae.stats = LatentStats(n_tokens=1000, frequency=freq, mean_when_firing=mean, max=mean.clone(), p99=mean.clone(),
                            log_freq_edges=LOG_FREQ_EDGES.clone(), log_freq_counts=log_frequency_histogram(freq))
    assert select_latents(sae.stats) == [0]
    save_sae(sae, "saes/s1", store=store)
    with pytest.raises(NotAnalysed, match="saevctl analyze s1"):
        open_analysis(store, "s1")

    summary = analyze(store, "s1", acts_id, AnalyzeOptions(top_k=3, reverse_n=2, dataset=dataset, batch_rows=2))
    assert summary["reused"] is False and summary["tiles"] == 1 and summary["n_rows"] == 8
    assert analyze(store, "s1", acts_id, AnalyzeOptions(top_k=3, reverse_n=2, dataset=dataset))["reused"] is True
    manifest = store.read_manifest(analysis_prefix("s1"))
    assert {"analysis.json", "exemplars-patch.safetensors", "exemplars-cls.safetensors", "latents.safetensors",
            "reverse-index.safetensors", "images.json", "tiles.json", "tiles-patch.pack"} == set(manifest["files"])

    reader = open_analysis(store, "s1")
    assert open_analysis(store, "s1") is reader  # unchanged: reused
    ex = reader.exemplars(0)
    assert [e.row for e in ex] == [7, 5, 3] and all(e.view.flip for e in ex)
    assert ex[0].image_id == "c/im3.png" and ex[0].heatmap.shape == TGRID and ex[0].heatmap[1, 0] > 0.9
    assert reader.scale(0) == pytest.approx(float(ex[0].heatmap.max()))
    assert [e.row for e in reader.exemplars(2, limit=2)] == [6, 4]
    assert reader.exemplars(4) == []
    assert reader.image_latents("c/im3.png") == [(0, pytest.approx(1.7, abs=1e-2)),
                                                 (2, pytest.approx(1.1, abs=1e-2))]
    assert [lat for lat, _ in reader.image_latents(image_index=0)] == [0, 2]  # 1.1 (flipped view) > 0.5

    # Latent 0's top tile, pre-rendered: the flipped view (blue on the left), patch (1, 0) painted at full scale.
    tile = _png(get_tile(store, "s1", 0, 0))
    assert tile.shape == (36, 48, 3)
    patch_h, patch_w = 12, 12
    hot = tile[patch_h + 2:2 * patch_h - 2, 2:patch_w - 2].reshape(-1, 3)
    level = ex[0].heatmap[1, 0] / reader.scale(0)
    want = np.round(np.array(BLUE) * (1 - ALPHA * level) + _LUT[int(round(level * 255))] * ALPHA * level)
    assert np.abs(hot - want).max() <= 2
    for y, x, colour in [(30, 5, BLUE), (5, 5, BLUE), (30, 42, RED), (18, 20, BLUE), (18, 30, RED)]:
        assert np.abs(tile[y, x] - np.array(colour)).max() <= 2, (y, x, tile[y, x])
    # Latent 2 was not pre-rendered: rendered on demand (unflipped view, red on the left, patch (2, 3) hot), cached.
    cached = tile_cache_key("s1", reader.analysis_id, "patch", 2, 0)
    assert not store.exists(cached)
    tile2 = _png(get_tile(store, "s1", 2, 0))
    assert store.exists(cached) and _png(store.get_bytes(cached)).tolist() == tile2.tolist()
    assert np.abs(tile2[5, 5] - np.array(RED)).max() <= 2 and np.abs(tile2[5, 42] - np.array(BLUE)).max() <= 2
    assert np.abs(tile2[30, 42] - np.array(BLUE)).max() > 40  # patch (2, 3) painted
    # Tiles as objects of their own (what the Features API answers by default): the pre-rendered one copied out of
    # the pack, the cached one as it is; the source image of an analysed image; a latent's histogram.
    from sae_shared.tiles import source_image_png, tile_object

    key0 = tile_object(store, "s1", 0, 0)
    assert key0 == tile_cache_key("s1", reader.analysis_id, "patch", 0, 0)
    assert store.get_bytes(key0) == get_tile(store, "s1", 0, 0) and tile_object(store, "s1", 2, 0) == cached
    assert _png(source_image_png(store, "s1", 3)).tolist() == np.asarray(_half_image(3)).tolist()
    hist = reader.latent_histogram(0, bins=4)
    maps = np.stack([e.heatmap for e in ex])
    assert hist["n_values"] == maps.size and sum(hist["counts"]) == int((maps > 0).sum())
    assert hist["edges"][-1] == pytest.approx(float(maps.max())) and hist["max_activation"] == ex[0].value
    with pytest.raises(KeyError):
        get_tile(store, "s1", 4, 0)
    with pytest.raises(IndexError):
        get_tile(store, "s1", 99, 0)
    cls_tile = _png(get_tile(store, "s1", 1, 0, kind="cls"))  # CLS exemplar of latent 1 (row 7): nothing painted
    assert reader.exemplars(1, "cls")[0].row == 7
    assert np.abs(cls_tile[18, 6] - np.array(BLUE)).max() <= 2 and np.abs(cls_tile[30, 42] - np.array(RED)).max() <= 2

    # A dataset that is not the recording's is refused (image ids differ).
    from sae_shared.tiles import TileError

    with pytest.raises(TileError, match="does not match|not the one"):
        get_tile(store, "s1", 2, 1, dataset="bundled-lfw")


def test_a_bad_latent_and_a_damaged_analysis_are_different_errors_through_the_services():
    """Out of range is the caller's (INVALID_ARGUMENT); a table shorter than the SAE is the stored file's
    (FAILED_PRECONDITION), whichever read trips over it."""
    from sae_shared.analysis import LatentOutOfRange
    from services.common.errors import FailedPrecondition, InvalidArgument
    from services.sae.analysis_reads import mapped

    def bad_latent():
        raise LatentOutOfRange("latent 99 out of range [0, 8)")

    def short_table():
        scales = [0.0] * 4  # a stats table of 4 rows for an SAE of 8 latents
        return scales[6]

    with pytest.raises(InvalidArgument, match="latent 99 out of range"):
        mapped(bad_latent)
    with pytest.raises(FailedPrecondition, match="the stored analysis cannot be read"):
        mapped(short_table)
