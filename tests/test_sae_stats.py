"""Per-latent statistics and evaluation metrics equal a brute-force computation on small data."""

from __future__ import annotations

import math

import pytest
import torch

from sae_shared.sae import Relu, SAEConfig, SparseAutoencoder, TopK, compute_stats
from sae_shared.sae.stats import LOG_FREQ_EDGES, StreamingQuantile, decoder_coherence

D, S = 10, 48


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_sae(variant) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(D, S, variant, seed=3))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, S, generator=g) / D**0.5)
        # Spread of biases: some latents fire often, some rarely, one never.
        sae.b_enc.copy_(torch.linspace(-2.0, 0.5, S))
        sae.b_enc[0] = -1e3
    sae.set_normalisation(torch.randn(D, generator=g), 1.7)
    return sae.eval()


def nearest_rank_from_top(values: torch.Tensor, q: float) -> float:
    """The nearest-rank q-quantile (smallest v with at least q·n values <= v)."""
    v = values.sort(descending=True).values
    n = v.numel()
    rank = n - math.ceil(q * n - 1e-9) + 1
    return float(v[rank - 1])


@torch.no_grad()
@pytest.mark.parametrize("variant", [Relu(), TopK(k=6)], ids=lambda v: v.kind)
def test_latent_statistics_equal_brute_force(variant):
    sae = make_sae(variant)
    x = torch.randn(3000, D, generator=torch.Generator().manual_seed(1)) * 1.7 + 0.3
    stats = compute_stats(sae, x, batch_size=700, source="unit-test")  # several batches, a ragged last one
    assert sae.stats is stats and stats.n_tokens == 3000 and stats.source == "unit-test"

    f = sae.encode(x)  # brute force: all codes at once
    fired = f > 0
    count = fired.sum(0)
    torch.testing.assert_close(stats.frequency, count.double() / 3000)
    mean_when = torch.where(count > 0, f.sum(0) / count.clamp_min(1), torch.zeros(S))
    torch.testing.assert_close(stats.mean_when_firing, mean_when, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.max, f.max(0).values)
    assert float(stats.frequency[0]) == 0.0 and float(stats.p99[0]) == 0.0
    for i in range(S):
        vals = f[fired[:, i], i]
        if vals.numel() == 0:
            continue
        true = nearest_rank_from_top(vals, 0.99)
        assert abs(math.log(float(stats.p99[i]) / true)) <= math.log(1.02) + 1e-9, (i, float(stats.p99[i]), true)
        assert float(stats.p99[i]) <= float(stats.max[i])

    freq = count.double() / 3000
    logf = torch.log10(freq[freq > 0])
    expected_hist = torch.histogram(logf.clamp(-10, 0), bins=LOG_FREQ_EDGES).hist.long()
    assert torch.equal(stats.log_freq_counts, expected_hist)
    assert int(stats.log_freq_counts.sum()) + stats.n_dead == S

    m = stats.metrics
    x_n = (x - sae.norm_mean) / sae.norm_scale
    recon_n = f @ sae.W_dec + sae.b_dec
    err = (recon_n - x_n).pow(2).sum()
    fvu = float(err / (x_n - x_n.mean(0)).pow(2).sum())
    assert m.n_tokens == 3000
    assert m.l0 == pytest.approx(float(fired.sum(1).float().mean()))
    assert m.mse == pytest.approx(float(err) / (3000 * D), rel=1e-4)
    assert m.fvu == pytest.approx(fvu, rel=1e-4) and m.explained_variance == pytest.approx(1 - fvu, rel=1e-4)
    assert m.n_dead == int((count == 0).sum()) >= 1
    assert m.n_dense == int((freq > 1e-2).sum())
    coh = decoder_coherence(sae.W_dec)
    assert (m.decoder_coherence, m.decoder_coherence_mean) == pytest.approx(coh)


def test_decoder_coherence_equals_the_largest_offdiagonal_cosine():
    W = torch.randn(37, 6, generator=torch.Generator().manual_seed(0))
    Wn = W / W.norm(dim=1, keepdim=True)
    cos = (Wn @ Wn.T).abs().fill_diagonal_(0)
    coh_max, coh_mean = decoder_coherence(W, chunk=8)
    assert coh_max == pytest.approx(float(cos.max()), rel=1e-6)
    assert coh_mean == pytest.approx(float(cos.max(1).values.mean()), rel=1e-6)


def test_streaming_quantile_follows_a_rising_maximum_and_stays_within_one_bin():
    g = torch.Generator().manual_seed(5)
    rows, vals = [], []
    q = StreamingQuantile(4, n_bins=64, bin_ratio=1.05)
    # Batches whose scale grows 10x each time, so every row's window shifts (and early values fall below it).
    for b in range(5):
        r = torch.randint(0, 4, (500,), generator=g)
        v = torch.rand(500, generator=g).add(0.01) * (10.0**b) * (r + 1)
        q.add(r, v)
        rows.append(r)
        vals.append(v)
    r, v = torch.cat(rows), torch.cat(vals)
    maxima = torch.stack([v[r == i].max() for i in range(4)])
    est = q.quantile(0.99, maxima)
    for i in range(4):
        true = nearest_rank_from_top(v[r == i], 0.99)
        assert abs(math.log(float(est[i]) / true)) <= math.log(1.05) + 1e-9
    assert int(q.counts_rb.sum() + q.below_r.sum()) == 2500, "every value is counted once, in or below the window"
