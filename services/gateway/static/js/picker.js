// The image and patch selection the explorer, the playground and the compare page share: pick an analysed dataset
// image or upload one, then click patches (toggle) or drag a box (replace; shift adds) on the model's view.

import { api, enc, imageUrl } from "./api.js";
import { clear, drawGrid, drawModelView, el, errorBox, loadImage, resizeMode } from "./dom.js";
import { saeInfo, setDatasetImage, setImage, state } from "./state.js";

const MAX_UPLOAD = 16 << 20;

// An image chooser; onPick() runs after state.image changes.
export function imageChooser(saeId, onPick) {
  const strip = el("div", { class: "strip", id: "dataset-images", role: "list" });
  const described = (image) =>
    `Image: ${image.name} ` + (image.index === null ? "(uploaded)" : `(dataset image ${image.index})`);
  const note = el(
    "p",
    { class: "muted upload-name", id: "image-name" },
    state.image ? described(state.image) : "No image chosen.",
  );
  const file = el("input", {
    type: "file",
    accept: "image/png,image/jpeg,image/webp,image/gif,image/bmp",
    id: "upload",
  });
  const box = el(
    "div",
    { class: "panel col" },
    el("h3", {}, "Image"),
    strip,
    el("label", {}, "Upload an image: ", file),
    note,
  );
  const info = saeInfo(saeId);
  file.addEventListener("change", async () => {
    const f = file.files && file.files[0];
    if (!f) return;
    if (f.size > MAX_UPLOAD) {
      clear(note, errorBox(new Error(`${f.name} is larger than ${MAX_UPLOAD >> 20} MiB`)));
      return;
    }
    setImage(new Uint8Array(await f.arrayBuffer()), f.name);
    clear(note, described(state.image));
    strip.querySelectorAll("button").forEach((b) => b.classList.remove("on"));
    onPick();
  });
  if (info && info.analyzed) {
    api(`/v1/saes/${enc(saeId)}/images`, { query: { limit: 48 } })
      .then((answer) => {
        for (const entry of answer.images || []) {
          const button = el(
            "button",
            {
              type: "button",
              role: "listitem",
              title: entry.image_id,
              class: state.image && state.image.index === Number(entry.image_index) ? "on" : "",
              dataset: { index: String(entry.image_index) },
            },
            el("img", {
              src: imageUrl(`/v1/saes/${enc(saeId)}/images/${Number(entry.image_index)}.png`),
              alt: entry.image_id,
              loading: "lazy",
            }),
          );
          button.addEventListener("click", async () => {
            strip.querySelectorAll("button").forEach((b) => b.classList.remove("on"));
            button.classList.add("on");
            try {
              await setDatasetImage(saeId, entry);
              clear(note, described(state.image));
              onPick();
            } catch (err) {
              clear(note, errorBox(err));
            }
          });
          strip.append(button);
        }
        if (!strip.children.length) strip.append(el("span", { class: "muted" }, "The analysis lists no images."));
      })
      .catch((err) => strip.append(errorBox(err)));
  } else {
    strip.append(el("span", { class: "muted" }, "This SAE is not analysed: upload an image."));
  }
  return box;
}

