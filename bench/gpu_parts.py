"""Where an intervention's time goes: its parts timed one by one, then a torch profile of ``Intervener.run``.

Needs only torch and timm, like ``bench/gpu.py``::

    python bench/gpu_parts.py                 # cuda: ViT-B/14 (random init), 224 px, batch 64, bf16
    python bench/gpu_parts.py --device cpu    # ViT-S/14, 56 px, batch 2, fp32: a smoke run in seconds
    python bench/gpu_parts.py --train         # SAE training steps instead (d=768, d_sae=12288, 16384 tokens, bf16)

For a TopK (k=32) and a ReLU SAE 16x the model width at layer 6, one edit over every patch; medians of 10 calls.
With ``--train``: ``Trainer.step`` and a torch profile of it, per variant.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

# As in bench/gpu.py: bench/queue.py must not shadow the standard library's queue.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parent / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)  # its sync() and timed() (median seconds over repeats, synchronised around each call)


def main(argv: list[str] | None = None) -> int:
    from sae_shared import interventions as iv_lib
    from sae_shared.backbones import load_backbone
    from sae_shared.heads import HeadContract, LinearProbe
    from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder, TopK

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="torch device (default cuda); cpu runs tiny shapes")
    p.add_argument("--no-profile", action="store_true", help="skip the torch profile table")
    p.add_argument("--train", action="store_true", help="profile SAE training steps instead of the intervention")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu for a smoke run", file=sys.stderr)
        return 2
    quick = dev.type == "cpu"
    if args.train:
        return train_parts(dev, quick, not args.no_profile)
    model = "vit_small_patch14_dinov2" if quick else "vit_base_patch14_dinov2"
    size, batch, layer = (56, 2, 6) if quick else (224, 64, 6)
    vit = load_backbone("dinov2", model=model, pretrained=False, image_size=size, device=str(dev),
                        dtype="float32" if quick else "bfloat16")
    d = vit.layout.d_model
    imgs = torch.randn(batch, 3, size, size, device=dev)

    def timed(name: str, fn) -> None:
        print(f"  {name:<34} {gpu.timed(fn, dev, warmup=2, repeats=10) * 1e3:8.2f} ms", flush=True)

    print(f"device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, {model} {size}px "
          f"b={batch}, torch {torch.__version__}")
    head = LinearProbe(["a", "b", "c"], HeadContract.for_backbone(vit, "pooled")).to(dev).eval()
    edits = [iv_lib.Edit(latent=3, op="scale", value=0.0)]
    for variant in (TopK(k=32), Relu()):
        sae = SparseAutoencoder(SAEConfig(d, 16 * d, variant), contract=Contract(vit.id, layer, "all")).to(dev).eval()
        iv = iv_lib.Intervener(vit, sae, head, layer=layer)
        prepared = iv.prepare(imgs)
        print(f"{variant.kind} SAE, d_sae={sae.d_sae}")
        with torch.inference_mode():
            x_nd = prepared.resid_btd.reshape(-1, d)
            codes_ns = sae.encode(x_nd)
            edited = iv_lib.edit_residual(sae, prepared.resid_btd, edits, vit.layout)
            rows_n = edited.tokens_bt.nonzero()[:, 0]
            timed("backbone forward", lambda: vit.forward(imgs))
            timed("forward_to L", lambda: vit.forward_to(imgs, layer))
            timed("forward_from L + head", lambda: iv.predict(prepared.resid_btd))
            timed("Intervener.run, drift", lambda: iv.run(prepared, edits, drift=True))
            timed("Intervener.run, no drift", lambda: iv.run(prepared, edits, drift=False))
            timed("  edit_residual", lambda: iv_lib.edit_residual(sae, prepared.resid_btd, edits, vit.layout))
            timed("  off_target_drift", lambda: iv_lib.off_target_drift(
                sae, edited.resid_btd[edited.tokens_bt], edited.edited_ns, edited.pairs_m2, rows_n, batch))
            timed("  sae.encode (dense, fp32)", lambda: sae.encode(x_nd))
            timed("  sae.decode (dense, fp32)", lambda: sae.decode(codes_ns))
        if not args.no_profile:
            print_profile(lambda: iv.run(prepared, edits, drift=True), dev, rows=15)
    return 0


def print_profile(fn, dev: torch.device, rows: int) -> None:
    """torch's profile of three calls of ``fn``, the ops with the most device (else CPU) time first."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        gpu.sync(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=50))


def train_parts(dev: torch.device, quick: bool, with_profile: bool) -> int:
    from sae_shared.sae import Relu, SAEConfig, TopK, TrainConfig
    from sae_shared.sae.training import Trainer

    d, s, n = (32, 256, 256) if quick else (768, 12288, 16384)
    x_nd = torch.randn(n, d, device=dev) * 2.0 + 0.5
    autocast = "fp32" if quick else "bf16"
    for variant in (TopK(k=8 if quick else 32), Relu()):
        cfg = TrainConfig(members=SAEConfig(d, s, variant), batch_size=n, warmup_steps=10, log_every=10**9,
                          autocast=autocast, device=str(dev))
        trainer = Trainer(cfg, total_steps=10**6, init_sample_nd=x_nd)
        step_s = gpu.timed(lambda: trainer.step(x_nd), dev, warmup=3, repeats=10)
        print(f"{variant.kind} d={d} s={s} n={n} ({autocast}): Trainer.step {step_s * 1e3:.2f} ms", flush=True)
        if with_profile:
            print_profile(lambda: trainer.step(x_nd), dev, rows=25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
