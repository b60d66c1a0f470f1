// Sweeps: the list with a form to start one, and a sweep's page (trials live, the plot,
// cancel, promote the best trial's model).

import { blobUrl, followEvents, get, request } from "./api.js";
import { h, plainError } from "./views.js";

const EXAMPLE_SPACE = {
  "optimizer.lr": { log_uniform: [0.0001, 0.01] },
  "freeze.strategy": { choice: ["head_only", "last_n_blocks"] },
  "head.dropout": { uniform: [0, 0.5] },
};
const ENDED = ["succeeded", "failed", "cancelled"];
const value = (v) => (typeof v === "number" ? v.toFixed(4) : "–");
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

function field(label, input) {
  return h("div", { class: "field" }, h("label", { for: input.id }, label), input);
}

function parseJson(text, name) {
  try { return JSON.parse(text); } catch (error) { throw new Error(`${name}: not valid JSON (${error.message})`); }
}

export async function sweepsPage(view, alert, go) {
  const [sweeps, datasets] = await Promise.all([get("/sweeps", { limit: 50 }).then((page) => page.items),
    get("/datasets", { limit: 100 })]);
  const dataset = h("select", { id: "sweep-dataset", name: "dataset_id" },
    datasets.items.map((d) => h("option", { value: d.id }, `${d.name} (${d.num_images} images)`)));
  const space = h("textarea", { id: "sweep-space", rows: "6" }, JSON.stringify(EXAMPLE_SPACE, null, 2));
  const base = h("textarea", { id: "sweep-base", rows: "3" }, "{}");
  const objective = h("select", { id: "sweep-objective" }, ["val_accuracy", "val_loss", "val_map"].map((o) => h("option", {}, o)));
  const trials = h("input", { id: "sweep-trials", type: "number", min: "1", max: "200", value: "10" });
  const parallelism = h("input", { id: "sweep-parallelism", type: "number", min: "1", max: "32", value: "2" });
  const pruner = h("select", { id: "sweep-pruner" }, ["median", "asha", "none"].map((o) => h("option", {}, o)));
  const sampler = h("select", { id: "sweep-sampler" }, ["tpe", "random", "grid"].map((o) => h("option", {}, o)));
  const errors = h("ul", { id: "sweep-errors", class: "errors" });
  const form = h("form", { id: "sweep-form", class: "card", onsubmit: async (event) => {
    event.preventDefault();
    errors.replaceChildren();
    try {
      const body = { dataset_id: dataset.value, space: parseJson(space.value, "space"),
        base: parseJson(base.value, "base"), objective: objective.value, n_trials: Number(trials.value),
        parallelism: Number(parallelism.value), pruner: pruner.value, sampler: sampler.value };
      const sweep = await request("POST", "/sweeps", { json: body });
      go(`#/sweeps/${sweep.id}`);
    } catch (error) {
      const items = (error.errors || []).map((e) => h("li", {}, `${(e.loc || []).join(".")}: ${e.msg}`));
      errors.replaceChildren(...(items.length ? items : [h("li", {}, plainError(error))]));
    }
  } }, h("h2", {}, "Start a sweep"), field("Dataset", dataset),
  field("Search space (spec path → distribution)", space), field("Base spec", base),
  field("Objective", objective), field("Trials", trials), field("At once", parallelism),
  field("Pruner", pruner), field("Sampler", sampler), errors, h("button", { type: "submit" }, "Start sweep"));
  const rows = sweeps.map((s) => h("tr", { "data-sweep": s.id },
    h("td", {}, h("a", { href: `#/sweeps/${s.id}` }, s.id.slice(0, 8))), h("td", { class: "status", "data-status": s.status }, s.status),
    h("td", {}, `${s.trials.length}/${s.n_trials}`), h("td", {}, value(s.best_trial && s.best_trial.value)),
    h("td", {}, when(s.created_at))));
  view.replaceChildren(h("h1", {}, "Sweeps"), h("div", { class: "table-wrap" }, h("table", {},
    h("thead", {}, h("tr", {}, ["Sweep", "Status", "Trials", "Best", "Started"].map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", { id: "sweeps-body" }, rows))), form);
  if (!datasets.items.length) alert("Upload a dataset first (Datasets).");
}

export async function sweepPage(view, alert, id) {
  const status = h("span", { id: "sweep-status", class: "status" });
  const reason = h("span", { id: "sweep-reason", class: "muted" });
  const best = h("p", { id: "sweep-best" });
  const body = h("tbody", { id: "trials-body" });
  const plot = h("img", { id: "sweep-plot", alt: "The objective of each trial over time, and against the parameters that matter most" });
  const alias = h("input", { id: "promote-alias", value: "best", "aria-label": "Alias" });
  const promoted = h("span", { id: "promoted" });
  const cancel = h("button", { type: "button", id: "cancel-sweep", class: "danger", onclick: async () => {
    try { await request("POST", `/sweeps/${id}/cancel`); await refresh(); } catch (e) { alert(plainError(e)); }
  } }, "Cancel sweep");
  const promote = h("button", { type: "button", id: "promote-best", onclick: async () => {
    try {
      const done = await request("POST", `/sweeps/${id}/promote`, { json: { alias: alias.value } });
      promoted.textContent = `${done.alias} now points at model ${done.model_id.slice(0, 8)} (trial ${done.trial})`;
    } catch (e) { alert(plainError(e)); }
  } }, "Promote the best");
  view.replaceChildren(h("h1", {}, `Sweep ${id.slice(0, 8)}`),
    h("section", { class: "card" }, h("p", {}, "Status: ", status, " ", reason), best, cancel),
    h("section", { class: "card" }, h("h2", {}, "Trials"), h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Trial", "Status", "Epochs", "Objective", "Parameters"].map((x) => h("th", { scope: "col" }, x)))), body))),
    h("section", { class: "card" }, h("h2", {}, "Plot"), plot),
    h("section", { class: "card" }, h("h2", {}, "Promote"), alias, " ", promote, " ", promoted));

  let plotUrl = null;
  async function drawPlot(sweep) {
    const url = await blobUrl(`/sweeps/${id}/plot.png`);
    plot.onload = () => { plot.dataset.status = sweep.status; };  // what the picture shows
    plot.src = url;
    if (plotUrl) URL.revokeObjectURL(plotUrl);
    plotUrl = url;
  }
  async function refresh() {
    const sweep = await get(`/sweeps/${id}`);
    status.textContent = sweep.status;
    status.dataset.status = sweep.status;
    reason.textContent = sweep.reason || "";
    cancel.hidden = ENDED.includes(sweep.status);
    const b = sweep.best_trial;
    best.replaceChildren(b ? h("span", {}, `Best: trial ${b.number}, ${sweep.objective} ${value(b.value)} `,
      h("a", { href: `#/jobs/${b.job_id}` }, "job"), " ", b.model_id ? h("a", { href: `#/models/${b.model_id}`, id: "best-model" }, "model") : "")
      : h("span", { class: "muted" }, "No finished trial yet."));
    body.replaceChildren(...sweep.trials.map((t) => h("tr", { "data-trial": t.number },
      h("td", {}, h("a", { href: `#/jobs/${t.job_id}` }, String(t.number))),
      h("td", { class: "status", "data-status": t.status }, t.status), h("td", {}, `${t.epoch}/${t.epochs}`),
      h("td", {}, value(t.value)), h("td", {}, h("code", {}, JSON.stringify(t.params))))));
    return sweep;
  }
  await drawPlot(await refresh());
  let pending = null;
  const stream = followEvents(id, (event) => {
    if (event.error) { alert(plainError(event.error)); return; }
    clearTimeout(pending);  // a burst of trial events redraws once
    pending = setTimeout(() => { refresh().then(drawPlot).catch(() => {}); }, 300);
  }, "sweeps");
  return () => { stream.stop(); clearTimeout(pending); if (plotUrl) URL.revokeObjectURL(plotUrl); };
}
