// Feature browser: the SAE's latents, sorted and filtered by frequency and mean value, and a page per latent
// (statistics, activation histogram, exemplar grid with heatmaps).

import { api, enc, imageUrl } from "./api.js";
import { clear, el, errorBox, fmt, pct } from "./dom.js";
import { saeInfo, setDatasetImage, state } from "./state.js";

const SERVER_ORDERS = { latent: "INDEX", frequency: "FREQUENCY", max_activation: "MAX_ACTIVATION" };
const COLUMNS = [
  ["latent", "Latent"],
  ["frequency", "Frequency"],
  ["mean_activation", "Mean value"],
  ["max_activation", "Max"],
  ["image_frequency", "Image freq."],
];
const MAX_PAGES = 20; // requests per "load" when a mean-value filter hides most rows

export function tileUrl(saeId, latent, rank, kind = "patch") {
  return imageUrl(`/v1/saes/${enc(saeId)}/latents/${Number(latent)}/exemplars/${Number(rank)}/tile.png`, { kind });
}

function readQuery(query) {
  const num = (k) => (query.get(k) === null || query.get(k) === "" ? "" : Number(query.get(k)));
  return {
    sort: query.get("sort") || "frequency",
    desc: query.get("desc") !== "0",
    minFreq: num("minf"),
    maxFreq: num("maxf"),
    minMean: num("minm"),
    maxMean: num("maxm"),
    dead: query.get("dead") === "1",
  };
}

function writeQuery(opts) {
  const q = new URLSearchParams();
  q.set("sort", opts.sort);
  q.set("desc", opts.desc ? "1" : "0");
  if (opts.minFreq !== "") q.set("minf", opts.minFreq);
  if (opts.maxFreq !== "") q.set("maxf", opts.maxFreq);
  if (opts.minMean !== "") q.set("minm", opts.minMean);
  if (opts.maxMean !== "") q.set("maxm", opts.maxMean);
  if (opts.dead) q.set("dead", "1");
  history.replaceState(null, "", `#/latents?${q}`);
}

export async function renderLatents(root, query) {
  const saeId = state.saeId;
  const info = saeInfo(saeId);
  const opts = readQuery(query);
  clear(root, el("h1", {}, "Features"));
  if (!info) {
    root.append(el("p", { class: "muted" }, "No SAE is served yet."));
    return;
  }
  root.append(
    el(
      "p",
      { class: "muted" },
      `${info.sae_id}: ${info.d_sae} latents on ${info.backbone_id}, layer ${info.layer}` +
        (info.analyzed ? "" : " (not analysed: no exemplars)"),
    ),
  );

  const field = (label, name, value, attrs = {}) =>
    el("label", {}, label, el("input", { type: "number", name, value, step: "any", min: 0, ...attrs }));
  const form = el(
    "form",
    { class: "controls", id: "latent-filters" },
    el(
      "label",
      {},
      "Sort by",
      el(
        "select",
        { name: "sort" },
        COLUMNS.filter(([k]) => k !== "image_frequency").map(([k, label]) =>
          el("option", { value: k, selected: k === opts.sort }, label),
        ),
      ),
    ),
    el(
      "label",
      {},
      "Order",
      el(
        "select",
        { name: "desc" },
        el("option", { value: "1", selected: opts.desc }, "descending"),
        el("option", { value: "0", selected: !opts.desc }, "ascending"),
      ),
    ),
    field("Min frequency", "minf", opts.minFreq, { max: 1 }),
    field("Max frequency", "maxf", opts.maxFreq, { max: 1 }),
    field("Min mean value", "minm", opts.minMean),
    field("Max mean value", "maxm", opts.maxMean),
    el("label", {}, "Dead latents", el("input", { type: "checkbox", name: "dead", checked: opts.dead })),
    el("button", { type: "submit" }, "Apply"),
  );
  root.append(form);
  const summary = el("p", { class: "muted", id: "latent-summary" });
  const body = el("tbody");
  const more = el("button", { type: "button", class: "secondary" }, "Load more");
  const status = el("div");
  root.append(
    summary,
    el(
      "table",
      { id: "latent-table" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          COLUMNS.map(([k, label]) =>
            el(
              "th",
              {},
              k === "image_frequency"
                ? label
                : el(
                    "button",
                    {
                      type: "button",
                      class: `sort${k === opts.sort ? " on" : ""}${k === opts.sort && !opts.desc ? " asc" : ""}`,
                      onclick: () => {
                        const next = { ...opts, sort: k, desc: k === opts.sort ? !opts.desc : true };
                        writeQuery(next);
                        renderLatents(root, new URLSearchParams(location.hash.split("?")[1] || ""));
                      },
                    },
                    label,
                  ),
            ),
          ),
          el("th", {}, "Flags"),
          el("th", {}, info.analyzed ? "Top exemplar" : ""),
        ),
      ),
      body,
    ),
    status,
    more,
  );

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const val = (k) => (data.get(k) === "" ? "" : Number(data.get(k)));
    const next = {
      sort: data.get("sort"),
      desc: data.get("desc") === "1",
      minFreq: val("minf"),
      maxFreq: val("maxf"),
      minMean: val("minm"),
      maxMean: val("maxm"),
      dead: data.get("dead") === "on",
    };
    writeQuery(next);
    renderLatents(root, new URLSearchParams(location.hash.split("?")[1] || ""));
  });

  // Server-side: sort (index, frequency, max) and frequency filters. Mean value: filtered and, when it is the
  // sort key, sorted here over everything the server matched (fetched page by page).
  const serverOrder = SERVER_ORDERS[opts.sort] || "INDEX";
  const keep = (l) =>
    (opts.minMean === "" || l.mean_activation >= opts.minMean) &&
    (opts.maxMean === "" || l.mean_activation <= opts.maxMean);
  let token = "";
  let shown = 0;
  let done = false;
  const pageSize = opts.sort === "mean_activation" ? 1000 : 50;

  async function load() {
    more.disabled = true;
    clear(status, el("p", { class: "loading" }, "Loading latents…"));
    try {
      const rows = [];
      let total = 0;
      for (let i = 0; i < MAX_PAGES && !done; i++) {
        const page = await api(`/v1/saes/${enc(saeId)}/latents`, {
          query: {
            order_by: serverOrder,
            descending: opts.desc,
            include_dead: opts.dead,
            page_size: pageSize,
            page_token: token,
            min_frequency: opts.minFreq,
            max_frequency: opts.maxFreq,
          },
        });
        total = Number(page.total || 0);
        rows.push(...(page.latents || []).filter(keep));
        token = page.next_page_token || "";
        done = !token;
        if (opts.sort !== "mean_activation" && rows.length >= 50) break;
      }
      if (opts.sort === "mean_activation")
        rows.sort((a, b) => (opts.desc ? -1 : 1) * (a.mean_activation - b.mean_activation) || a.latent - b.latent);
      for (const l of rows) body.append(latentRow(saeId, l, info.analyzed));
      shown += rows.length;
      summary.textContent =
        `${shown} latents shown; ${total} match the frequency filters` +
        (opts.minMean !== "" || opts.maxMean !== "" ? " (mean-value filter applied here)" : "");
      clear(status);
    } catch (err) {
      clear(status, errorBox(err));
    }
    more.disabled = done;
    more.hidden = done;
  }
  more.addEventListener("click", load);
  await load();
}

