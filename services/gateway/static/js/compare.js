// Compare: the same image and patches under two SAEs (e.g. on two backbones), strongest latents side by side.

import { clear, el, errorBox } from "./dom.js";
import { heatmapOf, imageLatents, latentList } from "./explorer.js";
import { imageChooser, patchCanvas } from "./picker.js";
import { gridOf, saeInfo, state } from "./state.js";

export async function renderCompare(root, query) {
  clear(root, el("h1", {}, "Compare two SAEs"));
  if (state.saes.length < 1) {
    root.append(el("p", { class: "muted" }, "No SAE is served yet."));
    return;
  }
  const ids = state.saes.map((s) => s.sae_id);
  let a = ids.includes(query.get("a")) ? query.get("a") : state.saeId;
  let b = ids.includes(query.get("b")) ? query.get("b") : ids.find((id) => id !== a) || a;
  const picker = (value, name) => {
    const select = el(
      "select",
      { name, "aria-label": `SAE ${name.toUpperCase()}` },
      state.saes.map((s) =>
        el(
          "option",
          { value: s.sae_id, selected: s.sae_id === value },
          `${s.sae_id} (${s.backbone_id}, layer ${s.layer})`,
        ),
      ),
    );
    select.addEventListener("change", () => {
      if (name === "a") a = select.value;
      else b = select.value;
      history.replaceState(null, "", `#/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
      refresh();
    });
    return select;
  };
  const columns = { a: el("div", { class: "col", id: "compare-a" }), b: el("div", { class: "col", id: "compare-b" }) };
  const left = el("div", { class: "col left" });
  root.append(
    el(
      "div",
      { class: "row" },
      left,
      el(
        "div",
        { class: "pair", style: "flex:1;min-width:480px" },
        el("div", { class: "col" }, el("label", {}, "SAE A ", picker(a, "a")), columns.a),
        el("div", { class: "col" }, el("label", {}, "SAE B ", picker(b, "b")), columns.b),
      ),
    ),
  );

  // The selection is drawn on SAE A's grid and mapped onto B's when B's backbone has another grid.
  const grid = gridOf(a);
  let canvas = patchCanvas(a, grid, () => refresh(), { label: "image patches" });
  left.append(
    imageChooser(a, () => {
      const fresh = patchCanvas(a, grid, () => refresh(), { label: "image patches" });
      canvas.node.replaceWith(fresh.node);
      canvas = fresh;
      refresh();
    }),
    canvas.node,
    el("p", { class: "legend" }, "Click a latent of SAE A to see where it fires."),
  );

  let seq = 0;
  async function refresh() {
    const mine = ++seq;
    for (const [side, saeId] of [
      ["a", a],
      ["b", b],
    ]) {
      const info = saeInfo(saeId);
      clear(
        columns[side],
        el("p", { class: "muted" }, info ? `${info.backbone_id}, layer ${info.layer}, ${info.d_sae} latents` : ""),
      );
      if (!state.image) {
        columns[side].append(el("p", { class: "muted" }, "Choose or upload an image."));
        continue;
      }
      columns[side].append(el("p", { class: "loading" }, "Encoding…"));
    }
    if (!state.image) return;
    await Promise.all(
      [
        ["a", a],
        ["b", b],
      ].map(async ([side, saeId]) => {
        try {
          const answer = await imageLatents(saeId);
          if (mine !== seq) return;
          columns[side].querySelector(".loading")?.remove();
          columns[side].append(
            latentList(
              saeId,
              answer.latents || [],
              side === "a"
                ? {
                    onChoose: (latent, item) => {
                      const values = heatmapOf(item);
                      canvas.setOverlay(values, Math.max(...(values || [1])));
                    },
                  }
                : {},
            ),
          );
        } catch (err) {
          if (mine === seq) {
            columns[side].querySelector(".loading")?.remove();
            columns[side].append(errorBox(err));
          }
        }
      }),
    );
  }
  await refresh();
}
