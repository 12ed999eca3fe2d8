"""Benchmark of the job queue on a local Redis: submit rate, claim rate and submit->claim latency.

Starts its own local servers (``LocalInfra`` in a temporary directory, on free ports) and measures, with the real
``Queue`` (spec validation, Lua scripts, stream reads):

- **submit**: jobs/s from one client, and from several client threads at once;
- **claim**: jobs/s claimed (claim script + stream read + promotion check) by one consumer and by several, and the
  full claim + complete cycle;
- **latency**: time from calling ``submit`` to a blocked consumer's ``claim`` returning the job, at a steady
  submission rate well under capacity (p50 / p99 / max).

Each measurement runs with Redis's AOF at ``appendfsync everysec`` (the local default) and, for submit, also at
``appendfsync always`` (what the Redis restart test uses; see ``sae_shared/queue.py`` on durability).

    .venv/bin/python bench/queue.py [--jobs 2000] [--threads 4] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as ``python bench/queue.py``, this file's folder comes first on sys.path and would shadow the standard
# library's ``queue`` (which redis and threading users import): drop it, and put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from sae_shared.queue import Queue, connect  # noqa: E402
from services.infra import LocalInfra, find_free_base  # noqa: E402

SPEC = {"steps": 10, "seed": "bench"}


def fresh_queue(url: str, name: str) -> Queue:
    return Queue(connect(url), f"bench-{name}-{time.monotonic_ns()}", lease_seconds=60)


def submit_rate(url: str, n: int, threads: int) -> float:
    """Jobs/s submitted by ``threads`` clients together (each with its own connection)."""
    queues = [fresh_queue(url, "submit") for _ in range(threads)]
    per = n // threads
    barrier = threading.Barrier(threads + 1)

    def run(q: Queue) -> None:
        barrier.wait()
        for i in range(per):
            q.submit("count", {**SPEC, "seed": str(i)})

    workers = [threading.Thread(target=run, args=(q,)) for q in queues]
    for t in workers:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in workers:
        t.join()
    return per * threads / (time.perf_counter() - start)


def claim_rate(url: str, n: int, threads: int, complete: bool) -> float:
    """Jobs/s claimed (and completed, with ``complete``) by ``threads`` consumers from a pre-filled queue."""
    q = fresh_queue(url, "claim")
    for i in range(n):
        q.submit("count", {**SPEC, "seed": str(i)})
    claimed = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def run(k: int) -> None:
        mine = Queue(connect(url), q.namespace, lease_seconds=60, reclaim_interval=3600)
        barrier.wait()
        while True:
            lease = mine.claim(f"c{k}", ["count"], block_seconds=0.05)
            if lease is None:
                return
            claimed[k] += 1
            if complete:
                mine.complete(lease, {"ok": True})

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - start - 0.05  # the last, empty claim waited for nothing
    assert sum(claimed) == n, (sum(claimed), n)
    return n / elapsed


def latency(url: str, n: int, interval: float) -> dict[str, float]:
    """Submit -> claim latency (ms) with one consumer blocked in ``claim`` and one submission every ``interval``."""
    q = fresh_queue(url, "latency")
    consumer = Queue(connect(url), q.namespace, lease_seconds=60, reclaim_interval=3600)
    q.submit("count", SPEC)  # create the stream and group
    consumer.claim("warm", ["count"], block_seconds=1)
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    done = threading.Event()

    def consume() -> None:
        while not done.is_set() or len(got) < n:
            lease = consumer.claim("c", ["count"], block_seconds=0.5)
            if lease is not None:
                got[lease.job_id] = time.perf_counter()
            elif done.is_set():
                return

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.2)
    for i in range(n):
        job_id = f"lat{i:06d}{time.monotonic_ns() % 1000000:06d}"
        sent[job_id] = time.perf_counter()
        q.submit("count", {**SPEC, "seed": str(i)}, job_id=job_id)
        time.sleep(interval)
    done.set()
    t.join(timeout=30)
    ms = sorted((got[j] - sent[j]) * 1000 for j in sent if j in got)
    assert len(ms) == n, f"{n - len(ms)} jobs never claimed"
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
        "max_ms": ms[-1],
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per rate measurement")
    parser.add_argument("--threads", type=int, default=4, help="client threads for the concurrent measurements")
    parser.add_argument("--latency-jobs", type=int, default=1000, help="jobs in the latency measurement")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between submissions (latency)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="saev-bench-") as home:
        infra = LocalInfra(home, base_port=find_free_base())
        conn = infra.up()
        try:
            url = conn.redis_url
            admin = connect(url)
            info = admin.info("server")
            results: dict[str, object] = {
                "machine": f"{cpu_model()}, {os.cpu_count()} cores",
                "redis": info["redis_version"],
                "jobs": args.jobs,
                "threads": args.threads,
            }
            for fsync in ("everysec", "always"):
                admin.config_set("appendfsync", fsync)
                results[f"submit_1_client_per_s[{fsync}]"] = submit_rate(url, args.jobs, 1)
                results[f"submit_{args.threads}_clients_per_s[{fsync}]"] = submit_rate(url, args.jobs, args.threads)
            admin.config_set("appendfsync", "everysec")
            results["claim_1_consumer_per_s"] = claim_rate(url, args.jobs, 1, complete=False)
            results[f"claim_{args.threads}_consumers_per_s"] = claim_rate(url, args.jobs, args.threads, complete=False)
            results["claim_complete_1_consumer_per_s"] = claim_rate(url, args.jobs, 1, complete=True)
            results[f"claim_complete_{args.threads}_consumers_per_s"] = claim_rate(
                url, args.jobs, args.threads, complete=True
            )
            results["submit_to_claim"] = latency(url, args.latency_jobs, args.interval)
        finally:
            infra.down()

    print(f"machine: {results['machine']}; Redis {results['redis']} (local, AOF on)")
    print("| measurement | value |")
    print("| --- | --- |")
    for key, value in results.items():
        if isinstance(value, float):
            print(f"| {key} | {value:,.0f} jobs/s |")
    lat = results["submit_to_claim"]
    assert isinstance(lat, dict)
    print(f"| submit->claim latency ({args.latency_jobs} jobs, one every {args.interval * 1000:g} ms) | "
          f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