function latentRow(saeId, l, analyzed) {
  const href = `#/latent/${enc(saeId)}/${Number(l.latent)}`;
  const logWidth = l.frequency > 0 ? Math.max(2, 60 + 12 * Math.log10(l.frequency)) : 0; // 1e-5 .. 1 -> 0 .. 60 px
  return el(
    "tr",
    { dataset: { latent: String(l.latent) } },
    el("td", {}, el("a", { href }, `#${l.latent}`), l.label ? el("span", { class: "muted" }, ` ${l.label}`) : null),
    el(
      "td",
      { class: "num" },
      el("span", { class: "bar", style: `width:${logWidth.toFixed(0)}px` }),
      " ",
      fmt(l.frequency, 5),
    ),
    el("td", { class: "num" }, fmt(l.mean_activation)),
    el("td", { class: "num" }, fmt(l.max_activation)),
    el("td", { class: "num" }, fmt(l.image_frequency)),
    el(
      "td",
      {},
      l.dead ? el("span", { class: "flag" }, "dead") : null,
      l.dense ? el("span", { class: "flag" }, "dense") : null,
    ),
    el(
      "td",
      {},
      analyzed && !l.dead
        ? el(
            "a",
            { href },
            el("img", {
              class: "thumb",
              loading: "lazy",
              alt: `top exemplar of latent ${l.latent}`,
              src: tileUrl(saeId, l.latent, 0),
            }),
          )
        : null,
    ),
  );
}

// -- one latent ------------------------------------------------------------------------------------------------

