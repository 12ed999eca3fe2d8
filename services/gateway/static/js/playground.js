// Intervention playground: choose latents, slide their values (a multiple of each latent's maximum, from
// "suppress" to "amplify"), apply them to the selected patches and compare the task head's output before and after,
// side by side, with the off-target drift of the edit.

import { api, decodeTensor, enc, softmax, toBase64 } from "./api.js";
import { classColour, clear, debounce, el, errorBox, fmt, pct } from "./dom.js";
import { imageLatents } from "./explorer.js";
import { imageChooser, patchCanvas } from "./picker.js";
import { gridOf, patchSelection, saeInfo, selectionOn, state } from "./state.js";

const SLIDER = { min: -2, max: 4, step: 0.25 };

function describeValue(v) {
  if (v === 0) return "suppress (0)";
  if (v < 0) return `reverse (${v}× max)`;
  if (v < 1) return `dampen (${v}× max)`;
  if (v === 1) return "1× max";
  return `amplify (${v}× max)`;
}

export async function renderPlayground(root, query) {
  const saeId = state.saeId;
  const info = saeInfo(saeId);
  clear(root, el("h1", {}, "Intervention playground"));
  if (!info) {
    root.append(el("p", { class: "muted" }, "No SAE is served yet."));
    return;
  }
  const fromLink = Number(query.get("latent"));
  if (
    query.get("latent") !== null &&
    Number.isInteger(fromLink) &&
    fromLink >= 0 &&
    !state.edits.some((e) => e.latent === fromLink)
  ) {
    state.edits.push({ latent: fromLink, value: 0, on: true });
  }
  const grid = gridOf(saeId);
  // The task-head service lists the heads it has loaded; another head id (e.g. a probe just trained) can be typed
  // in: it loads on first use and is listed from then on.
  let heads = [];
  const listHeads = async () => {
    heads = (await api("/v1/heads", { query: { backbone_id: info.backbone_id } })).heads || [];
  };
  try {
    await listHeads();
  } catch (err) {
    root.append(errorBox(err));
  }
  if (!state.headId) state.headId = heads.length ? heads[0].head_id : "";

  const OTHER = "\u0000other";
  const headSelect = el("select", { id: "head-select", "aria-label": "task head" });
  const otherHead = el("input", {
    type: "text",
    id: "head-id",
    placeholder: "head id",
    "aria-label": "head id",
    hidden: true,
  });
  function fillHeads() {
    const known = heads.some((h) => h.head_id === state.headId);
    clear(
      headSelect,
      heads.map((h) =>
        el(
          "option",
          { value: h.head_id, selected: h.head_id === state.headId },
          `${h.head_id} (${h.kind === "HEAD_KIND_SEGMENTER" ? "segmenter" : "classifier"}, ${h.n_classes} classes)`,
        ),
      ),
      el("option", { value: OTHER, selected: !known }, "another head id…"),
    );
    otherHead.hidden = known;
    if (!known) otherHead.value = state.headId;
  }
  fillHeads();
  headSelect.addEventListener("change", () => {
    otherHead.hidden = headSelect.value !== OTHER;
    state.headId = headSelect.value === OTHER ? otherHead.value.trim() : headSelect.value;
    apply();
  });
  otherHead.addEventListener("change", () => {
    state.headId = otherHead.value.trim();
    apply();
  });

  const editsBox = el("div", { class: "col", id: "edits" });
  const addInput = el("input", {
    type: "number",
    min: 0,
    max: Number(info.d_sae) - 1,
    step: 1,
    id: "add-latent",
    placeholder: "latent #",
  });
  const addButton = el(
    "button",
    {
      type: "button",
      class: "secondary",
      onclick: () => {
        const latent = Number(addInput.value);
        if (addInput.value === "" || !Number.isInteger(latent) || latent < 0 || latent >= Number(info.d_sae)) return;
        if (!state.edits.some((e) => e.latent === latent)) state.edits.push({ latent, value: 0, on: true });
        addInput.value = "";
        drawEdits();
        apply();
      },
    },
    "Add",
  );
  const strongest = el(
    "button",
    {
      type: "button",
      class: "secondary",
      id: "add-strongest",
      onclick: async () => {
        if (!state.image) return;
        strongest.disabled = true;
        try {
          const answer = await imageLatents(saeId, 3);
          for (const item of answer.latents || []) {
            const latent = Number(item.latent);
            if (!state.edits.some((e) => e.latent === latent)) state.edits.push({ latent, value: 0, on: true });
          }
          drawEdits();
          apply();
        } catch (err) {
          editsBox.append(errorBox(err));
        }
        strongest.disabled = false;
      },
    },
    "Add the 3 strongest latents of the selection",
  );

  const results = el("div", { class: "col", id: "intervention-results" });
  const drift = el("div", { class: "panel", id: "drift" });
  const left = el("div", { class: "col left" });
  let canvas = patchCanvas(saeId, grid, () => apply(), { label: "patches to edit" });
  left.append(
    imageChooser(saeId, () => {
      const fresh = patchCanvas(saeId, grid, () => apply(), { label: "patches to edit" });
      canvas.node.replaceWith(fresh.node);
      canvas = fresh;
      apply();
    }),
    canvas.node,
  );

  root.append(
    el(
      "div",
      { class: "row" },
      left,
      el(
        "div",
        { class: "col", style: "flex:1;min-width:380px" },
        el(
          "div",
          { class: "panel col" },
          el("label", {}, "Task head ", headSelect, " ", otherHead),
          el("h3", {}, "Latent edits (applied to the selected patches)"),
          editsBox,
          el("div", { class: "row" }, addInput, addButton, strongest),
        ),
        el("h2", {}, "Before and after"),
        results,
        el("h3", {}, "Off-target drift"),
        drift,
      ),
    ),
  );

  function drawEdits() {
    clear(editsBox);
    if (!state.edits.length)
      editsBox.append(
        el("p", { class: "muted" }, "No latent chosen: add one by number, or the strongest of the selection."),
      );
    for (const edit of state.edits) {
      const label = el("span", { class: "value-label" }, describeValue(edit.value));
      const slider = el("input", {
        type: "range",
        ...SLIDER,
        value: edit.value,
        "aria-label": `value of latent ${edit.latent}`,
        dataset: { latent: String(edit.latent) },
      });
      slider.addEventListener("input", () => {
        edit.value = Number(slider.value);
        label.textContent = describeValue(edit.value);
        applySoon();
      });
      const on = el("input", { type: "checkbox", checked: edit.on, "aria-label": `apply latent ${edit.latent}` });
      on.addEventListener("change", () => {
        edit.on = on.checked;
        apply();
      });
      editsBox.append(
        el(
          "div",
          { class: "edit-row" },
          el("span", {}, on, " ", el("a", { href: `#/latent/${enc(saeId)}/${edit.latent}` }, `#${edit.latent}`)),
          slider,
          label,
          el(
            "button",
            {
              type: "button",
              class: "secondary",
              "aria-label": `remove latent ${edit.latent}`,
              onclick: () => {
                state.edits = state.edits.filter((e) => e !== edit);
                drawEdits();
                apply();
              },
            },
            "✕",
          ),
        ),
      );
    }
  }

  let seq = 0;
  async function apply() {
    const known = heads.find((h) => h.head_id === state.headId);
    const head = known || (state.headId ? { head_id: state.headId, class_names: [] } : null);
    if (!state.image || !head) {
      clear(
        results,
        el(
          "p",
          { class: "muted" },
          !state.image ? "Choose or upload an image." : "Choose a task head for this backbone.",
        ),
      );
      clear(drift);
      return;
    }
    const mine = ++seq;
    const [rows, cols] = grid;
    const patches = patchSelection(rows, cols);
    const edits = state.edits
      .filter((e) => e.on)
      .map((e) => ({
        latent: e.latent,
        op: "EDIT_OP_SET",
        value: e.value,
        relative_to_max: true,
        patches,
      }));
    results.classList.add("busy");
    results.setAttribute("aria-busy", "true");
    try {
      const answer = await api("/v1/interventions", {
        method: "POST",
        body: {
          sae_id: saeId,
          head_id: head.head_id,
          images: [{ encoded: toBase64(state.image.bytes), id: state.image.name }],
          edits,
        },
      });
      if (mine !== seq) return;
      const result = (answer.results || [])[0];
      showResult(head, result, answer.layout);
      if (!known)
        listHeads()
          .then(fillHeads)
          .catch(() => {}); // now loaded: its kind and class names
      if (edits.length) {
        showDrift(driftOf(result.drift || {}));
      } else {
        clear(drift, el("p", { class: "muted" }, "No edit: nothing drifts."));
      }
    } catch (err) {
      if (mine === seq) clear(results, errorBox(err));
    } finally {
      if (mine === seq) {
        results.classList.remove("busy");
        results.setAttribute("aria-busy", "false");
      }
    }
  }
  const applySoon = debounce(apply, 250);

  function showResult(head, result, layout) {
    const names = head.class_names || [];
    const name = (c) => (names[c] !== undefined && names[c] !== "" ? names[c] : `class ${c}`);
    const before = decodeTensor(result.before.logits);
    const after = decodeTensor(result.after.logits);
    if (before.shape.length === 3) {
      // a segmenter: [classes, height, width]
      clear(results, segmentation(before, after, result.change_rate));
      return;
    }
    const pb = softmax(Array.from(before.data));
    const pa = softmax(Array.from(after.data));
    const argmax = (p) => p.indexOf(Math.max(...p));
    const shown = [...new Set([...order(pb).slice(0, 6), ...order(pa).slice(0, 6)])];
    const table = el(
      "div",
      { class: "probs", id: "class-probs" },
      el("strong", {}, "class"),
      el("strong", {}, "before"),
      el("span"),
      el("strong", {}, "after"),
      el("span"),
    );
    for (const c of shown) {
      table.append(
        el("span", { class: "class-name" }, name(c)),
        el("span", {}, el("span", { class: "bar b", style: `width:${(100 * pb[c]).toFixed(1)}%` })),
        el("span", { class: "num" }, pct(pb[c])),
        el("span", {}, el("span", { class: "bar a", style: `width:${(100 * pa[c]).toFixed(1)}%` })),
        el("span", { class: "num after-prob" }, pct(pa[c])),
      );
    }
    const cb = argmax(pb);
    const ca = argmax(pa);
    clear(
      results,
      el(
        "p",
        { id: "prediction" },
        "Prediction: ",
        el("strong", { class: "before-label" }, `${name(cb)} (${pct(pb[cb])})`),
        " → ",
        el("strong", { class: "after-label" }, `${name(ca)} (${pct(pa[ca])})`),
        cb !== ca ? el("span", { class: "flag" }, "flipped") : null,
      ),
      table,
    );
  }

  function segmentation(before, after, changeRate) {
    const [C, H, W] = before.shape;
    const perPatch = (t) => {
      const probs = [];
      const labels = [];
      for (let i = 0; i < H * W; i++) {
        const p = softmax(Array.from({ length: C }, (_, c) => t.data[c * H * W + i]));
        probs.push(p);
        labels.push(p.indexOf(Math.max(...p)));
      }
      return { probs, labels };
    };
    const b = perPatch(before);
    const a = perPatch(after);
    const view = (title, values, opts) => {
      const c = patchCanvas(saeId, [H, W], () => {}, { size: 240, selectable: false, label: title });
      c.ready.then(() => c.setOverlay(values, opts.scale, opts));
      return el("figure", {}, c.node, el("figcaption", {}, title));
    };
    let fig;
    if (C === 2) {
      // saliency-style: the probability of class 1
      const pB = b.probs.map((p) => p[1]);
      const pA = a.probs.map((p) => p[1]);
      const diff = pA.map((v, i) => Math.abs(v - pB[i]));
      fig = [
        view("before: P(class 1)", pB, { scale: 1 }),
        view("after: P(class 1)", pA, { scale: 1 }),
        view("|after − before|", diff, { scale: Math.max(1e-6, ...diff), alpha: 0.8 }),
      ];
    } else {
      const colour = (labels) => labels.map((l) => l + 1);
      const labelColour = (t) => classColour(Math.round(t * (C + 1)) - 1);
      const changed = a.labels.map((l, i) => (l !== b.labels[i] ? 1 : 0));
      fig = [
        view("before: labels", colour(b.labels), { scale: C + 1, colour: labelColour, alpha: 0.55 }),
        view("after: labels", colour(a.labels), { scale: C + 1, colour: labelColour, alpha: 0.55 }),
        view("changed patches", changed, { scale: 1, colour: () => [220, 30, 60], alpha: 0.8 }),
      ];
    }
    const meanB = b.probs.reduce((s, p) => s + (C === 2 ? p[1] : 0), 0) / (H * W);
    const meanA = a.probs.reduce((s, p) => s + (C === 2 ? p[1] : 0), 0) / (H * W);
    return el(
      "div",
      { class: "col" },
      el(
        "p",
        { id: "prediction" },
        `Patches whose label changed: ${pct(changeRate || 0)}`,
        C === 2 ? ` · mean P(class 1): ${pct(meanB)} → ${pct(meanA)}` : "",
      ),
      el("div", { class: "side" }, fig),
    );
  }

  drawEdits();
  await apply();
}

