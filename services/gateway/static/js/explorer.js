// Image explorer: the strongest latents of the selected patches of an image, with thumbnails of their exemplars.

import { api, decodeTensor, enc, toBase64 } from "./api.js";
import { clear, el, errorBox, fmt } from "./dom.js";
import { tileUrl } from "./latents.js";
import { imageChooser, patchCanvas } from "./picker.js";
import { gridOf, patchSelection, saeInfo, state } from "./state.js";

export const TOP_K = 12;

// GetImageLatents for the current image and selection on one SAE.
export async function imageLatents(saeId, k = TOP_K) {
  const [rows, cols] = gridOf(saeId);
  return api("/v1/features/image-latents", {
    method: "POST",
    body: {
      sae_id: saeId,
      image: { encoded: toBase64(state.image.bytes), id: state.image.name },
      k,
      patches: patchSelection(rows, cols),
      include_heatmaps: true,
    },
  });
}

// A list of latents (ImageLatent messages) with exemplar thumbnails; onChoose(latent, heatmap) on click.
export function latentList(saeId, latents, { onChoose, extra } = {}) {
  const info = saeInfo(saeId);
  const list = el("ol", { class: "latent-list" });
  for (const item of latents) {
    const latent = Number(item.latent);
    const stats = item.stats || {};
    const li = el(
      "li",
      { dataset: { latent: String(latent) }, tabindex: 0 },
      el("a", { class: "name", href: `#/latent/${enc(saeId)}/${latent}` }, `#${latent}`),
      el("span", { class: "value", title: "value on the selected patches (max)" }, fmt(item.value)),
      el(
        "span",
        { class: "muted freq", title: "frequency" },
        stats.frequency !== undefined ? `f ${fmt(stats.frequency, 4)}` : "",
      ),
      info && info.analyzed
        ? el(
            "span",
            { class: "thumbs" },
            [0, 1, 2].map((rank) =>
              el("img", {
                src: tileUrl(saeId, latent, rank),
                alt: `exemplar ${rank + 1} of latent ${latent}`,
                loading: "lazy",
                onerror: (event) => event.target.remove(),
              }),
            ),
          )
        : null,
      extra ? extra(latent, item) : null,
    );
    if (onChoose) {
      const choose = () => {
        list.querySelectorAll("li").forEach((x) => x.classList.remove("on"));
        li.classList.add("on");
        onChoose(latent, item);
      };
      li.addEventListener("click", (event) => {
        if (!event.target.closest("a,button,input")) choose();
      });
      li.addEventListener("keydown", (event) => {
        if (event.key === "Enter") choose();
      });
    }
    list.append(li);
  }
  if (!latents.length) list.append(el("li", { class: "muted" }, "No latent fires on these patches."));
  return list;
}

export function heatmapOf(item) {
  const t = decodeTensor(item.heatmap);
  return t ? t.data : null;
}

export async function renderExplorer(root) {
  const saeId = state.saeId;
  clear(root, el("h1", {}, "Image explorer"));
  if (!saeInfo(saeId)) {
    root.append(el("p", { class: "muted" }, "No SAE is served yet."));
    return;
  }
  const grid = gridOf(saeId);
  const results = el("div", { class: "col", id: "explorer-latents" });
  let canvas = null;
  const left = el("div", { class: "col left" });
  root.append(
    el(
      "div",
      { class: "row" },
      left,
      el(
        "div",
        { class: "col", style: "flex:1;min-width:320px" },
        el("h2", {}, "Strongest latents of the selection"),
        results,
      ),
    ),
  );

  let seq = 0;
  async function refresh() {
    if (!state.image) {
      clear(results, el("p", { class: "muted" }, "Choose or upload an image."));
      return;
    }
    const mine = ++seq;
    clear(results, el("p", { class: "loading" }, "Encoding…"));
    try {
      const answer = await imageLatents(saeId);
      if (mine !== seq) return;
      const latents = answer.latents || [];
      clear(
        results,
        latentList(saeId, latents, {
          onChoose: (latent, item) => {
            const values = heatmapOf(item);
            canvas.setOverlay(values, Math.max(...(values || [1])));
          },
        }),
        el("p", { class: "legend" }, "Click a latent to see where it fires; links open its feature page."),
      );
      canvas.setOverlay(null);
    } catch (err) {
      if (mine === seq) clear(results, errorBox(err));
    }
  }
  canvas = patchCanvas(saeId, grid, refresh, { label: "image patches" });
  left.append(
    imageChooser(saeId, () => {
      const fresh = patchCanvas(saeId, grid, refresh, { label: "image patches" });
      canvas.node.replaceWith(fresh.node);
      canvas = fresh;
      refresh();
    }),
    canvas.node,
  );
  await refresh();
}
