// Sign in, the hash router and the error banner. Pages are in views.js.

import { get, key } from "./api.js";
import * as labelling from "./labelling.js";
import * as sweeps from "./sweeps.js";
import * as views from "./views.js";

const main = document.getElementById("main");
const view = document.getElementById("view");
const signIn = document.getElementById("sign-in");
const nav = document.getElementById("nav");
const banner = document.getElementById("alert");
let cleanup = null;

function alert(message) {
  banner.textContent = message;
  banner.hidden = !message;
}

function go(hash) { location.hash = hash; }

const ROUTES = [
  [/^#\/datasets\/(\w+)$/, (m) => views.datasetPage(view, alert, m[1], go)],
  [/^#\/datasets$/, () => views.datasetsPage(view, alert)],
  [/^#\/new-job(\?.*)?$/, (m) => views.newJobPage(view, alert, new URLSearchParams((m[1] || "").slice(1)), go)],
  [/^#\/jobs\/(\w+)$/, (m) => views.jobPage(view, alert, m[1])],
  [/^#\/label\/(\w+)$/, (m) => labelling.labelPage(view, alert, m[1], go)],
  [/^#\/jobs$/, () => views.jobsPage(view)],
  [/^#\/models\/(\w+)$/, (m) => views.modelPage(view, alert, m[1])],
  [/^#\/models$/, () => views.modelsPage(view)],
  [/^#\/sweeps\/(\w+)$/, (m) => sweeps.sweepPage(view, alert, m[1])],
  [/^#\/sweeps$/, () => sweeps.sweepsPage(view, alert, go)],
];

async function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  alert("");
  const signedIn = Boolean(key.get());
  signIn.hidden = signedIn;
  nav.hidden = !signedIn;
  view.hidden = !signedIn;
  if (!signedIn) { document.getElementById("key").focus(); return; }
  const hash = location.hash || "#/jobs";
  const found = ROUTES.find(([pattern]) => pattern.test(hash));
  if (!found) { go("#/jobs"); return; }
  for (const link of nav.querySelectorAll("a")) {
    link.toggleAttribute("aria-current", hash.startsWith(link.getAttribute("href")));
  }
  view.replaceChildren(views.h("p", { class: "muted" }, "Loading…"));
  try {
    cleanup = (await found[1](hash.match(found[0]))) || null;
    main.focus({ preventScroll: true });
  } catch (error) {
    if (error.status === 401) { key.clear(); signIn.hidden = false; nav.hidden = true; view.hidden = true; }
    view.replaceChildren();
    alert(views.plainError(error));
  }
}

document.getElementById("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("key");
  key.set(input.value.trim());
  try {
    await get("/datasets", { limit: 1 });  // the key works, or the API says why
    input.value = "";
    await route();
  } catch (error) {
    key.clear();
    alert(views.plainError(error));
  }
});

document.getElementById("sign-out").addEventListener("click", () => { key.clear(); go("#/jobs"); route(); });
window.addEventListener("hashchange", route);
route();
