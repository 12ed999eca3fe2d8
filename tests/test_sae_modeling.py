"""SparseAutoencoder: every formula against a plain reference on random inputs, the sparse decoder against its dense
twin (values and gradients), the decoder constraints, the fp32 purity of decode, contracts and config checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_shared.sae import (
    BatchTopK,
    Contract,
    ContractMismatch,
    JumpReLU,
    Matryoshka,
    MissingStatistics,
    Relu,
    SAEConfig,
    SparseAutoencoder,
    SparseCodes,
    TopK,
    TrainConfig,
)
from sae_shared.sae import modeling
from sae_shared.sae.config import sae_config_from_dict, sae_config_to_dict

D, S = 12, 40


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices on 2 shared cores: one thread is faster and makes results reproducible bit for bit.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_sae(variant=None, *, d=D, s=S, matryoshka=None, seed=0) -> SparseAutoencoder:
    """An SAE with random (not initial) weights and a non-trivial normalisation."""
    cfg = SAEConfig(d_model=d, d_sae=s, variant=variant or Relu(), matryoshka=matryoshka, seed=seed)
    sae = SparseAutoencoder(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, s, generator=g) / d**0.5)
        sae.b_enc.copy_(torch.randn(s, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(s, d, generator=g))
        sae.normalize_decoder_()
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(s, generator=g) * 0.3)
    sae.set_normalisation(torch.randn(d, generator=g), 2.5)
    return sae


def raw_x(n=64, d=D, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2.5 + 1.0


def ref_pre(sae, x):
    x_n = (x - sae.norm_mean) / sae.norm_scale
    return x_n, (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc


def ref_decode(sae, f):
    return (f @ sae.W_dec + sae.b_dec) * sae.norm_scale + sae.norm_mean


def ref_topk_dense(pre, k):
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0))


# ------------------------------------------------------------------------------------------------ formulas


@torch.no_grad()
def test_relu_encode_and_decode_follow_the_papers_formula_on_raw_inputs():
    sae, x = make_sae(Relu()), raw_x()
    _, pre = ref_pre(sae, x)
    f_ref = pre.clamp_min(0)
    torch.testing.assert_close(sae.encode(x), f_ref)
    torch.testing.assert_close(sae.decode(f_ref), ref_decode(sae, f_ref))


@torch.no_grad()
def test_topk_encode_keeps_the_k_largest_relud_preactivations():
    sae, x = make_sae(TopK(k=5)), raw_x()
    _, pre = ref_pre(sae, x)
    f_ref = ref_topk_dense(pre, 5)
    torch.testing.assert_close(sae.encode(x), f_ref)
    codes = sae.encode_sparse(x)
    assert codes.indices.shape == (64, 5) and codes.indices.dtype == torch.int64
    assert bool((codes.values[:, :-1] >= codes.values[:, 1:]).all()), "sparse codes are sorted, largest first"
    torch.testing.assert_close(torch.zeros_like(pre).scatter(-1, codes.indices, codes.values), f_ref)


@torch.no_grad()
def test_jumprelu_encode_keeps_preactivations_above_the_threshold():
    sae, x = make_sae(JumpReLU()), raw_x()
    _, pre = ref_pre(sae, x)
    f_ref = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre)).clamp_min(0)
    torch.testing.assert_close(sae.encode(x), f_ref)


@torch.no_grad()
@pytest.mark.parametrize("variant", [Relu(), TopK(k=6), BatchTopK(k=6)], ids=lambda v: v.kind)
def test_sparse_codes_decode_to_the_same_reconstruction_as_dense_codes(variant):
    sae, x = make_sae(variant), raw_x()
    dense = sae.encode(x)
    sparse = sae.encode_sparse(x)  # k=None: exact for every variant
    torch.testing.assert_close(sae.decode(sparse), sae.decode(dense), rtol=1e-5, atol=1e-5)
    # A larger k pads with zeros; a smaller one keeps the largest codes.
    padded = sae.encode_sparse(x, k=sparse.indices.shape[-1] + 3)
    torch.testing.assert_close(sae.decode(padded), sae.decode(dense), rtol=1e-5, atol=1e-5)
    top2 = sae.encode_sparse(x, k=2)
    torch.testing.assert_close(top2.values, dense.topk(2, dim=-1).values)


@torch.no_grad()
def test_encode_and_decode_accept_leading_batch_dimensions():
    sae = make_sae(TopK(k=4))
    x = raw_x(24).reshape(2, 3, 4, D)
    f = sae.encode(x)
    assert f.shape == (2, 3, 4, S)
    torch.testing.assert_close(f.reshape(24, S), sae.encode(x.reshape(24, D)))
    codes = sae.encode_sparse(x)
    assert codes.indices.shape == (2, 3, 4, 4)
    assert sae.decode(codes).shape == x.shape


def test_relu_forward_loss_is_mse_plus_lambda_l1():
    sae, x = make_sae(Relu(l1_coeff=3e-3)), raw_x()
    out = sae(x, sparsity_scale=0.5)
    x_n, pre = ref_pre(sae, x)
    f = pre.clamp_min(0)
    recon_n = f @ sae.W_dec + sae.b_dec
    mse = (recon_n - x_n).pow(2).mean()
    l1 = 0.5 * 3e-3 * f.abs().sum(-1).mean()
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.sparsity, l1)
    torch.testing.assert_close(out.loss, mse + l1)
    torch.testing.assert_close(out.recon, recon_n * sae.norm_scale + sae.norm_mean)
    torch.testing.assert_close(out.l0, (f > 0).sum(-1).float().mean())
    fvu = (recon_n - x_n).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, fvu)


def test_auxk_loss_reconstructs_the_residual_from_the_top_dead_latents():
    sae, x = make_sae(TopK(k=4, k_aux=7, aux_coeff=0.25)), raw_x()
    dead = torch.zeros(S, dtype=torch.bool)
    dead[torch.randperm(S, generator=torch.Generator().manual_seed(3))[:11]] = True
    out = sae(x, dead_mask=dead)
    x_n, pre = ref_pre(sae, x)
    recon_n = ref_topk_dense(pre, 4) @ sae.W_dec + sae.b_dec
    residual = (x_n - recon_n).detach()
    dead_pre = torch.where(dead, pre, torch.full_like(pre, float("-inf")))
    e_hat = ref_topk_dense(dead_pre, 7) @ sae.W_dec
    torch.testing.assert_close(out.aux, 0.25 * (e_hat - residual).pow(2).mean())
    torch.testing.assert_close(out.loss, (recon_n - x_n).pow(2).mean() + out.aux)
    # Fewer dead latents than k_aux: all of them are used; none dead: no aux term.
    few = torch.zeros(S, dtype=torch.bool)
    few[:3] = True
    e_few = ref_topk_dense(torch.where(few, pre, torch.full_like(pre, float("-inf"))), 3) @ sae.W_dec
    torch.testing.assert_close(sae(x, dead_mask=few).aux, 0.25 * (e_few - residual).pow(2).mean())
    assert float(sae(x, dead_mask=torch.zeros(S, dtype=torch.bool)).aux) == 0.0


def test_batchtopk_keeps_k_per_token_over_the_batch_and_estimates_the_jumprelu_threshold():
    sae = make_sae(BatchTopK(k=3, threshold_decay=0.9))
    sae.train()
    x1, x2 = raw_x(32, seed=1), raw_x(32, seed=2)
    mins = []
    for x in (x1, x2):
        out = sae(x)
        _, pre = ref_pre(sae, x)
        flat = pre.clamp_min(0).flatten()
        vals, idx = flat.topk(3 * 32)
        ref = torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)
        torch.testing.assert_close(out.codes, ref)
        mins.append(float(vals[vals > 0].min().detach()))
    expected = 0.9 * mins[0] + 0.1 * mins[1]  # the first batch sets θ, later ones are averaged in
    torch.testing.assert_close(sae.threshold, torch.full((S,), expected))
    sae.eval()  # inference: JumpReLU with the estimated θ
    with torch.no_grad():
        _, pre = ref_pre(sae, x1)
        torch.testing.assert_close(sae.encode(x1), torch.where(pre > expected, pre, torch.zeros_like(pre)))
        torch.testing.assert_close(sae(x1).codes, sae.encode(x1))
    assert torch.equal(sae.threshold, torch.full((S,), expected)), "eval mode leaves θ alone"


@pytest.mark.parametrize("variant", [Relu(l1_coeff=1e-3), TopK(k=5)], ids=lambda v: v.kind)
def test_matryoshka_loss_is_the_weighted_mse_of_each_prefix(variant):
    prefixes, weights = (8, 20, S), (0.5, 0.3, 0.2)
    sae, x = make_sae(variant, matryoshka=Matryoshka(prefixes, weights)), raw_x()
    out = sae(x)
    x_n, pre = ref_pre(sae, x)
    f = pre.clamp_min(0) if isinstance(variant, Relu) else ref_topk_dense(pre, 5)
    mses = [((f[:, :m] @ sae.W_dec[:m] + sae.b_dec) - x_n).pow(2).mean() for m in prefixes]
    sparsity = 1e-3 * f.sum(-1).mean() if isinstance(variant, Relu) else 0.0
    torch.testing.assert_close(out.loss, sum(w * m for w, m in zip(weights, mses)) + sparsity)
    torch.testing.assert_close(out.mse, mses[-1])


# ------------------------------------------------------------------------------------ sparse decoder kernel


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 40), k=st.integers(1, 9), s=st.integers(9, 50), d=st.integers(1, 17))
def test_sparse_decode_equals_the_dense_reference_in_value_and_gradient(n, k, s, d):
    g = torch.Generator().manual_seed(n * 1000 + k * 100 + s + d)
    idx = torch.randint(0, s, (n, k), generator=g)  # duplicates within a row are allowed and summed
    vals = torch.randn(n, k, generator=g, requires_grad=True)
    W = torch.randn(s, d, generator=g, requires_grad=True)
    up = torch.randn(n, d, generator=g)
    fast = modeling.sparse_decode(idx, vals, W)
    (fast * up).sum().backward()
    g_vals, g_W = vals.grad.clone(), W.grad.clone()
    vals.grad = W.grad = None
    ref = modeling.sparse_decode_reference(idx, vals, W)
    (ref * up).sum().backward()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_vals, vals.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_W, W.grad, rtol=1e-5, atol=1e-5)


def test_sparse_backward_only_touches_the_active_decoder_rows():
    idx = torch.tensor([[1, 4], [4, 7], [7, 1]])
    W = torch.randn(10, 3, requires_grad=True)
    modeling.sparse_decode(idx, torch.rand(3, 2), W).sum().backward()
    touched = (W.grad != 0).any(1)
    assert touched.nonzero().flatten().tolist() == [1, 4, 7]


@pytest.mark.parametrize(
    "variant,matryoshka",
    [(TopK(k=5, k_aux=9), None), (TopK(k=5, k_aux=9), Matryoshka((10, S))), (BatchTopK(k=4, k_aux=6), None)],
    ids=["topk", "topk-matryoshka", "batchtopk"],
)
def test_topk_training_gradients_equal_the_dense_reference_path(monkeypatch, variant, matryoshka):
    x = raw_x()
    dead = torch.arange(S) % 3 == 0

    def grads():
        sae = make_sae(variant, matryoshka=matryoshka)
        sae.train()
        sae(x, dead_mask=dead).loss.backward()
        return {name: p.grad.clone() for name, p in sae.named_parameters()}

    fast = grads()
    monkeypatch.setattr(modeling, "sparse_decode", modeling.sparse_decode_reference)
    monkeypatch.setattr(modeling, "sampled_pre", modeling.sampled_pre_reference)  # TopK's sparse encoder backward
    dense = grads()
    for name in fast:
        torch.testing.assert_close(fast[name], dense[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", [TopK(k=5, k_aux=9), Relu(l1_coeff=3e-2)], ids=["topk", "relu"])
def test_training_gradients_equal_plain_autograd_of_the_formula(variant):
    """The fast training paths (TopK's sampled encoder backward, ReLU's ``b_enc - b_dec W_enc`` rewrite and its
    abs-free L1) give the gradients of the plain formula."""
    x = raw_x()
    dead = torch.arange(S) % 3 == 0
    sae = make_sae(variant)
    sae.train()
    sae(x, dead_mask=dead).loss.backward()
    fast = {name: p.grad.clone() for name, p in sae.named_parameters()}

    ref = make_sae(variant)
    x_n = (x - ref.norm_mean) / ref.norm_scale
    pre = (x_n - ref.b_dec) @ ref.W_enc + ref.b_enc
    if isinstance(variant, TopK):
        vals, idx = pre.topk(variant.k, dim=-1)
        f = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        recon = f @ ref.W_dec + ref.b_dec
        masked = pre.masked_fill(~dead, float("-inf"))
        a_vals, a_idx = masked.topk(variant.k_aux, dim=-1)
        e_hat = torch.zeros_like(pre).scatter(1, a_idx, a_vals.relu()) @ ref.W_dec
        loss = (recon - x_n).pow(2).mean() + variant.aux_coeff * (e_hat - (x_n - recon).detach()).pow(2).mean()
    else:
        f = pre.relu()
        recon = f @ ref.W_dec + ref.b_dec
        loss = (recon - x_n).pow(2).mean() + variant.l1_coeff * f.abs().sum(-1).mean()
    loss.backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------- decoder constraints


def test_parallel_gradient_removal_leaves_only_the_tangent_component():
    sae, x = make_sae(TopK(k=5)), raw_x()
    sae(x).loss.backward()
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grad_()
    w_hat = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    parallel = (sae.W_dec.grad * w_hat).sum(1)
    torch.testing.assert_close(parallel, torch.zeros(S), atol=1e-6, rtol=0)
    # Only the parallel part was removed.
    torch.testing.assert_close(before - sae.W_dec.grad, (before * w_hat).sum(1, keepdim=True) * w_hat)


@pytest.mark.parametrize("normalize", [True, False])
def test_decoder_rows_stay_unit_norm_after_training_steps(normalize):
    from sae_shared.sae.training import Trainer

    cfg = SAEConfig(D, S, Relu(l1_coeff=1e-3), normalize_decoder=normalize)
    trainer = Trainer(TrainConfig(cfg, batch_size=32, warmup_steps=0, log_every=5), total_steps=5, init_sample_nd=raw_x(256))
    for i in range(5):
        trainer.step(raw_x(32, seed=10 + i))
    norms = trainer.saes[0].W_dec.detach().norm(dim=1)
    if normalize:
        torch.testing.assert_close(norms, torch.ones(S), atol=1e-6, rtol=0)
    else:
        assert float((norms - 1).abs().max()) > 1e-4, "without the constraint, steps move the norms"


# ------------------------------------------------------------------------------ purity of decode (DESIGN §1)


@torch.no_grad()
@pytest.mark.parametrize("variant", [Relu(), TopK(k=5)], ids=lambda v: v.kind)
def test_decode_is_deterministic_fp32_and_the_unedited_delta_is_exactly_zero(variant):
    sae, x = make_sae(variant), raw_x()
    f = sae.encode(x)
    assert torch.equal(sae.encode(x), f)
    first = sae.decode(f)
    assert first.dtype == torch.float32 and torch.equal(sae.decode(f), first)
    assert torch.equal(x + (sae.decode(f) - sae.decode(f)), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast does not reach decode
        assert torch.equal(sae.decode(f), first)
        assert torch.equal(sae.decode(f.bfloat16().float()), sae.decode(f.bfloat16()))
    sparse = sae.encode_sparse(x)
    assert torch.equal(sae.decode(sparse), sae.decode(sparse))


@torch.no_grad()
@pytest.mark.parametrize("variant", [Relu(), TopK(k=5)], ids=lambda v: v.kind)
def test_decode_change_equals_the_difference_of_two_decodes_and_is_exactly_zero_where_codes_agree(variant):
    sae, x = make_sae(variant), raw_x()
    sae.set_normalisation(torch.randn(D), 2.5)  # the scale multiplies the change; the mean cancels
    f = sae.encode(x)
    edited = f.clone()
    edited[:10, 3] = 4.0
    edited[5:20, 7] *= 0.0
    edited[30, 1] += 1.5
    change = sae.decode_change(f, edited, [7, 3, 1, 3])
    assert change.dtype == torch.float32 and change.shape == (64, D)
    assert torch.allclose(change, sae.decode(edited) - sae.decode(f), atol=1e-5)
    untouched = (edited == f).all(1)
    assert 10 <= int((~untouched).sum()) <= 21  # rows 0-9 and 30 changed for sure, 10-19 where latent 7 fired
    assert torch.count_nonzero(change[untouched]) == 0  # exactly 0: x' == x there, bit for bit
    assert torch.count_nonzero(change[~untouched].abs().sum(1)) == int((~untouched).sum())
    assert torch.count_nonzero(sae.decode_change(f, f, [])) == 0
    with pytest.raises(ValueError, match=rf"latent indices must be in \[0, {S}\)"):
        sae.decode_change(f, edited, [S])


# ----------------------------------------------------------------------------------- contract and stats


def test_check_contract_names_the_mismatching_field():
    sae = make_sae()
    with pytest.raises(ContractMismatch, match="no backbone/layer/tokens contract"):
        sae.check_contract("dinov2:vit_small", 3, "patches")
    sae.contract = Contract("dinov2:vit_small", 3, "patches")
    sae.check_contract("dinov2:vit_small", 3, "patches")
    with pytest.raises(ContractMismatch, match=r"layer: SAE has 3, used with 4"):
        sae.check_contract("dinov2:vit_small", 4, "patches")
    with pytest.raises(ValueError, match="backbone_id"):
        sae.check_contract("clip:vit_b16", 3, "patches")


def test_missing_statistics_error_names_the_command_that_computes_them():
    with pytest.raises(MissingStatistics, match="saevctl sae stats"):
        make_sae().require_stats()


# ----------------------------------------------------------------------------------------------- config


def test_configs_reject_inconsistent_values_with_the_fix_in_the_message():
    with pytest.raises(ValueError, match="exceeds d_sae"):
        SAEConfig(8, 16, TopK(k=32))
    with pytest.raises(ValueError, match="must end at d_sae=64"):
        SAEConfig(8, 64, matryoshka=Matryoshka((16, 32)))
    with pytest.raises(ValueError, match="strictly increasing"):
        Matryoshka((32, 16, 64))
    with pytest.raises(ValueError, match="inference-only"):
        TrainConfig(SAEConfig(8, 16, JumpReLU()))
    with pytest.raises(ValueError, match="share d_model"):
        TrainConfig((SAEConfig(8, 16), SAEConfig(9, 16)))
    with pytest.raises(ValueError, match="l1_coeff"):
        Relu(l1_coeff=-1.0)


def test_config_json_round_trip_keeps_the_variant_tag_and_fields():
    cfg = SAEConfig(8, 64, BatchTopK(k=4, threshold_decay=0.5), matryoshka=Matryoshka((16, 64), (0.25, 0.75)))
    assert sae_config_from_dict(sae_config_to_dict(cfg)) == cfg
    assert sae_config_to_dict(cfg)["variant"]["kind"] == "batchtopk"
    with pytest.raises(ValueError, match="unknown SAE variant"):
        sae_config_from_dict({**sae_config_to_dict(cfg), "variant": {"kind": "gated"}})


def test_paper_defaults():
    relu, topk = Relu(), TopK()
    assert (relu.l1_coeff, topk.k, topk.k_aux, topk.aux_coeff) == (4e-4, 32, 512, 1 / 32)
    member = TrainConfig(SAEConfig(8, 16)).members[0]
    assert member.lr == 4e-4 and TrainConfig(SAEConfig(8, 16)).warmup_steps == 500
    assert isinstance(SparseCodes(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1)), tuple)


def test_latent_counts_equal_bincount_with_and_without_weights():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, S, (64, 5), generator=g)
    firing = torch.rand(64, 5, generator=g) > 0.3
    assert torch.equal(modeling.latent_counts(idx, S), torch.bincount(idx.flatten(), minlength=S))
    assert torch.equal(modeling.latent_counts(idx, S, firing), torch.bincount(idx[firing], minlength=S))
    assert modeling.latent_counts(idx[:0], S).tolist() == [0] * S
