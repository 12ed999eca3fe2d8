"""The library on a CUDA device, against the same computation on the CPU: backbones' split forward, SAE encode /
decode, a training step under bf16 autocast, and the intervention.

Needs only torch and timm (random-initialised DINOv2 shapes), so it runs on a GPU machine that has no service
libraries: ``python -m pytest tests/test_cuda.py``. Skipped where CUDA is absent (CI's machines);
``SAEV_TEST_DEVICE=cpu`` runs it on the CPU against itself, to check the test.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from backbones_support import images

from sae_shared.backbones import Backbone, load_backbone
from sae_shared.heads import HeadContract, LinearProbe, PatchLinearHead
from sae_shared.interventions import AllPatches, Edit, Intervener, PatchIndices
from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder, SweepMember, TopK, TrainConfig
from sae_shared.sae.training import Trainer

DEV = torch.device(os.environ.get("SAEV_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEV.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

LAYER = 5
STEPS = 150


@pytest.fixture(autouse=True, scope="module")
def _exact_fp32():
    # TF32 would make CUDA's fp32 matmuls differ from the CPU's by ~1e-3: compare fp32 with fp32.
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def pair() -> tuple[Backbone, Backbone]:
    """The same random-weight DINOv2 (with registers) on the CPU and on CUDA."""
    torch.manual_seed(1)
    cpu = load_backbone("dinov2", model="vit_small_patch14_reg4_dinov2", pretrained=False, image_size=112)
    cuda = load_backbone("dinov2", model="vit_small_patch14_reg4_dinov2", pretrained=False, image_size=112,
                         device=str(DEV))
    cuda.module.load_state_dict(cpu.module.state_dict())
    assert cuda.id == cpu.id
    return cpu, cuda


def random_sae(d: int, variant, contract: Contract | None = None, seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d, 8 * d, variant, seed=seed), contract=contract)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(sae.d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae.eval()


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_split_forward_is_exact_on_cuda_in_fp32_close_in_bf16_and_matches_the_cpu(pair):
    cpu, cuda = pair
    x = images(cpu.layout, n=2, seed=3)
    with torch.inference_mode():
        expected = cuda.forward(x.to(DEV))
        assert close(expected, cpu.forward(x), 1e-4)
        bf16 = cuda.with_dtype("bfloat16")
        expected_bf16 = bf16.forward(x.to(DEV))
        for layer in (0, LAYER, cpu.layout.n_blocks - 1):
            resid = cuda.forward_to(x.to(DEV), layer)
            assert resid.device.type == DEV.type
            assert torch.equal(cuda.forward_from(resid, layer), expected)
            assert close(resid, cpu.forward_to(x, layer), 1e-4)
            out = bf16.forward_from(bf16.forward_to(x.to(DEV), layer), layer)
            assert close(out, expected_bf16, 1e-2)
        recorded = cuda.record(x.to(DEV), [0, LAYER], tokens="all")  # [B, layers, T, D]
        assert close(recorded[:, 1], cpu.forward_to(x, LAYER), 1e-4)


@pytest.mark.parametrize("variant", [TopK(k=16), Relu()], ids=["topk", "relu"])
def test_sae_encode_and_decode_on_cuda_match_the_cpu(variant):
    sae = random_sae(64, variant, seed=2)
    x = torch.randn(512, 64) * 2 + 0.5
    gpu = random_sae(64, variant, seed=2).to(DEV)
    with torch.inference_mode():
        dense_cpu, dense_gpu = sae.encode(x), gpu.encode(x.to(DEV))
        assert close(dense_gpu, dense_cpu, 1e-4)
        assert close(gpu.decode(dense_gpu), sae.decode(dense_cpu), 1e-4)
        sparse = gpu.encode_sparse(x.to(DEV), k=16)
        assert sparse.indices.device.type == DEV.type and sparse.indices.shape == (512, 16)
        # the sparse decode (a gather over the k rows) equals the dense decode of the same codes
        as_dense = torch.zeros_like(dense_gpu).scatter_(1, sparse.indices, sparse.values.float())
        assert close(gpu.decode(sparse), gpu.decode(as_dense), 1e-5)


def test_training_on_cuda_under_bf16_autocast_lowers_the_loss_and_keeps_fp32_unit_decoder_rows():
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(96, 64, generator=g), dim=1)
    coef = torch.zeros(8192, 96).scatter_(1, torch.rand(8192, 96, generator=g).argsort(1)[:, :4],
                                          torch.rand(8192, 4, generator=g) + 0.5)
    x = (coef @ atoms).to(DEV)
    for variant in (TopK(k=4), Relu()):
        member = SweepMember(SAEConfig(64, 256, variant), lr=3e-3)
        cfg = TrainConfig(members=member, batch_size=1024, warmup_steps=5, log_every=1, autocast="bf16",
                          device=str(DEV))
        trainer = Trainer(cfg, total_steps=STEPS, init_sample_nd=x)
        losses = [trainer.step(x[(i % 8) * 1024:(i % 8 + 1) * 1024])[0].loss for i in range(STEPS)]
        sae = trainer.saes[0]
        assert sae.W_dec.device.type == DEV.type and sae.W_dec.dtype == torch.float32
        assert all(torch.isfinite(torch.tensor(losses))), variant
        assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), (variant, losses[:5], losses[-5:])
        norms = sae.W_dec.detach().norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
        state = trainer.state_dict()  # a checkpoint written from the GPU loads into a CPU trainer
        on_cpu = Trainer(TrainConfig(members=member, batch_size=1024, warmup_steps=5, autocast="bf16", device="cpu"),
                         total_steps=STEPS, init_sample_nd=x.cpu())
        on_cpu.load_state_dict(state)
        assert torch.equal(on_cpu.saes[0].W_dec, sae.W_dec.cpu())


def test_intervention_on_cuda_keeps_the_unedited_prediction_exactly_and_matches_the_cpu_edit(pair):
    cpu, cuda = pair
    lo = cpu.layout
    x = images(lo, n=2, seed=7)
    sae = random_sae(lo.d_model, Relu(), Contract(cpu.id, LAYER, "patches"), seed=4)
    torch.manual_seed(5)
    heads = {"probe": LinearProbe(["a", "b", "c"], HeadContract.for_backbone(cpu, "pooled")).eval(),
             "patches": PatchLinearHead(["x", "y", "z"], HeadContract.for_backbone(cpu, "patches")).eval()}
    edits = [Edit(latent=7, op="scale", value=4.0, patches=AllPatches()),
             Edit(3, "set", 2.0, patches=PatchIndices((0, 5)))]
    for name, head in heads.items():
        gpu_sae, gpu_head = copy.deepcopy(sae).to(DEV), copy.deepcopy(head).to(DEV)
        on_gpu, on_cpu = Intervener(cuda, gpu_sae, gpu_head, layer=LAYER), Intervener(cpu, sae, head, layer=LAYER)
        prepared = on_gpu.prepare(x.to(DEV))
        with torch.inference_mode():
            unhooked = gpu_head.predict(cuda, cuda.forward(x.to(DEV))).logits
        none = on_gpu.run(prepared, [Edit(7, "scale", 1.0, patches=AllPatches())])
        assert torch.equal(none.after.logits, unhooked), name
        assert torch.equal(prepared.before.logits, unhooked), name
        got, want = on_gpu.run(prepared, edits), on_cpu.run(on_cpu.prepare(x), edits)
        assert got.after.logits.device.type == DEV.type
        assert close(got.after.logits, want.after.logits, 1e-3), name
        assert close(got.prob_delta, want.prob_delta, 1e-3), name
        assert torch.equal(got.edited_tokens.cpu(), want.edited_tokens)
        assert not close(got.after.logits, got.before.logits, 1e-6), "the edit should change the prediction"
        for field in ("mean_abs", "max_abs", "relative", "flips_per_token", "target_error", "n_tokens"):
            assert close(getattr(got.drift, field), getattr(want.drift, field), 1e-3), (name, field)
