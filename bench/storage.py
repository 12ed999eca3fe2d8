#!/usr/bin/env python
"""Object-store throughput: ``sae_shared.storage.S3Store`` against the raw ``minio`` client, same server, same bytes.

Starts its own SeaweedFS S3 server (``LocalInfra`` in a temporary directory on free ports), then for each repeat,
alternating which client goes first, measures:

- put: one object of ``--size-mb`` MiB from memory (raw: ``Minio.put_object(BytesIO)`` with its defaults;
  wrapper: ``S3Store.put_bytes``),
- get: the whole object into memory (raw: ``get_object().read()``; wrapper: ``S3Store.get_bytes``),
- ranged: ``--ranges`` reads of ``--range-mb`` MiB at random offsets in that object (the same offsets for both),

and prints the median MB/s of each with the wrapper/raw ratio. Stops the server at the end::

    python bench/storage.py [--size-mb 64] [--repeats 5] [--range-mb 1] [--ranges 64] [--part-mb 16]

Both clients share the machine's cores with the server, so expect run-to-run noise of several percent.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/storage.py` puts bench/ first on sys.path, where sibling scripts (bench/queue.py) would shadow
# standard-library modules that minio and urllib3 import; take it off before importing anything else.
# ruff: noqa: E402
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import io
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable

from minio import Minio

from sae_shared.storage import PARALLEL_UPLOADS, PART_SIZE, S3Store, make_minio_client
from services.infra import LocalInfra, find_free_base

MiB = 1 << 20


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) that ``fn()`` took."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64, help="object size for put/get, MiB")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per measurement (median)")
    parser.add_argument("--range-mb", type=float, default=1.0, help="size of each ranged read, MiB")
    parser.add_argument("--ranges", type=int, default=64, help="ranged reads per repeat")
    parser.add_argument("--part-mb", type=int, default=PART_SIZE // MiB, help="S3Store multipart part size, MiB")
    parser.add_argument("--parallel", type=int, default=PARALLEL_UPLOADS, help="S3Store parallel part uploads")
    args = parser.parse_args(argv)

    size = args.size_mb * MiB
    range_len = int(args.range_mb * MiB)
    data = os.urandom(size)
    load_before = os.getloadavg()[0]
    rng = random.Random(0)

    with tempfile.TemporaryDirectory(prefix="saev-bench-") as home:
        infra = LocalInfra(Path(home), base_port=find_free_base())
        conn = infra.up()
        try:
            raw = Minio(conn.s3_endpoint, access_key=conn.s3_access_key, secret_key=conn.s3_secret_key, secure=False)
            bucket = "bench"
            raw.make_bucket(bucket)
            store = S3Store(
                make_minio_client(conn.s3_endpoint, conn.s3_access_key, conn.s3_secret_key),
                bucket,
                retry_seconds=60,
                part_size=args.part_mb * MiB,
                parallel_uploads=args.parallel,
            )
            key = "bench/object.bin"

            def raw_put() -> None:
                raw.put_object(bucket, key, io.BytesIO(data), len(data))

            def raw_get(offset: int = 0, length: int = 0) -> bytes:
                response = raw.get_object(bucket, key, offset=offset, length=length)
                try:
                    return response.read()
                finally:
                    response.close()
                    response.release_conn()

            # Warm up both clients (connections, region lookup) and check they agree on the bytes.
            raw_put()
            store.put_bytes(key, data)
            expected = data[12345 : 12345 + range_len]
            if not (raw_get() == store.get_bytes(key) == data and store.get_bytes(key, 12345, range_len) == expected):
                raise SystemExit("S3Store and the raw client disagree on the object's bytes")

            ranged = {
                "raw": lambda offset: raw_get(offset, range_len),
                "saev": lambda offset: store.get_bytes(key, offset, range_len),
            }
            ops = ("put", "get", "ranged")
            rate = {op: {"raw": [], "saev": []} for op in ops}  # MiB/s per repeat
            cpu = {op: {"raw": [], "saev": []} for op in ops}  # this process's CPU seconds per request
            for rep in range(args.repeats):
                order = ("raw", "saev") if rep % 2 == 0 else ("saev", "raw")
                whole = {
                    "put": {"raw": raw_put, "saev": lambda: store.put_bytes(key, data)},
                    "get": {"raw": raw_get, "saev": lambda: store.get_bytes(key)},
                }
                for op, fns in whole.items():
                    for who in order:
                        wall, cpu_s = timed(fns[who])
                        rate[op][who].append(size / MiB / wall)
                        cpu[op][who].append(cpu_s)
                # Ranged reads are short, so interleave them one by one (same offsets, alternating leader) and
                # let each client's rate be its bytes over the sum of its own request times.
                spent = {"raw": [0.0, 0.0], "saev": [0.0, 0.0]}
                for i in range(args.ranges):
                    offset = rng.randrange(0, size - range_len)
                    for who in order if i % 2 == 0 else order[::-1]:
                        wall, cpu_s = timed(lambda who=who, offset=offset: ranged[who](offset))
                        spent[who][0] += wall
                        spent[who][1] += cpu_s
                for who, (wall, cpu_s) in spent.items():
                    rate["ranged"][who].append(range_len * args.ranges / MiB / wall)
                    cpu["ranged"][who].append(cpu_s / args.ranges)

            print(
                f"object {args.size_mb} MiB, {args.repeats} interleaved repeats; "
                f"ranged: {args.ranges} x {args.range_mb:g} MiB at random offsets per repeat; "
                f"S3Store part {args.part_mb} MiB x {args.parallel} parallel, raw minio with its defaults; "
                f"load average at start {load_before:.1f}, at end {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)"
            )
            print("MiB/s: median over repeats; ratio: median of the per-repeat S3Store/raw ratios (each pair measured")
            print("back to back, which cancels drift in machine load), with their min-max; client CPU: this process's")
            print("CPU time per request (median), the part of the cost that the client library controls")
            print(
                f"{'op':<8}{'raw minio':>11}{'S3Store':>10}{'ratio':>8}{'ratio min-max':>16}"
                f"{'client CPU ms raw / S3Store':>30}"
            )
            worst = float("inf")
            for op in ops:
                ratios = [s / r for r, s in zip(rate[op]["raw"], rate[op]["saev"], strict=True)]
                ratio = statistics.median(ratios)
                worst = min(worst, ratio)
                raw_ms, saev_ms = (statistics.median(cpu[op][who]) * 1e3 for who in ("raw", "saev"))
                cpu_ms = f"{raw_ms:.1f} / {saev_ms:.1f}"
                print(
                    f"{op:<8}{statistics.median(rate[op]['raw']):>11.0f}{statistics.median(rate[op]['saev']):>10.0f}"
                    f"{ratio:>8.2f}{f'{min(ratios):.2f}-{max(ratios):.2f}':>16}{cpu_ms:>30}"
                )
            print(f"lowest ratio: {worst:.2f}")
        finally:
            infra.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
