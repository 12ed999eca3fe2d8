"""Training: recovery of a planted dictionary, the sweep reading each batch once, resume from a checkpointed state,
schedules and input checks."""

from __future__ import annotations

import io

import pytest
import torch

from sae_shared.sae import (
    BatchTopK,
    Contract,
    Matryoshka,
    Relu,
    SAEConfig,
    SparseAutoencoder,
    SweepMember,
    TopK,
    TrainConfig,
    train_sae,
)
from sae_shared.sae.training import Trainer, estimate_normalisation, geometric_median, train_on_batches

D, N_ATOMS, S = 32, 64, 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted(n=20000, *, active=4, noise=0.01, seed=0):
    """Sparse non-negative combinations of known unit atoms plus noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(N_ATOMS, D, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    which = torch.rand(n, N_ATOMS, generator=g).argsort(1)[:, :active]
    coef = torch.rand(n, active, generator=g) * 2 + 0.5
    codes = torch.zeros(n, N_ATOMS).scatter(1, which, coef)
    return codes @ atoms + noise * torch.randn(n, D, generator=g), atoms


def recovery(sae: SparseAutoencoder, atoms: torch.Tensor) -> float:
    """Mean over true atoms of the best cosine with a learned decoder row."""
    w = sae.W_dec.detach()
    w = w / w.norm(dim=1, keepdim=True)
    return float((atoms @ w.T).max(1).values.mean())


def small_config(members, steps, **kw) -> TrainConfig:
    base = dict(batch_size=256, n_tokens=256 * steps, warmup_steps=50, log_every=250, dead_window_tokens=256 * 50)
    return TrainConfig(members, **{**base, **kw})


# ------------------------------------------------------------------------------------ planted dictionary


def test_topk_recovers_a_planted_dictionary():
    x, atoms = planted()
    res = train_sae(small_config(SweepMember(SAEConfig(D, S, TopK(k=4, k_aux=64), seed=1), lr=3e-3), 600), x)
    sae = res.saes[0]
    assert recovery(sae, atoms) >= 0.9
    ev = res.evaluations[0]
    assert ev.l0 == pytest.approx(4.0) and ev.explained_variance > 0.8 and ev.n_tokens == 2000
    assert sae.stats is not None and sae.stats.metrics == ev and not sae.training


def test_relu_l1_recovers_a_planted_dictionary_with_lambda_chosen_by_a_sweep():
    x, atoms = planted()
    lambdas = (5e-2, 1e-1, 2e-1)
    members = [SweepMember(SAEConfig(D, S, Relu(l1_coeff=lam), seed=1), lr=3e-3) for lam in lambdas]
    res = train_sae(small_config(members, 1500), x)
    scores = [recovery(s, atoms) for s in res.saes]
    assert max(scores) >= 0.8, dict(zip(lambdas, scores))
    l0s = [e.l0 for e in res.evaluations]
    assert l0s == sorted(l0s, reverse=True), "a larger λ gives sparser codes"


def test_batchtopk_recovers_a_planted_dictionary_and_infers_with_its_threshold():
    x, atoms = planted()
    res = train_sae(small_config(SweepMember(SAEConfig(D, S, BatchTopK(k=4, k_aux=64), seed=1), lr=3e-3), 600), x)
    sae = res.saes[0]
    assert recovery(sae, atoms) >= 0.9
    assert float(sae.threshold.min()) > 0
    assert 2.0 <= res.evaluations[0].l0 <= 8.0, "the JumpReLU threshold keeps about k latents per token"


def test_matryoshka_topk_trains_and_its_first_prefix_reconstructs_alone():
    x, _ = planted(8000)
    cfg = SAEConfig(D, S, TopK(k=4, k_aux=64), matryoshka=Matryoshka((32, S)), seed=1)
    res = train_sae(small_config(SweepMember(cfg, lr=3e-3), 300), x)
    sae = res.saes[0]
    with torch.no_grad():
        codes = sae.encode(x[:500])
        prefix_only = codes.clone()
        prefix_only[:, 32:] = 0
        x_n = sae.normalise(x[:500])
        fvu_prefix = (sae.normalise(sae.decode(prefix_only)) - x_n).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()
    assert res.evaluations[0].fvu < 0.5 and float(fvu_prefix) < 0.9


# ------------------------------------------------------------------------------------------------ sweep


def test_a_sweep_of_three_saes_reads_each_batch_once_and_every_member_sees_it(monkeypatch):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 16, generator=g) for _ in range(7)]
    reads = []

    def source():
        for b in batches:
            reads.append(b)
            yield b

    seen: dict[int, list[int]] = {}
    forward = SparseAutoencoder.forward

    def spy(self, x, **kw):
        seen.setdefault(id(self), []).append(id(x))
        return forward(self, x, **kw)

    monkeypatch.setattr(SparseAutoencoder, "forward", spy)
    members = (
        SweepMember(SAEConfig(16, 32, Relu()), lr=1e-3),
        SweepMember(SAEConfig(16, 64, TopK(k=4)), lr=3e-4),
        SweepMember(SAEConfig(16, 32, BatchTopK(k=2)), lr=1e-3),
    )
    config = TrainConfig(members, batch_size=64, warmup_steps=2, log_every=3)
    logged = []
    res = train_on_batches(
        config, source(), total_steps=5, init_sample_nd=batches[0], heldout=torch.randn(50, 16), on_metrics=logged.append
    )
    assert len(reads) == 5 and res.n_steps == 5, "each step reads exactly one batch"
    monkeypatch.setattr(SparseAutoencoder, "forward", forward)
    # Every member's training forwards saw the same 5 batches, in order (the evaluation runs through encode).
    per_member = list(seen.values())
    assert len(per_member) == 3 and all(ids == per_member[0] for ids in per_member)
    assert len(per_member[0]) == 5 and len(set(per_member[0])) == 5
    assert [(m.member, m.step) for m in logged] == [(0, 3), (1, 3), (2, 3), (0, 5), (1, 5), (2, 5)]
    assert all(len(h) == 2 for h in res.history) and all(s.stats is not None for s in res.saes)


# ----------------------------------------------------------------------------------------------- resume


def test_a_trainer_resumed_from_its_state_dict_matches_an_undisturbed_run():
    x, _ = planted(4000)
    batches = [x[i * 128 : (i + 1) * 128] for i in range(12)]
    members = (
        SweepMember(SAEConfig(D, 64, TopK(k=4, k_aux=16)), lr=2e-3),
        SweepMember(SAEConfig(D, 64, BatchTopK(k=4)), lr=2e-3),
    )
    config = TrainConfig(members, batch_size=128, warmup_steps=3, schedule="cosine", dead_window_tokens=256, log_every=4)

    straight = Trainer(config, total_steps=12, init_sample_nd=x)
    for b in batches:
        straight.step(b)

    first = Trainer(config, total_steps=12, init_sample_nd=x)
    for b in batches[:5]:
        first.step(b)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # a checkpoint as a job would write it
    buf.seek(0)
    resumed = Trainer(config, total_steps=12, init_sample_nd=x)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for b in batches[5:]:
        resumed.step(b)

    assert resumed.step_count == straight.step_count == 12
    for a, b in zip(straight.saes, resumed.saes):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), name
    assert [m._asdict() for h in straight.history for m in h] == [m._asdict() for h in resumed.history for m in h]


# ------------------------------------------------------------------------------------------ odds and ends


def test_bf16_autocast_trains_with_finite_losses_and_fp32_weights():
    x, _ = planted(3000)
    members = (SweepMember(SAEConfig(D, 64, TopK(k=4)), lr=1e-3), SweepMember(SAEConfig(D, 64, Relu()), lr=1e-3))
    res = train_sae(small_config(members, 20, autocast="bf16", log_every=10), x)
    for sae, hist in zip(res.saes, res.history):
        assert sae.W_dec.dtype == torch.float32
        assert all(torch.isfinite(torch.tensor(m.loss)) for m in hist)


def test_lr_schedule_warms_up_linearly_then_holds_or_decays_by_cosine():
    cfg = SAEConfig(4, 8)
    x = torch.randn(32, 4)
    const = Trainer(TrainConfig(cfg, warmup_steps=4), total_steps=12, init_sample_nd=x)
    cos = Trainer(TrainConfig(cfg, warmup_steps=4, schedule="cosine"), total_steps=12, init_sample_nd=x)
    assert [const.lr_factor(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert const.lr_factor(11) == 1.0
    assert cos.lr_factor(4) == 1.0 and cos.lr_factor(8) == pytest.approx(0.5) and cos.lr_factor(12) == pytest.approx(0)


def test_normalisation_and_b_dec_are_estimated_from_data_and_recorded_on_the_sae():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=g) * 3.0 + torch.arange(8.0)
    norm = estimate_normalisation(x, "mean_scale")
    torch.testing.assert_close(norm.mean, x.mean(0), rtol=1e-5, atol=1e-5)
    x_n = (x - norm.mean) / norm.scale
    assert float(x_n.pow(2).sum(1).mean()) == pytest.approx(8.0, rel=1e-4)
    assert estimate_normalisation(x, "none").scale == 1.0
    members = (SweepMember(SAEConfig(8, 16, b_dec_init="geometric_median", input_norm="scale")),)
    tr = Trainer(TrainConfig(members, batch_size=64), total_steps=1, init_sample_nd=x)
    sae = tr.saes[0]
    assert float(sae.norm_mean.abs().max()) == 0.0
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(x / float(sae.norm_scale)), rtol=1e-4, atol=1e-4)


def test_train_sae_records_the_contract_and_refuses_bad_data():
    x, _ = planted(2000)
    contract = Contract("dinov2:test", 5, "patches")
    res = train_sae(small_config(SAEConfig(D, 64, TopK(k=4)), 2, contract=contract), x)
    assert res.saes[0].contract == contract
    cfg = small_config(SAEConfig(D, 64, TopK(k=4)), 2)
    with pytest.raises(ValueError, match=r"must be \[n, 32\]"):
        train_sae(cfg, torch.randn(1000, 31))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train_sae(cfg, torch.randn(200, 32))
    with pytest.raises(ValueError, match="NaN"):
        train_sae(cfg, torch.full((1000, 32), float("nan")))
    with pytest.raises(ValueError, match="needs store="):  # a shard-set id needs the store it lives in
        train_sae(cfg, "acts-0123")
