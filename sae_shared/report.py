"""The demo's report: what was run and what came out, as one self-contained HTML file (and a Markdown twin).

Two steps:

- :func:`build_report` gathers everything the report shows into one JSON-ready dict: the stages' job specs,
  results and times, each sweep member's held-out metrics and training curve (``metrics.jsonl``), the chosen SAE's
  log10-frequency histogram (its held-out statistics), a feature gallery (exemplar tiles as base64 PNGs from the
  analysis, ``sae_shared.tiles.get_tile``), and the experiments' arms and plans;
- :func:`render_html` / :func:`render_markdown` turn that dict into text, as pure functions. The HTML has no
  external assets: styles inline, images as ``data:`` URIs, charts as inline SVG drawn here. Every value taken from
  the data is escaped.

``run`` (what :func:`build_report` takes) is what ``services.demo`` returns: ``stages`` (title, job_type, job_id,
spec, result, seconds, reused), ``best`` (the chosen sweep member), ``size``, ``layer``, ``backbone``, ``command``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from typing import Any, Sequence

from sae_shared.telemetry import get_logger

log = get_logger(__name__)

GALLERY_EXTRA = 9
"""Latents shown in the gallery besides the experiments' own."""
TILES_PER_LATENT = 6

# --------------------------------------------------------------------------------------------------------------
# Gathering
# --------------------------------------------------------------------------------------------------------------


def _stage(run: dict[str, Any], job_type: str, title_prefix: str = "") -> dict[str, Any] | None:
    for s in run["stages"]:
        if s["job_type"] == job_type and s["title"].startswith(title_prefix):
            return s
    return None


def _curve(store, sae_id: str) -> list[dict[str, float]]:
    """The training curve of one SAE: (tokens, normalised MSE, L0) per logged step."""
    from sae_shared.storage import NotFound

    try:
        text = store.get_bytes(f"saes/{sae_id}/metrics.jsonl").decode()
    except NotFound:
        return []
    points = []
    for line in text.splitlines():
        if line.strip():
            m = json.loads(line)
            if m.get("kind") == "train" and m.get("fvu") is not None:
                points.append({"tokens": m["tokens"], "fvu": m["fvu"], "l0": m["l0"]})
    return points


def _gallery(store, sae_id: str, stats, experiments: dict[str, Any]) -> list[dict[str, Any]]:
    """Cards of the experiments' latents (chosen, then random baseline), then the analysis's pre-rendered
    latents with the largest activations."""
    from sae_shared.analysis import open_analysis
    from sae_shared.tiles import get_tile

    reader = open_analysis(store, sae_id)
    roles: dict[int, str] = {}
    for exp in experiments.values():
        for entry in exp["plan"]:
            what = entry.get("class_name") or exp["task"]
            n = len(entry["latents"])
            if n == 1:
                drop = entry.get("attribution")
                why = f"F1 {_num(entry.get('score'))}"
                if drop is not None:
                    why += f", estimated logit drop {_num(drop)}"
                roles.setdefault(int(entry["latents"][0]), f"chosen for “{what}” ({why})")
                roles.setdefault(int(entry["random_latents"][0]), f"random-latent baseline for “{what}”")
            else:  # a multi-latent plan: its first three
                for i in entry["latents"][:3]:
                    roles.setdefault(int(i), f"one of the {n} latents suppressed together for “{what}”")
    lat = reader.latent_stats()
    packed = [int(i) for i in reader.tiles_index().get("kinds", {}).get("patch", {}).get("latents", {})]
    packed.sort(key=lambda i: -float(lat["max_patch"][i]))
    for i in [i for i in packed if i not in roles][:GALLERY_EXTRA]:
        roles[i] = ""
    cards = []
    for latent, role in roles.items():
        card = {"latent": latent, "role": role,
                "frequency": float(stats.frequency[latent]) if stats is not None else None,
                "mean_value": float(stats.mean_when_firing[latent]) if stats is not None else None,
                "view_frequency": float(lat["view_frequency"][latent]), "max_patch": float(lat["max_patch"][latent]),
                "exemplars": []}
        for e in reader.exemplars(latent, "patch", limit=TILES_PER_LATENT, heatmaps=False):
            try:
                png = get_tile(store, sae_id, latent, e.rank, "patch")
            except Exception as exc:  # noqa: BLE001 - a card without a picture beats no report
                log.warning("tile not rendered", extra={"latent": latent, "rank": e.rank, "error": str(exc)[:200]})
                png = None
            card["exemplars"].append({"rank": e.rank, "value": e.value, "image_id": e.image_id, "label": e.label,
                                      "png": None if png is None else base64.b64encode(png).decode()})
        cards.append(card)
    return cards