function order(p) {
  return p
    .map((v, i) => [v, i])
    .sort((x, y) => y[0] - x[0])
    .map(([, i]) => i);
}

// The off-target drift the gateway reports with each result (proto JSON: zeros are omitted, int64 and non-finite
// floats are strings): the edited residual re-encoded at the edited tokens, compared with the intended codes.
function driftOf(d) {
  const num = (v) => (v === undefined ? 0 : Number(v));
  return {
    tokens: num(d.n_tokens),
    meanAbs: num(d.mean_abs),
    maxAbs: num(d.max_abs),
    relative: num(d.relative),
    flipsPerToken: num(d.flips_per_token),
    targetError: num(d.target_error),
  };
}

function showDrift(d) {
  const box = document.getElementById("drift");
  if (!box) return;
  clear(
    box,
    el(
      "dl",
      { class: "stats" },
      el("dt", {}, "Edited tokens"),
      el("dd", {}, String(d.tokens)),
      el("dt", {}, "Mean |Δ| of the other latents"),
      el("dd", { id: "drift-mean" }, fmt(d.meanAbs, 5)),
      el("dt", {}, "Max |Δ|"),
      el("dd", {}, fmt(d.maxAbs)),
      el("dt", {}, "‖Δ‖ / ‖f‖"),
      el("dd", { id: "drift-relative" }, fmt(d.relative, 4)),
      el("dt", {}, "Latents switching on/off per token"),
      el("dd", {}, fmt(d.flipsPerToken, 2)),
      el("dt", {}, "|Δ| of the edited latents themselves"),
      el("dd", {}, fmt(d.targetError, 4)),
    ),
    el(
      "p",
      { class: "legend" },
      "The edited residual re-encoded by the SAE, compared with the codes it was built " +
        "from, over the edited tokens and the latents not edited (computed by the SAE service, as in experiments). " +
        "Zero means the edit touched only its own latents.",
    ),
  );
}
