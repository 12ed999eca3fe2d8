// What the pages share while the tab is open: the SAEs and backbones served, the chosen image and patches.

import { api, enc, fetchBytes } from "./api.js";

export const state = {
  saes: [], // SAEInfo messages
  backbones: {}, // backbone_id -> BackboneInfo
  saeId: "", // the SAE the pages use
  image: null, // {bytes: Uint8Array, name, url (blob:), index (dataset image index or null)}
  selection: new Set(), // selected patch indices on the grid of `selectionGrid`; empty = all patches
  selectionGrid: null, // [rows, cols] the selection refers to
  edits: [], // playground: [{latent, value (x max), on}]
  headId: "", // playground: the task head
};

export async function loadCatalog() {
  const [saes, backbones] = await Promise.all([api("/v1/saes"), api("/v1/backbones").catch(() => ({ backbones: [] }))]);
  state.saes = saes.saes || [];
  state.backbones = Object.fromEntries((backbones.backbones || []).map((b) => [b.backbone_id, b]));
  const fromUrl = new URLSearchParams(location.search).get("sae");
  if (fromUrl && state.saes.some((s) => s.sae_id === fromUrl)) state.saeId = fromUrl;
  if (!state.saeId && state.saes.length) state.saeId = (state.saes.find((s) => s.analyzed) || state.saes[0]).sae_id;
}

export function saeInfo(saeId = state.saeId) {
  return state.saes.find((s) => s.sae_id === saeId) || null;
}

// [rows, cols] of the patch grid of an SAE's backbone (16 x 16 when the backbone is not listed).
export function gridOf(saeId = state.saeId) {
  const info = saeInfo(saeId);
  const layout = info && state.backbones[info.backbone_id] ? state.backbones[info.backbone_id].layout : null;
  return layout ? [layout.grid_height, layout.grid_width] : [16, 16];
}

export function setImage(bytes, name, index = null) {
  if (state.image && state.image.url) URL.revokeObjectURL(state.image.url);
  state.image = { bytes, name, index, url: URL.createObjectURL(new Blob([bytes])) };
  state.selection = new Set();
}

export async function setDatasetImage(saeId, entry) {
  const bytes = await fetchBytes(`/v1/saes/${enc(saeId)}/images/${Number(entry.image_index)}.png`);
  setImage(bytes, entry.image_id, Number(entry.image_index));
}

// The selection as patch indices on a grid of [rows, cols] (patch centres mapped onto the selection's grid).
export function selectionOn(rows, cols) {
  if (!state.selection.size || !state.selectionGrid) return [];
  const [sr, sc] = state.selectionGrid;
  if (sr === rows && sc === cols) return [...state.selection].sort((a, b) => a - b);
  const out = [];
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const i = Math.floor(((r + 0.5) / rows) * sr) * sc + Math.floor(((c + 0.5) / cols) * sc);
      if (state.selection.has(i)) out.push(r * cols + c);
    }
  }
  return out;
}

// PatchSelection message for a grid (undefined: all patches).
export function patchSelection(rows, cols) {
  const values = selectionOn(rows, cols);
  return values.length ? { indices: { values } } : undefined;
}