def build_report(store, run: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, JSON-ready (tiles as base64 PNG strings)."""
    from sae_shared.sae.io import load_sae

    best = run["best"]
    sae_id = best["sae_id"]
    sweep = _stage(run, "train")
    members = []
    for spec_member, m in zip(sweep["spec"].get("sweep") or [{}], sweep["result"]["saes"]):
        members.append({**m, "settings": spec_member, "chosen": m["sae_id"] == sae_id,
                        "curve": _curve(store, m["sae_id"])})
    sae = load_sae(f"saes/{sae_id}", store=store)
    stats = sae.stats
    histogram = None
    if stats is not None:
        histogram = {"edges": [float(e) for e in stats.log_freq_edges], "counts": [int(c) for c in
                                                                                   stats.log_freq_counts],
                     "n_dead": stats.n_dead, "n_tokens": stats.n_tokens, "source": stats.source}
    experiments = {s["title"]: {"title": s["title"], "spec": s["spec"], **s["result"]}
                   for s in run["stages"] if s["job_type"] == "experiment"}
    cfg = store.get_json(f"saes/{sae_id}/cfg.json")
    return {
        "command": run.get("command", "saevctl demo"), "size": run["size"], "backbone": run["backbone"],
        "layer": run["layer"], "d_sae": run["d_sae"], "token_budget": run["token_budget"],
        "jobs_seconds": run.get("jobs_seconds"),
        "best": {k: v for k, v in best.items()}, "sae_cfg": cfg, "members": members, "histogram": histogram,
        "stages": [{k: s.get(k) for k in ("title", "job_type", "job_id", "spec", "result", "seconds", "job_seconds",
                                          "reused")} for s in run["stages"]],
        "heads": {s["result"]["head_id"]: s["result"] for s in run["stages"] if s["job_type"] == "train-head"},
        "experiments": experiments,
        "gallery": _gallery(store, sae_id, stats, experiments),
    }


# --------------------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------------------


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 10 ** -(digits - 1) or abs(v) >= 1e6):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _e(v: Any) -> str:
    """Escaped text of a value (numbers formatted)."""
    return html.escape(_num(v) if isinstance(v, (int, float)) else str(v), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, marked: Sequence[bool] = ()) -> str:
    """An HTML table, every cell escaped; rows whose ``marked`` entry is true are highlighted."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(("<tr class=\"chosen\">" if j < len(marked) and marked[j] else "<tr>")
                   + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for j, r in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return (_num(v) if isinstance(v, (int, float)) else str(v)).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(cell(h) for h in header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]]


# --------------------------------------------------------------------------------------------------------------
# SVG charts
# --------------------------------------------------------------------------------------------------------------

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 460, 280, 58, 14, 14, 44


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


