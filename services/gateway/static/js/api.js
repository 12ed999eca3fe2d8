// The gateway's /v1 API from the browser: authenticated JSON requests, protobuf-JSON tensors and images.
//
// The API key is asked for once, the first time the gateway answers 401, and kept in sessionStorage (for as long
// as the tab is open). <img> tags cannot send headers, so image routes get it as ?key=.

const KEY_ITEM = "saev.apiKey";
// The gateway's root, found from the page's own address (served at <root>/ui/), so that the UI also works behind a
// route prefix or a proxy path. Callers pass "/v1/..." paths.
const ROOT = new URL("../", document.baseURI).pathname.replace(/\/$/, "");
let asking = null; // one key prompt at a time, shared by every request that was refused

export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code || "";
    this.field = field || "";
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

function askForKey(refused) {
  if (!asking) {
    asking = new Promise((resolve) => {
      const dialog = document.getElementById("key-dialog");
      const input = dialog.querySelector("input");
      const note = dialog.querySelector(".key-note");
      note.textContent = refused ? "That key was refused; try another." : "";
      input.value = "";
      dialog.querySelector("form").onsubmit = (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        sessionStorage.setItem(KEY_ITEM, key);
        dialog.close();
        resolve(key);
      };
      dialog.oncancel = (event) => event.preventDefault(); // Escape would leave the request waiting forever
      dialog.showModal();
      input.focus();
    }).finally(() => {
      asking = null;
    });
  }
  return asking;
}

// JSON request to the gateway; resolves with the parsed body, rejects with an ApiError.
export async function api(path, { method = "GET", body, query } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v !== undefined && v !== null && v !== "") params.set(k, String(v));
    }
    const text = params.toString();
    if (text) url += (url.includes("?") ? "&" : "?") + text;
  }
  let refused = false;
  for (;;) {
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(ROOT + url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      await askForKey(refused || Boolean(key));
      refused = true;
      continue;
    }
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const err = data.error || {};
      throw new ApiError(response.status, err.code, err.message || response.statusText, err.field);
    }
    return data;
  }
}

// Bytes of an authenticated binary route (e.g. a dataset image PNG).
export async function fetchBytes(path) {
  for (let tries = 0; ; tries++) {
    const key = apiKey();
    const response = await fetch(ROOT + path, { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (response.status === 401 && tries < 3) {
      await askForKey(Boolean(key));
      continue;
    }
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new ApiError(response.status, data.error?.code, data.error?.message || response.statusText);
    }
    return new Uint8Array(await response.arrayBuffer());
  }
}

// URL for an <img> of an authenticated PNG route.
export function imageUrl(path, query = {}) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null) params.set(k, String(v));
  const key = apiKey();
  if (key) params.set("key", key);
  const text = params.toString();
  return ROOT + (text ? `${path}?${text}` : path);
}

export const enc = encodeURIComponent;

// -- protobuf JSON helpers --------------------------------------------------------------------------------------

export function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

export function fromBase64(text) {
  const raw = atob(text || "");
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

const DTYPES = {
  DTYPE_FLOAT32: [Float32Array, 4],
  DTYPE_FLOAT64: [Float64Array, 8],
  DTYPE_INT32: [Int32Array, 4],
  DTYPE_INT16: [Int16Array, 2],
  DTYPE_INT8: [Int8Array, 1],
  DTYPE_UINT8: [Uint8Array, 1],
  DTYPE_BOOL: [Uint8Array, 1],
  DTYPE_INT64: [BigInt64Array, 8],
};

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

// A Tensor message -> {shape: number[], data: Float64Array-like of Numbers}.
export function decodeTensor(tensor) {
  if (!tensor || !tensor.dtype) return null;
  const shape = (tensor.shape || []).map(Number);
  const bytes = fromBase64(tensor.data);
  const n = shape.reduce((a, b) => a * b, 1);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float64Array(n);
  if (tensor.dtype === "DTYPE_FLOAT16" || tensor.dtype === "DTYPE_BFLOAT16") {
    for (let i = 0; i < n; i++) {
      const word = view.getUint16(2 * i, true);
      out[i] =
        tensor.dtype === "DTYPE_FLOAT16"
          ? halfToFloat(word)
          : new Float32Array(new Uint32Array([word << 16]).buffer)[0];
    }
    return { shape, data: out };
  }
  const [Type, size] = DTYPES[tensor.dtype] || [];
  if (!Type) throw new Error(`unsupported tensor dtype ${tensor.dtype}`);
  const copy = bytes.slice(0, n * size); // aligned copy
  const typed = new Type(copy.buffer);
  for (let i = 0; i < n; i++) out[i] = Number(typed[i]);
  return { shape, data: out };
}

// Float32 tensor message from a Float32Array and a shape.
export function float32Tensor(values, shape) {
  const bytes = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  return { dtype: "DTYPE_FLOAT32", shape, data: toBase64(bytes) };
}

// Raw little-endian float32 bytes of a tensor message (no conversion), for re-sending.
export function tensorBytes(tensor) {
  return fromBase64(tensor.data);
}

export function softmax(values) {
  const max = Math.max(...values);
  const exps = values.map((v) => Math.exp(v - max));
  const sum = exps.reduce((a, b) => a + b, 0);
  return exps.map((v) => v / sum);
}