export async function renderLatent(root, saeId, latent) {
  clear(
    root,
    el("p", {}, el("a", { href: "#/latents" }, "← all features")),
    el("h1", {}, `Latent #${latent}`),
    el("p", { class: "muted" }, saeId),
  );
  const top = el("div", { class: "row" });
  const grid = el("div", { class: "grid", id: "exemplar-grid" });
  root.append(top, el("h2", {}, "Top exemplars"), grid);
  try {
    const response = await api(`/v1/saes/${enc(saeId)}/latents/${latent}`);
    const stats = response.stats || {};
    top.append(
      el(
        "dl",
        { class: "stats panel", id: "latent-stats" },
        el("dt", {}, "Label"),
        el("dd", {}, stats.label || "–"),
        el("dt", {}, "Frequency (tokens)"),
        el("dd", {}, `${fmt(stats.frequency, 6)} (${pct(stats.frequency)})`),
        el("dt", {}, "Frequency (images)"),
        el("dd", {}, fmt(stats.image_frequency, 4)),
        el("dt", {}, "Mean value when firing"),
        el("dd", {}, fmt(stats.mean_activation)),
        el("dt", {}, "Max value"),
        el("dd", {}, fmt(stats.max_activation)),
        el("dt", {}, "Flags"),
        el("dd", {}, [stats.dead ? "dead" : "", stats.dense ? "dense" : ""].filter(Boolean).join(", ") || "–"),
      ),
    );
    const analysed = Boolean(saeInfo(saeId)?.analyzed);
    const hist = analysed ? await api(`/v1/saes/${enc(saeId)}/latents/${latent}/histogram`).catch(() => null) : null;
    top.append(histogramFigure(hist));
    top.append(
      el(
        "div",
        { class: "col" },
        el("a", { href: `#/playground?latent=${latent}` }, "Try it in the intervention playground →"),
      ),
    );
  } catch (err) {
    top.append(errorBox(err));
  }
  if (!saeInfo(saeId)?.analyzed) {
    grid.append(el("p", { class: "muted" }, "This SAE is not analysed yet (saevctl analyze): no exemplars."));
    return;
  }
  try {
    const ex = await api(`/v1/saes/${enc(saeId)}/latents/${latent}/exemplars`, { query: { kind: "patch", limit: 12 } });
    const exemplars = ex.exemplars || [];
    if (!exemplars.length) grid.append(el("p", { class: "muted" }, "This latent fired on no analysed image."));
    exemplars.forEach((e, rank) => {
      const open = el(
        "button",
        {
          type: "button",
          class: "secondary small",
          onclick: async () => {
            open.disabled = true;
            try {
              await setDatasetImage(saeId, e);
              location.hash = "#/explore";
            } catch (err) {
              open.replaceWith(errorBox(err));
            }
          },
        },
        "Explore this image",
      );
      grid.append(
        el(
          "figure",
          { class: "exemplar" },
          el("img", { src: tileUrl(saeId, latent, e.rank ?? rank), alt: `exemplar ${rank + 1}`, loading: "lazy" }),
          el(
            "figcaption",
            {},
            `${e.image_id || ""} · max ${fmt(e.max_activation)}`,
            e.label !== undefined && e.label !== null ? ` · label ${e.label}` : "",
          ),
          open,
        ),
      );
    });
  } catch (err) {
    grid.append(errorBox(err));
  }
}

// Normalise the histogram answer ({counts, edges} or {counts, lo, hi} or {bins: [{lo, hi, count}]}).
function histogramBins(hist) {
  if (!hist) return null;
  const h = hist.histogram || hist;
  if (Array.isArray(h.bins))
    return h.bins.map((b) => ({
      lo: Number(b.lo ?? b.low ?? b.start),
      hi: Number(b.hi ?? b.high ?? b.end),
      count: Number(b.count),
    }));
  const counts = (h.counts || []).map(Number);
  if (!counts.length) return null;
  let edges = (h.edges || h.bin_edges || []).map(Number);
  if (edges.length !== counts.length + 1) {
    const lo = Number(h.lo ?? h.min ?? 0);
    const hi = Number(h.hi ?? h.max ?? counts.length);
    edges = counts.map((_, i) => lo + ((hi - lo) * i) / counts.length).concat([hi]);
  }
  return counts.map((count, i) => ({ lo: edges[i], hi: edges[i + 1], count }));
}

function histogramFigure(hist) {
  const bins = histogramBins(hist);
  const fig = el("figure", { class: "panel", id: "latent-histogram" }, el("h3", {}, "Activation histogram"));
  if (!bins || !bins.length) {
    fig.append(el("p", { class: "muted" }, "No histogram for this latent."));
    return fig;
  }
  const width = 360;
  const height = 150;
  const canvas = el("canvas", {
    width,
    height,
    class: "histogram",
    role: "img",
    "aria-label": `histogram of ${bins.length} bins`,
  });
  const ctx = canvas.getContext("2d");
  const maxLog = Math.max(...bins.map((b) => Math.log10(1 + b.count)), 1e-9);
  const bw = width / bins.length;
  ctx.fillStyle = "#2d5b8a";
  bins.forEach((b, i) => {
    const h = ((height - 16) * Math.log10(1 + b.count)) / maxLog;
    ctx.fillRect(i * bw + 0.5, height - 14 - h, Math.max(1, bw - 1), h);
  });
  ctx.fillStyle = "#66707a";
  ctx.font = "11px sans-serif";
  ctx.fillText(fmt(bins[0].lo), 2, height - 2);
  const last = fmt(bins[bins.length - 1].hi);
  ctx.fillText(last, width - ctx.measureText(last).width - 2, height - 2);
  const where = hist.source === "exemplar_patches" ? "on the patches of its top exemplars" : "when firing";
  fig.append(
    canvas,
    el(
      "figcaption",
      {},
      `Positive code values ${where} (count, log scale); ` +
        `${bins.reduce((a, b) => a + b.count, 0)} in all${hist.zeros ? `, ${hist.zeros} zeros left out` : ""}`,
    ),
  );
  return fig;
}