class _Axes:
    """Maps data to SVG coordinates (optionally log10 on x) and draws the frame, ticks and labels."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], *, log_x: bool = False, y0: float | None = None):
        self.log_x = log_x
        tx = [math.log10(x) for x in xs if x > 0] if log_x else list(xs)
        self.x_lo, self.x_hi = (min(tx), max(tx)) if tx else (0.0, 1.0)
        if self.x_hi - self.x_lo < 1e-12:
            self.x_lo, self.x_hi = self.x_lo - 0.5, self.x_hi + 0.5
        self.y_lo = min(ys) if y0 is None else y0
        self.y_hi = max(ys) if ys else 1.0
        if self.y_hi - self.y_lo < 1e-12:
            self.y_hi = self.y_lo + 1.0
        span = self.y_hi - self.y_lo
        self.y_hi += 0.05 * span
        if y0 is None:
            self.y_lo -= 0.05 * span

    def x(self, v: float) -> float:
        t = math.log10(v) if self.log_x else v
        return PAD_L + (t - self.x_lo) / (self.x_hi - self.x_lo) * (W - PAD_L - PAD_R)

    def y(self, v: float) -> float:
        return H - PAD_B - (v - self.y_lo) / (self.y_hi - self.y_lo) * (H - PAD_T - PAD_B)

    def frame(self, xlabel: str, ylabel: str) -> str:
        parts = [f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
                 'fill="none" stroke="#999"/>']
        for t in _ticks(self.x_lo, self.x_hi):
            v = 10 ** t if self.log_x else t
            px = PAD_L + (t - self.x_lo) / (self.x_hi - self.x_lo) * (W - PAD_L - PAD_R)
            parts.append(f'<line x1="{px:.1f}" y1="{H - PAD_B}" x2="{px:.1f}" y2="{H - PAD_B + 4}" stroke="#999"/>'
                         f'<text x="{px:.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{_e(_num(v, 3))}</text>')
        for t in _ticks(self.y_lo, self.y_hi):
            py = self.y(t)
            parts.append(f'<line x1="{PAD_L - 4}" y1="{py:.1f}" x2="{PAD_L}" y2="{py:.1f}" stroke="#999"/>'
                         f'<text x="{PAD_L - 6}" y="{py + 4:.1f}" text-anchor="end">{_e(_num(t, 3))}</text>')
        parts.append(f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 6}" text-anchor="middle">{_e(xlabel)}</text>')
        parts.append(f'<text transform="translate(14 {(PAD_T + H - PAD_B) / 2}) rotate(-90)" '
                     f'text-anchor="middle">{_e(ylabel)}</text>')
        return "".join(parts)


def _svg(body: str, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
            f'aria-label="{_e(title)}" font-size="11" font-family="sans-serif">{body}</svg>')


def svg_sweep(members: list[dict[str, Any]]) -> str:
    """Held-out L0 (log x) against held-out normalised MSE, one point per sweep member; the chosen one ringed."""
    pts = [(m["l0"], m["fvu"]) for m in members if m.get("l0") and m.get("fvu") is not None]
    if not pts:
        return ""
    ax = _Axes([p[0] for p in pts], [p[1] for p in pts], log_x=True)
    body = [ax.frame("L0 (active latents per token, held-out)", "normalised MSE (held-out)")]
    for j, m in enumerate(members):
        if not m.get("l0") or m.get("fvu") is None:
            continue
        cx, cy = ax.x(m["l0"]), ax.y(m["fvu"])
        colour = _COLOURS[j % len(_COLOURS)]
        body.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{colour}"><title>{_e(_member_name(m))}: '
                    f'L0 {_e(m["l0"])}, normalised MSE {_e(m["fvu"])}</title></circle>')
        if m.get("chosen"):
            body.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" stroke="#000" stroke-width="1.5"/>')
        right = cx > W - PAD_R - 90  # near the right edge: label to the left of the point
        body.append(f'<text x="{cx - 8 if right else cx + 8:.1f}" y="{cy - 6:.1f}" '
                    f'text-anchor="{"end" if right else "start"}">{_e(_member_name(m))}</text>')
    return _svg("".join(body), "sweep: L0 against normalised MSE")


def svg_curves(members: list[dict[str, Any]]) -> str:
    """Training normalised MSE (per batch) against training tokens, one line per member."""
    series = [(m, m["curve"]) for m in members if m.get("curve")]
    if not series:
        return ""
    xs = [p["tokens"] for _, c in series for p in c]
    ys = [p["fvu"] for _, c in series for p in c]
    ax = _Axes(xs, ys, y0=0.0)
    body = [ax.frame("training tokens", "normalised MSE (training batch)")]
    for j, (m, c) in enumerate(series):
        colour = _COLOURS[j % len(_COLOURS)]
        path = " ".join(f"{ax.x(p['tokens']):.1f},{ax.y(p['fvu']):.1f}" for p in c)
        body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5">'
                    f'<title>{_e(_member_name(m))}</title></polyline>')
        ly = PAD_T + 14 + 13 * j
        body.append(f'<line x1="{W - PAD_R - 150}" y1="{ly - 4}" x2="{W - PAD_R - 134}" y2="{ly - 4}" '
                    f'stroke="{colour}" stroke-width="2"/><text x="{W - PAD_R - 130}" y="{ly}">'
                    f'{_e(_member_name(m))}</text>')
    return _svg("".join(body), "training curves")


def svg_histogram(hist: dict[str, Any] | None) -> str:
    """Latents per log10(firing frequency) bin (never-firing latents noted in the label)."""
    if not hist or not sum(hist["counts"]):
        return ""
    edges, counts = hist["edges"], hist["counts"]
    used = [i for i, c in enumerate(counts) if c]
    lo_i, hi_i = max(0, used[0] - 1), min(len(counts) - 1, used[-1] + 1)
    ax = _Axes([edges[lo_i], edges[hi_i + 1]], [0.0, float(max(counts))], y0=0.0)
    body = [ax.frame(f"log10 firing frequency (dead: {hist['n_dead']})", "latents")]
    for i in range(lo_i, hi_i + 1):
        x0, x1 = ax.x(edges[i]), ax.x(edges[i + 1])
        y = ax.y(counts[i])
        body.append(f'<rect x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(0.5, x1 - x0 - 1):.1f}" '
                    f'height="{H - PAD_B - y:.1f}" fill="#1f77b4"><title>[{_e(edges[i])}, {_e(edges[i + 1])}): '
                    f'{counts[i]}</title></rect>')
    if -2.0 >= edges[lo_i]:
        dx = ax.x(-2.0)
        body.append(f'<line x1="{dx:.1f}" y1="{PAD_T}" x2="{dx:.1f}" y2="{H - PAD_B}" stroke="#d62728" '
                    'stroke-dasharray="4 3"><title>dense above 1e-2</title></line>')
    return _svg("".join(body), "log10 frequency histogram")


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


def _member_name(m: dict[str, Any]) -> str:
    s = m.get("settings") or {}
    parts = [s.get("variant") or m.get("variant", "?")]
    if s.get("k") is not None:
        parts.append(f"k={s['k']}")
    if s.get("lr") is not None:
        parts.append(f"lr={s['lr']:g}")
    return " ".join(parts)


ARM_NOTES = {"sae": "suppress the chosen latent", "random-latent": "suppress as many random latents",
             "random-direction": "random unit direction, same norm as the SAE edit per token"}


def _experiment_rows(exp: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    classify = exp["task"] == "classify"
    header = ["arm", "what", "images"]
    header += (["target-class probability drop (mean)", "flip rate"] if classify else
               ["target-patch change rate", "other-patch change rate", "target-patch probability drop (mean)"])
    header += ["drift: mean |Δf| of other latents", "drift: relative ‖Δf‖/‖f‖",
               "drift: other latents flipped per token"]
    rows = []
    for arm, a in exp["arms"].items():
        d = a.get("drift") or {}
        main = ([a.get("prob_drop"), a.get("flip_rate")] if classify else
                [a.get("target_change_rate"), a.get("other_change_rate"), a.get("target_prob_drop")])
        rows.append([arm, ARM_NOTES.get(arm, ""), a.get("n_images"), *main, d.get("mean_abs"), d.get("relative"),
                     d.get("flips_per_token")])
    return header, rows


PLAN_HEADER = ["class", "latent", "F1 (selection)", "estimated logit drop (selection)", "random-latent baseline"]


def _plan_rows(exp: dict[str, Any]) -> list[list[Any]]:
    return [[e.get("class_name"), ", ".join(map(str, e["latents"])), _num(e.get("score")),
             _num(e.get("attribution")), ", ".join(map(str, e["random_latents"]))] for e in exp["plan"]]


def _stage_rows(r: dict[str, Any]) -> list[list[Any]]:
    return [[s["title"], s["job_id"], None if s.get("job_seconds") is None else round(s["job_seconds"], 1),
             round(s["seconds"], 1), "yes" if s["reused"] else ""] for s in r["stages"]]


def _what_was_run(r: dict[str, Any]) -> list[list[Any]]:
    z, cfg, best = r["size"], r["sae_cfg"], r["best"]
    stage = {s["title"]: s for s in r["stages"]}
    rows = [["command", r["command"]],
            ["backbone", cfg.get("contract", {}).get("backbone_id", r["backbone"])],
            ["layer", f"block {r['layer']} output (0-based), patch tokens"]]
    for title in ("record bundled-lfw", "record bundled-photos", "record bundled-digits"):
        s = stage.get(title)
        if s:
            res, spec = s["result"], s["spec"]
            rows.append([f"data: {spec['dataset']}", f"{res.get('n_images')} images × {spec.get('views_per_image', 1)}"
                         f" views = {res.get('n_rows')} rows, {spec['dtype']}, seed {spec.get('seed', 0)}, "
                         f"acts_id {res['acts_id']}"])
    v = (cfg.get("sae") or {}).get("variant", {})
    rows += [["SAE (chosen)", f"{best['sae_id']}: {v.get('kind')} k={v.get('k')}, d_sae {r['d_sae']} "
                              f"({z['expansion']}× {cfg.get('d_model')}), input norm "
                              f"{(cfg.get('sae') or {}).get('input_norm')}, seed {(cfg.get('sae') or {}).get('seed')}"],
             ["SAE training", f"sweep of {len(r['members'])} on the same batches: {z['steps']} steps × "
                              f"{z['batch_size']} tokens = {r['token_budget']:,} tokens each, bf16 autocast, "
                              "10% of rows held out"],
             ["selection", f"lowest held-out normalised MSE among members at L0 ≈ {z['k']} (matched L0)"]]
    for head_id, h in r["heads"].items():
        acc = (h.get("heldout") or {}).get("accuracy")
        rows.append([f"head {head_id}", f"{h.get('kind')} over {h.get('classes')}"
                     + (f", held-out accuracy {_num(acc)}" if acc is not None else "")])
    for exp in r["experiments"].values():
        spec = exp["spec"]
        rule = ("best F1" if spec.get("selection", "f1") == "f1" else
                f"among the {spec.get('candidates', 10)} best F1, the largest estimated logit drop")
        explicit = any(spec.get(k) for k in ("plan", "latents", "edits"))
        what = ("the latents of an explicit plan" if explicit else
                f"the latent chosen per class ({rule}, firing on ≤ {spec.get('max_frequency', 0.01)} of tokens)")
        chosen_on = (f", chosen on images {spec['selection_images'][0]}–{spec['selection_images'][1] - 1}"
                     if spec.get("selection_images") and not explicit else "")
        images = (f"edited in images {spec['images'][0]}–{spec['images'][1] - 1}" if spec.get("images") else
                  f"{exp['n_images']} images")
        rows.append([exp["title"], f"{spec['op']} {spec['value']} on {what}{chosen_on}, {images}, "
                                   f"labels {spec.get('labels')}, seed {spec.get('seed')}"])
    return rows


# --------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .55em;
text-align:left;vertical-align:top}th{background:#f4f4f4}tr.chosen td{background:#fff6d6}
code,pre{background:#f6f6f6;font-size:.85em}pre{padding:.6em;overflow-x:auto}
.charts{display:flex;flex-wrap:wrap;gap:1em}.card{border:1px solid #ddd;border-radius:6px;padding:.5em;margin:.6em 0}
.tiles{display:flex;flex-wrap:wrap;gap:6px}.tiles figure{margin:0;text-align:center;font-size:.75em}
.tiles img{width:112px;height:112px;image-rendering:pixelated;border:1px solid #ccc}.role{color:#a33}
.note{color:#555;font-size:.9em}
"""


