"""Saving and loading SAEs (local directory and object store): round trips and refusal of invalid files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sae_shared.sae import (
    BatchTopK,
    Contract,
    InvalidSAEFile,
    Matryoshka,
    Relu,
    SAEConfig,
    SparseAutoencoder,
    TopK,
    compute_stats,
    load_sae,
    save_sae,
)
from sae_shared.sae.io import CFG_FILE, STATS_FILE, WEIGHTS_FILE

D, S = 8, 24
CONTRACT = Contract("dinov2:vit_small_patch14_dinov2", 6, "patches")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trained_like(variant=None, *, stats=True, matryoshka=None) -> SparseAutoencoder:
    sae = SparseAutoencoder(
        SAEConfig(D, S, variant or Relu(l1_coeff=1e-3), matryoshka=matryoshka, seed=2), contract=CONTRACT
    )
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(S, generator=g) * 0.2)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.2)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.05)
    sae.set_normalisation(torch.randn(D, generator=g), 1.9)
    sae.eval()
    if stats:
        compute_stats(sae, torch.randn(500, D, generator=g) * 1.9, batch_size=128, source="heldout")
    return sae


def assert_same_sae(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    assert a.cfg == b.cfg and a.contract == b.contract
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(9)) * 2
    with torch.no_grad():
        assert torch.equal(a.encode(x), b.encode(x))
        assert torch.equal(a.decode(a.encode(x)), b.decode(b.encode(x)))
    if a.stats is None:
        assert b.stats is None
    else:
        for name in a.stats.TENSORS:
            assert torch.equal(getattr(a.stats, name), getattr(b.stats, name)), name
        assert (a.stats.n_tokens, a.stats.source, a.stats.metrics) == (b.stats.n_tokens, b.stats.source, b.stats.metrics)


@pytest.mark.parametrize(
    "variant,matryoshka",
    [(Relu(l1_coeff=1e-3), None), (TopK(k=4), Matryoshka((8, S))), (BatchTopK(k=3), None)],
    ids=["relu", "topk-matryoshka", "batchtopk"],
)
def test_save_then_load_from_a_local_directory_gives_the_same_sae(tmp_path, variant, matryoshka):
    sae = trained_like(variant, matryoshka=matryoshka)
    save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [CFG_FILE, WEIGHTS_FILE, STATS_FILE]
    cfg = json.loads((tmp_path / "sae" / CFG_FILE).read_text())
    assert cfg["schema"] == 1 and cfg["sae"]["variant"]["kind"] == variant.kind
    assert cfg["contract"] == {"backbone_id": CONTRACT.backbone_id, "layer": 6, "tokens": "patches"}
    assert cfg["normalisation"]["scale"] == pytest.approx(1.9) and cfg["statistics"]["n_tokens"] == 500
    loaded = load_sae(tmp_path / "sae")
    assert_same_sae(sae, loaded)
    assert not loaded.training


def test_an_sae_without_statistics_saves_no_stats_file_and_loads_without_them(tmp_path):
    sae = trained_like(stats=False)
    save_sae(sae, tmp_path / "s")
    assert not (tmp_path / "s" / STATS_FILE).exists()
    assert load_sae(tmp_path / "s").stats is None


def test_save_refuses_an_sae_without_contract_and_an_existing_folder_without_overwrite(tmp_path):
    sae = trained_like(stats=False)
    sae.contract = None
    with pytest.raises(ValueError, match="without a backbone/layer/tokens contract"):
        save_sae(sae, tmp_path / "x")
    sae.contract = CONTRACT
    save_sae(sae, tmp_path / "x")
    with pytest.raises(FileExistsError):
        save_sae(sae, tmp_path / "x")
    with torch.no_grad():
        sae.b_enc.add_(1.0)
    save_sae(sae, tmp_path / "x", overwrite=True)
    assert torch.equal(load_sae(tmp_path / "x").b_enc, sae.b_enc)
    assert [p.name for p in tmp_path.iterdir()] == ["x"], "no temporary folders left behind"


def test_round_trip_through_the_object_store_and_refusal_of_an_uncommitted_artifact(tmp_path):
    from sae_shared.storage import FileStore, IncompleteArtifact

    store = FileStore(tmp_path / "store")
    sae = trained_like(TopK(k=4))
    save_sae(sae, "saes/abc123", store=store)
    assert store.exists("saes/abc123/cfg.json") and store.read_manifest("saes/abc123")
    assert_same_sae(sae, load_sae("saes/abc123", store=store))

    writer = store.artifact("saes/half")
    writer.put_bytes(CFG_FILE, b"{}")  # a writer that died before commit()
    with pytest.raises(IncompleteArtifact):
        load_sae("saes/half", store=store)


# ------------------------------------------------------------------------------------------- validation


def _tamper_cfg(fn):
    def apply(folder):
        cfg = json.loads((folder / CFG_FILE).read_text())
        fn(cfg)
        (folder / CFG_FILE).write_text(json.dumps(cfg))

    return apply


def _tamper_weights(fn):
    def apply(folder):
        tensors = st_load((folder / WEIGHTS_FILE).read_bytes())
        fn(tensors)
        (folder / WEIGHTS_FILE).write_bytes(st_save(tensors))

    return apply


def _set(tensors, name, value):
    tensors[name] = value


CORRUPTIONS = {
    "unknown schema": (_tamper_cfg(lambda c: c.update(schema=99)), "unknown schema 99"),
    "no contract": (_tamper_cfg(lambda c: c.update(contract=None)), "no backbone/layer/tokens contract"),
    "contract without layer": (_tamper_cfg(lambda c: c["contract"].pop("layer")), "contract is missing"),
    "d_sae disagrees": (_tamper_cfg(lambda c: c.update(d_sae=25)), "disagree with the SAE config"),
    "unknown variant": (_tamper_cfg(lambda c: c["sae"].update(variant={"kind": "gated"})), "unknown SAE variant"),
    "bad hyperparameter": (_tamper_cfg(lambda c: c["sae"]["variant"].update(l1_coeff=-1)), "l1_coeff"),
    "bad scale": (_tamper_cfg(lambda c: c["normalisation"].update(scale=0)), "normalisation.scale"),
    "wrong shape": (_tamper_weights(lambda t: _set(t, "W_dec", torch.zeros(S, D + 1))), r"W_dec has shape \[24, 9\]"),
    "int dtype": (_tamper_weights(lambda t: _set(t, "b_enc", torch.zeros(S, dtype=torch.int32))), "floating dtype"),
    "nan": (_tamper_weights(lambda t: t["W_enc"].__setitem__((0, 0), float("nan"))), "NaN or infinite"),
    "missing tensor": (_tamper_weights(lambda t: t.pop("b_dec")), r"missing \['b_dec'\]"),
    "extra tensor": (_tamper_weights(lambda t: _set(t, "payload", torch.zeros(1))), r"unexpected \['payload'\]"),
    "not json": (lambda f: (f / CFG_FILE).write_bytes(b"\x80{"), "not valid JSON"),
    "not safetensors": (lambda f: (f / WEIGHTS_FILE).write_bytes(b"\x00" * 64), "not a valid safetensors file"),
    "stats shape": (
        lambda f: (f / STATS_FILE).write_bytes(
            st_save({**st_load((f / STATS_FILE).read_bytes()), "max": torch.zeros(S - 1)})
        ),
        r"max has shape",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_loading_refuses_an_invalid_file_with_a_message_naming_the_problem(tmp_path, corruption):
    save_sae(trained_like(), tmp_path / "sae")
    tamper, message = CORRUPTIONS[corruption]
    tamper(tmp_path / "sae")
    with pytest.raises(InvalidSAEFile, match=message):
        load_sae(tmp_path / "sae")


def test_loading_a_missing_folder_or_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "nowhere")
    save_sae(trained_like(), tmp_path / "sae")
    (tmp_path / "sae" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "sae")
