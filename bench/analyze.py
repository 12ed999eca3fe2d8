#!/usr/bin/env python
"""Feature-analysis throughput: the analysis pass against the SAE's encode alone, on the same tokens, in one run.

Starts its own SeaweedFS S3 server (``LocalInfra`` in a temporary directory on free ports), writes a synthetic
shard set (``--rows`` views, CLS + a 16 x 16 patch grid, d=384, float32, as DINOv2 ViT-S/14 at 224 px records) and a
random ReLU SAE (d_sae ``--d-sae``, thresholds giving a few percent of latents active, statistics computed on a
sample so the pass skips its own token counts, as for a trained SAE). Then, for each repeat, alternating which
goes first:

- **encode**: ``sae.encode`` of every view's patch tokens, ``batch_rows`` views per call (the analysis' own batch
  size), the activations already in memory as float32: the bare cost of the codes, nothing else;
- **pass**: ``ExemplarAnalysis(...).run()`` over the shard set in the store: ranged reads (prefetched on
  threads), the same encodes plus the CLS token's, the running top-k by patch and by CLS with the heatmaps of the
  kept views, the reverse index, the view counts;
- **analyze**: the whole ``analyze()`` job body (tiles off): loading the SAE, the pass, ``finish`` (provenance,
  per-image reverse index, statistics) and publishing the artifact.

Tokens/s count patch tokens (rows x 256), the same for all three. Prints per-repeat numbers, the medians and the
ratios to the encode measured in the same repeat (target >= 0.7 for the pass). Beside wall-clock rates it prints
the **CPU ratio**: CPU seconds per token of the encode over those of the pass (this process, its read threads
included, plus the S3 server): what the analysis costs in work, far steadier than wall time on a shared, loaded
machine. Synthetic views are independent draws, so a latent's top-k keeps changing longer than on real images (the
merges are a worst case early in a pass; more ``--rows`` approach the steady state)::

    python bench/analyze.py [--rows 512] [--d-sae 3072] [--top-k 16] [--repeats 3] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (queue.py): keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

D, GRID = 384, (16, 16)
BACKBONE = "bench:vit-s14"
LAYER = 9


def write_inputs(store, rows: int, rows_per_shard: int, d_sae: int, seed: int = 0):
    """The synthetic shard set and the SAE (saved as ``saes/bench``); returns (acts_id, patch tokens [rows, P, D])."""
    from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder, compute_stats, save_sae
    from sae_shared.shards import ShardSetMetadata, ShardSetWriter, TokenLayout, compute_acts_id

    n_patches = GRID[0] * GRID[1]
    layout = TokenLayout(n_tokens=1 + n_patches, cls_index=0, register_indices=(), patch_start=1, patch_grid=GRID)
    aug = {"seed": 0, "views_per_image": 1}
    meta = ShardSetMetadata(
        acts_id=compute_acts_id(dataset_id="bench", dataset_hash=str(seed), backbone_id=BACKBONE, layers=[LAYER],
                                tokens="all", dtype="float32", augmentation=aug),
        backbone_id=BACKBONE, layers=(LAYER,), tokens="all", token_layout=layout, d_model=D, dtype="float32",
        n_rows=rows, rows_per_shard=rows_per_shard, dataset_id="bench", dataset_hash=str(seed), augmentation=aug)
    g = torch.Generator().manual_seed(seed)
    # Image-like structure: each view's tokens share a view direction; patches near each other share more.
    acts = torch.randn(rows, 1, layout.n_tokens, D, generator=g) + 2.0 * torch.randn(rows, 1, 1, D, generator=g)
    writer = ShardSetWriter(store, meta)
    for s in range(meta.n_shards):
        r = meta.shard_rows(s)
        writer.write_shard(s, acts[r.start:r.stop].contiguous(), [
            {"image_index": i, "image_id": f"img{i:06d}", "label": i % 10} for i in r])
    writer.commit()
    patches = acts[:, 0, 1:].contiguous()

    sae = SparseAutoencoder(SAEConfig(d_model=D, d_sae=d_sae, variant=Relu(), seed=seed),
                            contract=Contract(backbone_id=BACKBONE, layer=LAYER, tokens="patches"))
    sample = patches[: max(1, 4096 // n_patches)].reshape(-1, D)
    mean = sample.mean(0)
    sae.set_normalisation(mean, float(((sample - mean) ** 2).sum(1).mean().sqrt() / D ** 0.5))
    with torch.no_grad():
        sae.b_enc.fill_(-2.0)  # a unit-variance projection passes 2.0 about one time in forty
    sae.eval()
    compute_stats(sae, sample, source="bench sample")
    save_sae(sae, "saes/bench", store=store, overwrite=True)
    return meta.acts_id, patches, sae


class CpuMeter:
    """CPU seconds of this process (every thread) and of the S3 server."""

    def __init__(self, server_pid: int | None):
        import psutil

        self.server = psutil.Process(server_pid) if server_pid else None

    def __call__(self) -> float:
        total = time.process_time()
        if self.server is not None:
            t = self.server.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        return total


def encode_rate(sae, patches: torch.Tensor, batch_rows: int, device: str, cpu=time.process_time):
    """(patch tokens per second, CPU seconds per token) of ``sae.encode`` alone, ``batch_rows`` views per call."""
    rows, n_patches, _ = patches.shape
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    c0, start = cpu(), time.perf_counter()
    with torch.inference_mode():
        for r0 in range(0, rows, batch_rows):
            x = patches[r0:r0 + batch_rows].to(device, non_blocking=True).reshape(-1, D)
            sae.encode(x)
        sync()
    n = rows * n_patches
    return n / (time.perf_counter() - start), (cpu() - c0) / n


def pass_rate(sae, store, acts_id: str, top_k: int, batch_rows: int, device: str, cpu=time.process_time):
    """(patch tokens per second, CPU seconds per token, latents its top-k merges touched) of the analysis pass."""
    from sae_shared.analysis import ExemplarAnalysis
    from sae_shared.shards import ShardSet

    ss = ShardSet(store, acts_id)
    try:
        run = ExemplarAnalysis(sae, ss, top_k=top_k, reverse_n=16, batch_rows=batch_rows, device=device)
        c0, start = cpu(), time.perf_counter()
        run.run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        n = run.n_rows * run.n_patches
        return n / (time.perf_counter() - start), (cpu() - c0) / n, run.latents_updated
    finally:
        ss.close()


def analyze_rate(store, acts_id: str, top_k: int, batch_rows: int, device: str, rows: int) -> float:
    """Patch tokens per second of the whole ``analyze()`` (tiles off, forced: no reuse of the previous one)."""
    from sae_shared.analysis import AnalyzeOptions, analyze

    start = time.perf_counter()
    analyze(store, "bench", acts_id, AnalyzeOptions(top_k=top_k, batch_rows=batch_rows, tiles=False, force=True,
                                                    device=device))
    return rows * GRID[0] * GRID[1] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="views in the synthetic shard set")
    parser.add_argument("--rows-per-shard", type=int, default=128, help="views per shard")
    parser.add_argument("--d-sae", type=int, default=3072, help="SAE latents")
    parser.add_argument("--top-k", type=int, default=16, help="exemplars kept per latent")
    parser.add_argument("--batch-rows", type=int, default=0, help="views per batch (0: the analysis' default)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved (encode, pass, analyze) rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from sae_shared.analysis import ExemplarAnalysis
    from sae_shared.shards import ShardSet
    from sae_shared.storage import S3Store, make_minio_client
    from services.infra import LocalInfra, find_free_base

    rows_enc, rows_pass, rows_job, cpu_ratios = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="saev-bench-") as home:
        infra = LocalInfra(Path(home), base_port=find_free_base())
        conn = infra.up()
        try:
            client = make_minio_client(conn.s3_endpoint, conn.s3_access_key, conn.s3_secret_key)
            client.make_bucket("bench")
            store = S3Store(client, "bench", retry_seconds=60)
            acts_id, patches, sae = write_inputs(store, args.rows, args.rows_per_shard, args.d_sae)
            sae = sae.to(args.device)
            ss = ShardSet(store, acts_id)
            batch_rows = args.batch_rows or ExemplarAnalysis(sae, ss, top_k=args.top_k, device=args.device).batch_rows
            ss.close()
            with torch.inference_mode():
                l0 = (sae.encode(patches[:8].reshape(-1, D).to(args.device)) > 0).sum(1).float().mean().item()
            print(f"{args.rows} views x {GRID[0] * GRID[1]} patches (+ CLS), d={D}, d_sae={args.d_sae} (L0 {l0:.0f}), "
                  f"top_k {args.top_k}, batch {batch_rows} views, device {args.device}, torch threads "
                  f"{torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}", flush=True)
            cpu = CpuMeter(infra.pid("s3"))
            encode_rate(sae, patches[:batch_rows], batch_rows, args.device)  # warm-up
            pass_rate(sae, store, acts_id, args.top_k, batch_rows, args.device)
            for rep in range(args.repeats):
                order = ("encode", "pass", "analyze") if rep % 2 == 0 else ("analyze", "pass", "encode")
                got = {}
                for name in order:
                    if name == "encode":
                        got[name], enc_cpu = encode_rate(sae, patches, batch_rows, args.device, cpu)
                    elif name == "pass":
                        got[name], pass_cpu, touched = pass_rate(sae, store, acts_id, args.top_k, batch_rows,
                                                                 args.device, cpu)
                    else:
                        got[name] = analyze_rate(store, acts_id, args.top_k, batch_rows, args.device, args.rows)
                rows_enc.append(got["encode"]), rows_pass.append(got["pass"]), rows_job.append(got["analyze"])
                cpu_ratios.append(enc_cpu / pass_cpu)
                print(f"  repeat {rep}: encode {got['encode']:.0f} tok/s ({enc_cpu * 1e6:.0f} CPU-us/tok), pass "
                      f"{got['pass']:.0f} ({got['pass'] / got['encode']:.3f}; {pass_cpu * 1e6:.0f} CPU-us/tok incl. "
                      f"S3, CPU ratio {enc_cpu / pass_cpu:.3f}), analyze() {got['analyze']:.0f} "
                      f"({got['analyze'] / got['encode']:.3f}), top-k merges touched {touched} latents, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            infra.down()

    pass_ratios = [p / e for p, e in zip(rows_pass, rows_enc)]
    job_ratios = [j / e for j, e in zip(rows_job, rows_enc)]
    print()
    print(f"medians over {len(rows_enc)} repeats; ratio: median of per-repeat ratios to the encode (min-max)")
    print(f"{'':<22}{'tokens/s':>10}{'ratio':>8}{'min-max':>13}")
    print(f"{'SAE encode alone':<22}{statistics.median(rows_enc):>10.0f}")
    print(f"{'analysis pass':<22}{statistics.median(rows_pass):>10.0f}{statistics.median(pass_ratios):>8.3f}"
          f"{min(pass_ratios):>7.2f}-{max(pass_ratios):.2f}")
    print(f"{'analyze() end to end':<22}{statistics.median(rows_job):>10.0f}{statistics.median(job_ratios):>8.3f}"
          f"{min(job_ratios):>7.2f}-{max(job_ratios):.2f}")
    print(f"{'CPU ratio (pass)':<22}{'':>10}{statistics.median(cpu_ratios):>8.3f}"
          f"{min(cpu_ratios):>7.2f}-{max(cpu_ratios):.2f}")
    print(f"pass ratio target >= 0.7: {'met' if statistics.median(pass_ratios) >= 0.7 else 'MISSED'} (wall), "
          f"{'met' if statistics.median(cpu_ratios) >= 0.7 else 'MISSED'} (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