def render_html(r: dict[str, Any]) -> str:
    """The report as one HTML document with no external assets."""
    out = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>SAE-V demo report ({_e(r['size']['name'])})</title><style>{_CSS}</style></head><body>",
           f"<h1>SAE-V demo report: {_e(r['backbone'])} block {_e(r['layer'])} ({_e(r['size']['name'])} size)</h1>",
           f"<p>Reproduce with one command: <code>{_e(r['command'])}</code> (on a fresh checkout: <code>make demo"
           "</code>). Every stage ran as a queued job; the job specs are listed at the end.</p>"]

    out.append("<h2>What was run</h2>")
    out.append(_table(["", "value"], _what_was_run(r)))
    out.append("<h3>Stages</h3>")
    out.append(_table(["stage", "job", "job ran (s)", "this run waited (s)", "reused"], _stage_rows(r)))
    if r.get("jobs_seconds") is not None:
        out.append(f"<p class=\"note\">All jobs: {_e(r['jobs_seconds'])} s wall time, including starting the "
                   "servers and the worker.</p>")

    out.append("<h2>SAE sweep</h2>")
    rows = [[_member_name(m), m["sae_id"], m.get("l0"), m.get("fvu"), m.get("explained_variance"), m.get("n_dead"),
             m.get("n_dense"), "chosen" if m["chosen"] else ""] for m in r["members"]]
    out.append(_table(["member", "sae_id", "L0", "normalised MSE", "explained variance", "dead", "dense (>1e-2)",
                       ""], rows, marked=[m["chosen"] for m in r["members"]]))
    out.append("<p class=\"note\">All metrics on the held-out rows (10% of the recording, never trained on). "
               "Normalised MSE = Σ‖x − x̂‖² / Σ‖x − x̄‖².</p>")
    out.append("<div class=\"charts\">" + svg_sweep(r["members"]) + svg_curves(r["members"]) +
               svg_histogram(r["histogram"]) + "</div>")
    if r["histogram"]:
        h = r["histogram"]
        out.append(f"<p class=\"note\">Frequency histogram of the chosen SAE over {_e(h['n_tokens'])} held-out "
                   f"tokens ({_e(h['source'])}); the dashed line is the dense cut-off 1e-2.</p>")

    out.append("<h2>Intervention experiments</h2><p class=\"note\">Each arm edits the same images; compare the "
               "arms, not the absolute numbers: a probe that is nearly certain (probability ≈ 1) moves little in "
               "probability even when its logit moves.</p>")
    for exp in r["experiments"].values():
        out.append(f"<h3>{_e(exp['title'])}</h3>")
        out.append(_table(PLAN_HEADER, _plan_rows(exp)))
        header, rows = _experiment_rows(exp)
        out.append(_table(header, rows))
    out.append("<p class=\"note\">Drift: what the edit did to the latents it did not aim at, averaged over images: "
               "the edited residual is encoded again and compared with the codes before the edit over the edited "
               "tokens and the non-edited latents (mean |Δf|, ‖Δf‖/‖f‖, and how many of them switched on or off per "
               "token). A larger effect than both baselines, at a comparable drift, is evidence that the latent "
               "carries the concept. The flip rate is the share of images whose predicted class changed.</p>")

    out.append("<h2>Feature gallery</h2><p class=\"note\">Top exemplars of each latent (bundled-lfw views), its "
               "activation on every patch painted over the view (the colour scale is fixed per latent).</p>")
    for card in r["gallery"]:
        role = f" <span class=\"role\">{_e(card['role'])}</span>" if card["role"] else ""
        out.append(f"<div class=\"card\"><b>latent {_e(card['latent'])}</b>{role}<br><span class=\"note\">"
                   f"token frequency {_e(card['frequency'])}, mean when firing {_e(card['mean_value'])}, "
                   f"views where it fires {_e(card['view_frequency'])}, max {_e(card['max_patch'])}</span>"
                   "<div class=\"tiles\">")
        for e in card["exemplars"]:
            img = (f'<img alt="{_e(e["image_id"])}" src="data:image/png;base64,{e["png"]}">' if e["png"] else
                   "<div>(no tile)</div>")
            out.append(f"<figure>{img}<figcaption>{_e(e['image_id'])}<br>{_e(e['value'])}</figcaption></figure>")
        out.append("</div></div>")

    out.append("<h2>Job specs</h2>")
    for s in r["stages"]:
        out.append(f"<details><summary>{_e(s['title'])} ({_e(s['job_type'])})</summary><pre>"
                   f"{_e(json.dumps(s['spec'], indent=1, sort_keys=True))}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_markdown(r: dict[str, Any]) -> str:
    """The report's tables as Markdown (no images)."""
    lines = [f"# SAE-V demo report: {r['backbone']} block {r['layer']} ({r['size']['name']} size)", "",
             f"Reproduce: `{r['command']}`", "", "## What was run", ""]
    lines += _md_table(["", "value"], _what_was_run(r))
    lines += ["", "## Stages", ""]
    lines += _md_table(["stage", "job", "job ran (s)", "this run waited (s)", "reused"], _stage_rows(r))
    lines += ["", "## SAE sweep (held-out)", ""]
    lines += _md_table(["member", "sae_id", "L0", "normalised MSE", "dead", ""],
                       [[_member_name(m), m["sae_id"], m.get("l0"), m.get("fvu"), m.get("n_dead"),
                         "**chosen**" if m["chosen"] else ""] for m in r["members"]])
    for exp in r["experiments"].values():
        lines += ["", f"## {exp['title']}", ""]
        lines += _md_table(PLAN_HEADER, _plan_rows(exp))
        lines.append("")
        header, rows = _experiment_rows(exp)
        lines += _md_table(header, rows)
    lines += ["", "## Feature gallery", "", "(images in report.html)", ""]
    lines += _md_table(["latent", "role", "token frequency", "exemplars"],
                       [[c["latent"], c["role"], c["frequency"], ", ".join(e["image_id"] for e in c["exemplars"])]
                        for c in r["gallery"]])
    return "\n".join(lines) + "\n"


__all__ = ["build_report", "render_html", "render_markdown", "svg_curves", "svg_histogram", "svg_sweep"]