// A canvas showing the image as the backbone sees it, with the patch grid, an optional heatmap and the selection.
// Returns {node, setOverlay(values|null, scale), redraw()}; onSelect() runs after the selection changes.
export function patchCanvas(saeId, grid, onSelect, { size = 336, selectable = true, label = "patches" } = {}) {
  const [rows, cols] = grid;
  const canvas = el("canvas", {
    width: size,
    height: size,
    class: selectable ? "patch-canvas selectable" : "patch-canvas",
    role: "img",
    "aria-label": label,
    style: `width:${size}px;height:${size}px`,
  });
  const ctx = canvas.getContext("2d");
  const info = saeInfo(saeId);
  const mode = resizeMode(info ? info.backbone_id : "");
  let image = null;
  let overlay = null;
  let drag = null;

  if (selectable && !state.selection.size) state.selectionGrid = [rows, cols];
  const sameGrid = () => state.selectionGrid && state.selectionGrid[0] === rows && state.selectionGrid[1] === cols;

  function redraw() {
    if (!image) {
      ctx.fillStyle = "#e4e7ea";
      ctx.fillRect(0, 0, size, size);
      return;
    }
    drawModelView(ctx, image, mode);
    if (overlay)
      drawGrid(ctx, overlay.values, rows, cols, { scale: overlay.scale, colour: overlay.colour, alpha: overlay.alpha });
    const cw = size / cols;
    const ch = size / rows;
    ctx.strokeStyle = "rgba(255,255,255,0.18)";
    ctx.lineWidth = 1;
    for (let r = 1; r < rows; r++) {
      ctx.beginPath();
      ctx.moveTo(0, r * ch);
      ctx.lineTo(size, r * ch);
      ctx.stroke();
    }
    for (let c = 1; c < cols; c++) {
      ctx.beginPath();
      ctx.moveTo(c * cw, 0);
      ctx.lineTo(c * cw, size);
      ctx.stroke();
    }
    if (sameGrid()) {
      ctx.strokeStyle = "#00e5ff";
      ctx.lineWidth = 2;
      for (const i of state.selection)
        ctx.strokeRect((i % cols) * cw + 1, Math.floor(i / cols) * ch + 1, cw - 2, ch - 2);
    }
    if (drag && drag.moved) {
      ctx.strokeStyle = "#fff";
      ctx.setLineDash([4, 3]);
      const [r0, c0, r1, c1] = box(drag);
      ctx.strokeRect(c0 * cw, r0 * ch, (c1 - c0 + 1) * cw, (r1 - r0 + 1) * ch);
      ctx.setLineDash([]);
    }
  }

  function patchAt(event) {
    const rect = canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * cols;
    const y = ((event.clientY - rect.top) / rect.height) * rows;
    return [Math.max(0, Math.min(rows - 1, Math.floor(y))), Math.max(0, Math.min(cols - 1, Math.floor(x)))];
  }
  const box = (d) => [
    Math.min(d.start[0], d.end[0]),
    Math.min(d.start[1], d.end[1]),
    Math.max(d.start[0], d.end[0]),
    Math.max(d.start[1], d.end[1]),
  ];

  if (selectable) {
    canvas.addEventListener("pointerdown", (event) => {
      if (!image) return;
      canvas.setPointerCapture(event.pointerId);
      drag = { start: patchAt(event), end: patchAt(event), moved: false, add: event.shiftKey };
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!drag) return;
      const p = patchAt(event);
      if (p[0] !== drag.end[0] || p[1] !== drag.end[1]) {
        drag.end = p;
        drag.moved = true;
        redraw();
      }
    });
    canvas.addEventListener("pointerup", () => {
      if (!drag) return;
      if (!sameGrid()) {
        state.selection = new Set();
        state.selectionGrid = [rows, cols];
      }
      if (drag.moved) {
        const [r0, c0, r1, c1] = box(drag);
        if (!drag.add) state.selection = new Set();
        for (let r = r0; r <= r1; r++) for (let c = c0; c <= c1; c++) state.selection.add(r * cols + c);
      } else {
        const i = drag.start[0] * cols + drag.start[1];
        if (state.selection.has(i)) state.selection.delete(i);
        else state.selection.add(i);
      }
      drag = null;
      redraw();
      changed();
    });
  }

  const summary = el("span", { class: "muted selection-summary" });
  const changed = () => {
    update();
    onSelect();
  };
  const update = () => {
    summary.textContent = state.selection.size
      ? `${state.selection.size} patch${state.selection.size === 1 ? "" : "es"} selected`
      : "All patches (click or drag to select)";
  };
  const clearButton = el(
    "button",
    {
      type: "button",
      class: "secondary",
      onclick: () => {
        state.selection = new Set();
        redraw();
        changed();
      },
    },
    "Select all patches",
  );
  const node = el(
    "div",
    { class: "col" },
    el("div", { class: "canvas-wrap" }, canvas),
    selectable ? el("div", { class: "row" }, summary, clearButton) : null,
  );

  async function load() {
    image = null;
    if (state.image) {
      try {
        image = await loadImage(state.image.url);
      } catch (err) {
        node.append(errorBox(err));
      }
    }
    redraw();
  }
  update();
  return {
    node,
    canvas,
    ready: load(),
    redraw: () => {
      update();
      redraw();
    },
    setOverlay(values, scale, opts = {}) {
      overlay = values ? { values, scale, ...opts } : null;
      redraw();
    },
  };
}
