// The page's router: #/latents, #/latent/<sae>/<i>, #/explore, #/playground, #/compare; and the SAE chooser.

import { clear, el, errorBox } from "./dom.js";
import { renderCompare } from "./compare.js";
import { renderExplorer } from "./explorer.js";
import { renderLatent, renderLatents } from "./latents.js";
import { renderPlayground } from "./playground.js";
import { loadCatalog, state } from "./state.js";

const root = document.getElementById("page");
const select = document.getElementById("sae-select");

function fillSaeSelect() {
  clear(
    select,
    state.saes.map((s) =>
      el(
        "option",
        { value: s.sae_id, selected: s.sae_id === state.saeId },
        `${s.sae_id} · ${s.backbone_id} L${s.layer}${s.analyzed ? "" : " (not analysed)"}`,
      ),
    ),
  );
  if (!state.saes.length) select.append(el("option", { value: "" }, "no SAE"));
}

select.addEventListener("change", () => {
  state.saeId = select.value;
  state.edits = [];
  state.headId = "";
  route();
});

let rendering = 0;
async function route() {
  const mine = ++rendering;
  const [path, queryText] = (location.hash.replace(/^#/, "") || "/latents").split("?");
  const query = new URLSearchParams(queryText || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const page = parts[0] || "latents";
  document
    .querySelectorAll("header nav a")
    .forEach((a) =>
      a.classList.toggle("active", a.dataset.page === page || (page === "latent" && a.dataset.page === "latents")),
    );
  document.body.dataset.page = page;
  document.body.dataset.ready = "0";
  try {
    if (page === "latent" && parts.length === 3) {
      if (state.saes.some((s) => s.sae_id === parts[1]) && parts[1] !== state.saeId) {
        state.saeId = parts[1];
        fillSaeSelect();
      }
      await renderLatent(root, parts[1], Number(parts[2]));
    } else if (page === "explore") await renderExplorer(root, query);
    else if (page === "playground") await renderPlayground(root, query);
    else if (page === "compare") await renderCompare(root, query);
    else await renderLatents(root, query);
  } catch (err) {
    clear(root, errorBox(err));
  }
  if (mine === rendering) document.body.dataset.ready = "1";
}

window.addEventListener("hashchange", route);

(async () => {
  try {
    await loadCatalog();
  } catch (err) {
    clear(root, errorBox(err));
    return;
  }
  fillSaeSelect();
  await route();
})();
