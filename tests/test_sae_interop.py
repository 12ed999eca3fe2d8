"""Importers (saev checkpoints, SAELens folders) and the SAELens exporter."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from safetensors.torch import save as st_save

from sae_shared.sae import BatchTopK, Contract, InvalidSAEFile, Relu, SAEConfig, SparseAutoencoder, TopK, load_sae, save_sae
from sae_shared.sae.interop import export_saelens, import_saelens, import_saev

D, S = 12, 36


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def saev_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, S, generator=g) / D**0.5,
        "b_enc": torch.randn(S, generator=g) * 0.1,
        "W_dec": torch.randn(S, D, generator=g) / D**0.5,
        "b_dec": torch.randn(D, generator=g) * 0.1,
    }


def write_saev(path, header: dict, state: dict) -> None:
    """saev's layout: one JSON header line, then torch.save of the state dict in the same file."""
    with open(path, "wb") as fh:
        fh.write((json.dumps(header) + "\n").encode())
        torch.save(state, fh)


def x_raw(n=30):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(11)) * 3 + 0.5


# ----------------------------------------------------------------------------------------------------- saev


@torch.no_grad()
def test_saev_checkpoint_imports_with_identity_normalisation_and_gives_the_formulas_codes(tmp_path):
    state = saev_state()
    header = {"schema": 5, "cfg": {"d_model": D, "d_sae": S, "activation": {"cls": "Relu", "params": {}}}}
    write_saev(tmp_path / "sae.pt", header, state)
    sae = import_saev(tmp_path / "sae.pt")
    assert isinstance(sae.cfg.variant, Relu) and sae.contract is None
    x = x_raw()
    f_ref = ((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"]).clamp_min(0)
    torch.testing.assert_close(sae.encode(x), f_ref)
    torch.testing.assert_close(sae.decode(f_ref), f_ref @ state["W_dec"] + state["b_dec"])


@torch.no_grad()
def test_saev_import_takes_contract_normalisation_and_topk_from_the_header_and_saves(tmp_path):
    state = saev_state(1)
    header = {"schema": 1, "cls": "TopK", "cfg": {"d_vit": D, "exp_factor": 3, "top_k": 5}}
    write_saev(tmp_path / "topk.pt", header, state)
    mean, scale = torch.linspace(-1, 1, D), 3.0
    sae = import_saev(
        tmp_path / "topk.pt", backbone_id="clip:ViT-B-16", layer=10, tokens="all", normalisation=(mean, scale)
    )
    assert sae.cfg.variant == TopK(k=5)
    assert sae.contract == Contract("clip:ViT-B-16", 10, "all")
    x = x_raw()
    pre = ((x - mean) / scale - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
    vals, idx = pre.topk(5, dim=-1)
    torch.testing.assert_close(sae.encode(x), torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0)))
    save_sae(sae, tmp_path / "saved")
    torch.testing.assert_close(load_sae(tmp_path / "saved").encode(x), sae.encode(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="all of backbone_id, layer and tokens"):
        import_saev(tmp_path / "topk.pt", backbone_id="clip:ViT-B-16")


def test_saev_checkpoint_with_a_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    state = {**saev_state(), "extra": Payload()}
    write_saev(tmp_path / "evil.pt", {"schema": 5, "cfg": {}}, state)
    with pytest.raises(InvalidSAEFile, match="refused the state dict"):
        import_saev(tmp_path / "evil.pt")
    assert not marker.exists(), "the payload must never run"

    # The payload is live: an unrestricted unpickler would have run it (which is why weights_only is used).
    data = (tmp_path / "evil.pt").read_bytes()
    torch.load(io.BytesIO(data[data.index(b"\n") + 1 :]), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"no newline at all", "no JSON header line"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b"{\"schema\": 5}\nnot a torch file", "refused the state dict"),
    ],
)
def test_saev_import_refuses_malformed_files(tmp_path, content, message):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(InvalidSAEFile, match=message):
        import_saev(tmp_path / "bad.pt")


def test_saev_import_refuses_inconsistent_shapes(tmp_path):
    state = saev_state()
    state["W_dec"] = torch.zeros(S, D + 1)
    write_saev(tmp_path / "bad.pt", {}, state)
    with pytest.raises(InvalidSAEFile, match="W_dec has shape"):
        import_saev(tmp_path / "bad.pt")


# -------------------------------------------------------------------------------------------------- SAELens


def random_sae(variant) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(D, S, variant, seed=5), contract=Contract("dinov2:vit_b14", 7, "patches"))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(S, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.1)
    sae.set_normalisation(torch.randn(D, generator=g), 2.2)
    return sae.eval()


@torch.no_grad()
@pytest.mark.parametrize("variant", [Relu(l1_coeff=2e-3), TopK(k=6), BatchTopK(k=6)], ids=lambda v: v.kind)
def test_saelens_export_then_import_gives_the_same_codes_and_reconstructions(tmp_path, variant):
    sae = random_sae(variant)
    export_saelens(sae, tmp_path / "lens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"]) == (D, S, True)
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu"}[variant.kind]
    back = import_saelens(tmp_path / "lens")
    assert back.contract == sae.contract
    x = x_raw()
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(back.decode(sae.encode(x)), sae.decode(sae.encode(x)), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_saelens_folder_written_by_hand_imports_with_saelens_semantics(tmp_path):
    """A SAELens standard SAE that does not subtract b_dec from its input: f = ReLU(x W_enc + b_enc)."""
    state = saev_state(3)
    folder = tmp_path / "lens"
    folder.mkdir()
    (folder / "cfg.json").write_text(
        json.dumps(
            {"architecture": "standard", "d_in": D, "d_sae": S, "apply_b_dec_to_input": False,
             "normalize_activations": "none", "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}
        )
    )
    (folder / "sae_weights.safetensors").write_bytes(st_save(state))
    sae = import_saelens(folder, backbone_id="clip:x", layer=3, tokens="all")
    x = x_raw()
    f_ref = (x @ state["W_enc"] + state["b_enc"]).clamp_min(0)
    torch.testing.assert_close(sae.encode(x), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(f_ref), f_ref @ state["W_dec"] + state["b_dec"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg_patch,message",
    [
        ({"architecture": "gated"}, "unsupported architecture"),
        ({"normalize_activations": "constant_norm_rescale"}, "normalize_activations"),
        ({"architecture": "topk"}, "needs an int k"),
        ({"d_sae": S + 1}, "W_enc has shape"),
    ],
)
def test_saelens_import_refuses_what_it_cannot_represent(tmp_path, cfg_patch, message):
    folder = tmp_path / "lens"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": S, **cfg_patch}))
    (folder / "sae_weights.safetensors").write_bytes(st_save(saev_state()))
    with pytest.raises(InvalidSAEFile, match=message):
        import_saelens(folder)
