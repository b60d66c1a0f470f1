// The dashboard's pages. Each render function fills `view` and returns a cleanup function
// (live updates stop when the page is left). Live values change in place: no flashing.

import { ApiError, blobUrl, followEvents, get, request, upload } from "./api.js";
import { barChart, lineChart } from "./charts.js";
import { readSpecForm, renderSpecForm, showErrors, specSchema } from "./forms.js";
import { renderMarkdown } from "./markdown.js";

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick" || k === "onsubmit" || k === "onchange") node[k] = v;
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

export function plainError(error) {
  if (error instanceof ApiError) {
    if (error.status === 401) return "That key was not accepted. Check it and sign in again.";
    if (error.status === 403) return `Not allowed with this key: ${error.message}`;
    if (error.status === 0) return "The server could not be reached. Is ftune running?";
    return error.message;
  }
  return `Something went wrong: ${error.message}`;
}

const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const pct = (v) => (typeof v === "number" ? `${(100 * v).toFixed(1)}%` : "–");
const num = (v, d = 4) => (typeof v === "number" ? v.toFixed(d) : "–");

// The download formats (models/export_formats.py) and the file name each is saved under.
const DOWNLOAD_SUFFIXES = { safetensors: "zip", onnx: "onnx", torchscript: "pt", triton: "triton.zip", "onnx-int8": "int8.onnx" };

function table(headers, rows, attrs = {}) {
  return h("div", { class: "table-wrap" }, h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", {}, rows)));
}

function setText(node, text) { if (node.textContent !== text) node.textContent = text; }

const ENDED = ["succeeded", "failed", "cancelled", "pruned"];

// A training stage counts its own epochs ("finetune, epoch 2/12"), beside the job's total:
// the head's epochs then the fine-tuning's would read "epoch 41/52".
function stageEpoch(p, epoch) {
  if (p.stage_epoch == null || !p.stage_epochs) return null;
  const own = epoch - (p.epoch - p.stage_epoch);
  return own >= 1 && own <= p.stage_epochs ? `${p.stage}, epoch ${own}/${p.stage_epochs}` : null;
}

function progressText(job) {
  const p = job.progress || {};
  const done = p.epochs_done || 0;
  if (ENDED.includes(job.status)) return `${done} epoch${done === 1 ? "" : "s"} run`;
  const own = stageEpoch(p, p.epoch);
  if (own) return `${own} (${done} of ${p.epochs || "?"} in all)`;
  const stage = p.stage ? `${p.stage}, ` : "";
  return `${stage}epoch ${done}/${p.epochs || "?"}`;
}

function dropZone(label, accept, multiple, onFiles) {
  const input = h("input", { type: "file", accept, multiple, id: `${label.replace(/\W+/g, "-")}-input`, class: "visually-hidden" });
  const zone = h("label", { class: "drop", for: input.id, tabindex: "0" }, label);
  input.onchange = () => input.files.length && onFiles([...input.files]);
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
  });
  return h("div", {}, zone, input);
}

// ---- datasets ------------------------------------------------------------------------

export async function datasetsPage(view, alert) {
  const list = await get("/datasets", { limit: 100 });
  const bar = h("progress", { max: "1", value: "0", id: "upload-progress", hidden: true, "aria-label": "Upload progress" });
  const name = h("input", { id: "dataset-name", name: "name", placeholder: "default: the file's name" });
  const report = h("div", { id: "upload-report" });
  const onFiles = async ([file]) => {
    bar.hidden = false;
    try {
      const dataset = await upload(file, name.value.trim(), (share) => { bar.value = share; });
      report.replaceChildren(reportCard(dataset.report, dataset));
    } catch (error) {
      if (error.status === 422 && error.errors) report.replaceChildren(h("p", { class: "error" }, error.message));
      alert(plainError(error));
    } finally { bar.hidden = true; }
  };
  view.replaceChildren(
    h("h1", {}, "Datasets"),
    h("section", { class: "card" }, h("h2", {}, "Upload"),
      h("p", {}, "A zip, tar or tar.gz of a folder with one sub-folder per class (or train/ and val/)."),
      h("label", { for: "dataset-name" }, "Name"), name,
      dropZone("Drop the archive here, or choose it", ".zip,.tar,.gz,.tgz", false, onFiles), bar, report),
    table(["Name", "Images", "Classes", "Uploaded", ""], list.items.map((d) => h("tr", {},
      h("td", {}, h("a", { href: `#/datasets/${d.id}` }, d.name)), h("td", {}, String(d.num_images)),
      h("td", {}, String(d.classes.length)), h("td", {}, when(d.created_at)),
      h("td", {}, h("a", { href: `#/new-job?dataset=${d.id}` }, "Train"))))),
  );
}

function reportCard(report, dataset) {
  if (!report) return h("p", {}, "No report.");
  const findings = [...(report.errors || []).map((f) => ["error", f]), ...(report.warnings || []).map((f) => ["warning", f])];
  const counts = Object.entries(report.splits || {}).map(([split, s]) =>
    barChart(`Images per class (${split})`, Object.entries(s.per_class || {}).map(([label, value]) => ({ label, value }))));
  return h("section", { class: "card report", id: "report" },
    h("h2", {}, dataset ? `Report: ${dataset.name}` : "Report"),
    h("p", { class: report.ok ? "ok" : "error" }, report.ok
      ? `Ready to train: ${report.num_images} images, ${report.num_classes} classes.`
      : "Not usable yet: fix the errors below and upload again."),
    findings.length ? h("ul", { class: "findings" }, findings.map(([level, f]) => h("li", { class: level },
      h("strong", {}, `${level}: `), f.message, f.action ? h("div", { class: "action" }, `What to do: ${f.action}`) : null)))
      : h("p", {}, "No problems found."),
    counts);
}

export async function datasetPage(view, alert, id, go) {
  const [dataset, report] = await Promise.all([get(`/datasets/${id}`), get(`/datasets/${id}/report`)]);
  const remove = h("button", { type: "button", class: "danger", onclick: async () => {
    if (!confirm(`Delete dataset ${dataset.name}?`)) return;
    try { await request("DELETE", `/datasets/${id}`); go("#/datasets"); } catch (e) { alert(plainError(e)); }
  } }, "Delete dataset");
  view.replaceChildren(h("h1", {}, dataset.name), reportCard(report, dataset),
    h("p", {}, h("a", { href: `#/new-job?dataset=${id}`, class: "button" }, "Train on it"), " ", remove));
}

// ---- new job --------------------------------------------------------------------------

export async function newJobPage(view, alert, query, go) {
  const [datasets, backbones, schema] = await Promise.all([
    get("/datasets", { limit: 100 }), get("/backbones", { limit: 100 }), specSchema()]);
  const dataset = h("select", { id: "job-dataset", name: "dataset", required: true },
    datasets.items.map((d) => h("option", { value: d.id, selected: d.id === query.get("dataset") }, `${d.name} (${d.num_images} images)`)));
  const fallback = schema.components.schemas.FineTuneSpec.properties.backbone.default;
  const backbone = h("select", { id: "job-backbone", name: "backbone" },
    h("option", { value: "" }, `default (${fallback})`),
    backbones.items.filter((b) => b.pretrained_offline && b.name !== fallback)
      .map((b) => h("option", { value: b.name }, b.name)));
  const fields = h("div", { id: "spec-fields", class: "fields" });
  renderSpecForm(schema, fields, {
    image_size: "from the images' median size", epochs: "early stopping, within the time budget",
    "optimizer.lr": "a learning-rate range test", "freeze.strategy": "head, then the top stages",
    augment: "none while frozen, light when stages train", class_weights: "balanced from 3:1 imbalance",
  });
  fields.querySelector('[data-path="backbone"]')?.remove();  // chosen above
  const raw = h("textarea", { id: "spec-json", rows: "12", "aria-label": "Spec as JSON", hidden: true });
  const toggle = h("button", { type: "button", class: "link", id: "raw-toggle", onclick: () => {
    const toRaw = raw.hidden;
    if (toRaw) raw.value = JSON.stringify(readSpecForm(fields), null, 2);
    raw.hidden = !toRaw;
    fields.hidden = toRaw;
    toggle.textContent = toRaw ? "Use the form" : "Edit as JSON";
  } }, "Edit as JSON");
  const message = h("p", { class: "error", id: "job-error", role: "status" });
  const submit = async (event) => {
    event.preventDefault();
    message.textContent = "";
    let spec;
    try { spec = raw.hidden ? readSpecForm(fields) : JSON.parse(raw.value || "{}"); } catch (e) {
      message.textContent = `The JSON is not valid: ${e.message}`; return;
    }
    if (backbone.value) spec.backbone = backbone.value;
    try {
      const job = await request("POST", "/jobs", { json: { dataset_id: dataset.value, spec } });
      go(`#/jobs/${job.id}`);
    } catch (error) {
      const { invalid, unplaced } = showErrors(fields, error.errors || []);
      message.textContent = raw.hidden && invalid.length ? fixSummary(invalid, unplaced) : plainError(error);
      const first = raw.hidden ? invalid[0] : raw;
      if (first && error.errors?.length) {  // where the fix is, not on the button
        first.focus({ preventScroll: true });
        first.scrollIntoView({ block: "center" });
      }
    }
  };
  view.replaceChildren(h("h1", {}, "New job"), h("form", { id: "job-form", class: "card", onsubmit: submit, novalidate: true },
    h("label", { for: "job-dataset" }, "Dataset"), dataset,
    h("label", { for: "job-backbone" }, "Backbone"), backbone,
    h("p", {}, "Every field is optional: leave it empty for its default. ", toggle),
    fields, raw, message, h("button", { type: "submit", id: "start-job" }, "Start training")));
}

// What a 422 asks to fix, naming the fields (each one's message is by it, above this).
function fixSummary(invalid, unplaced) {
  const names = invalid.map((input) => input.name);
  const fields = names.length === 1 ? names[0] : `${names.length} fields: ${names.join(", ")}`;
  const where = names.length === 1 ? "what is wrong is shown by the field, above" : "each is marked above";
  return [`Fix ${fields} (${where}).`, ...unplaced].join(" ");
}

// ---- jobs -----------------------------------------------------------------------------

export async function jobsPage(view) {
  const body = h("tbody", { id: "jobs-body" });
  const rows = new Map();
  const refresh = async () => {
    const list = await get("/jobs", { limit: 50 });
    list.items.forEach((job, index) => {
      let row = rows.get(job.id);
      if (!row) {
        row = h("tr", { "data-job": job.id }, h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id.slice(0, 8))),
          h("td", { class: "status" }), h("td", { class: "progress" }), h("td", {}, when(job.created_at)));
        rows.set(job.id, row);
      }
      if (body.children[index] !== row) body.insertBefore(row, body.children[index] || null);
      setText(row.querySelector(".status"), job.status);
      row.querySelector(".status").dataset.status = job.status;
      setText(row.querySelector(".progress"), progressText(job));
    });
  };
  view.replaceChildren(h("h1", {}, "Jobs"), h("p", {}, h("a", { href: "#/new-job", class: "button" }, "New job")),
    h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {},
      ["Job", "Status", "Progress", "Submitted"].map((x) => h("th", { scope: "col" }, x)))), body)));
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 2000);
  return () => clearInterval(timer);
}

export async function jobPage(view, alert, id) {
  const status = h("span", { id: "job-status", class: "status" });
  const progress = h("progress", { id: "job-progress", max: "1", value: "0", "aria-label": "Progress" });
  const progressLabel = h("span", { id: "job-progress-text" });
  const charts = h("div", { class: "charts", id: "curves" });
  const epochs = h("div", { id: "epochs" });
  const grads = h("div", { id: "grad-norms" });
  const events = h("ol", { id: "events", class: "events" });
  const details = h("div", { id: "job-details" });
  const cancel = h("button", { type: "button", id: "cancel-job", class: "danger", onclick: async () => {
    try { await request("POST", `/jobs/${id}/cancel`); await refresh(); } catch (e) { alert(plainError(e)); }
  } }, "Cancel job");
  const modelLink = h("p", { id: "model-link" });
  view.replaceChildren(h("h1", {}, `Job ${id.slice(0, 8)}`),
    h("section", { class: "card" }, h("p", {}, "Status: ", status, " ", progressLabel), progress, cancel, modelLink),
    h("section", { class: "card" }, h("h2", {}, "Curves"), charts),
    h("section", { class: "card" }, h("h2", {}, "Epochs"), epochs),
    h("section", { class: "card" }, h("h2", {}, "Gradient norms per stage"), grads),
    details, h("section", { class: "card" }, h("h2", {}, "Events"), events));

  let shownEpochs = "";
  let lastProgress = {};
  async function refresh() {
    const job = await get(`/jobs/${id}`);
    lastProgress = job.progress || {};
    setText(status, job.status);
    status.dataset.status = job.status;
    setText(progressLabel, progressText(job));
    const p = job.progress || {};
    progress.value = p.epochs ? Math.min(1, (p.epochs_done || 0) / p.epochs) : 0;
    cancel.hidden = ENDED.includes(job.status);
    if (job.model_id && !modelLink.firstChild) modelLink.append(h("a", { href: `#/models/${job.model_id}`, id: "open-model" }, "Open the model"));
    if (job.kind === "suggest" && job.status === "succeeded" && !modelLink.firstChild) {
      modelLink.append(h("a", { href: `#/label/${id}`, id: "open-labelling" }, `Label the ${job.suggestions.length} suggested images`));
    }
    if (job.error) modelLink.replaceChildren(h("span", { class: "error" }, job.error));
    const drawn = `${job.metrics.length}@${job.best?.epoch}`;  // the best is known at the end
    if (drawn !== shownEpochs) { shownEpochs = drawn; drawMetrics(job.metrics, job); }
    details.replaceChildren(resolvedCard(job.resolved), diagnosisCard(job.diagnosis));
    return job;
  }
  function drawMetrics(rows, job) {
    const bestEpoch = job.best?.epoch;
    const series = (key, name, cls) => ({ name, cls, points: rows.map((r) => [r.epoch, r[key]]) });
    const multi = rows.some((r) => r.val_map != null);  // a multi-label job: its ranking metric too
    charts.replaceChildren(
      lineChart("Loss", [series("train_loss", "train", "train"), series("val_loss", "val", "val")], { yMin: 0 }),
      multi ? lineChart("Val mAP and label accuracy", [series("val_map", "val mAP", "train"), series("val_accuracy", "val label accuracy", "val")], { yMin: 0 })
        : lineChart("Accuracy", [series("train_accuracy", "train", "train"), series("val_accuracy", "val", "val")], { yMin: 0 }));
    epochs.replaceChildren(table(["Epoch", "Stage", "Train loss", "Train acc", "Val loss", "Val acc", ...(multi ? ["Val mAP"] : []), "LR", "Seconds"],
      rows.map((r) => epochRow(r, r.epoch === bestEpoch, multi))),
    bestEpoch ? bestNote(bestEpoch, job) : null);
    const stages = [...new Set(rows.flatMap((r) => Object.keys(r.stage_grad_norms || {})))];
    grads.replaceChildren(stages.length ? table(["Epoch", ...stages], rows.map((r) => h("tr", {}, h("td", {}, String(r.epoch)),
      stages.map((s) => h("td", {}, num((r.stage_grad_norms || {})[s], 4)))))) : h("p", {}, "None yet."));
  }
  await refresh();
  const stream = followEvents(id, async (event) => {
    if (event.error) { alert(plainError(event.error)); return; }
    events.append(h("li", {}, h("strong", {}, event.kind), " ", describe(event)));
    // The stage and epoch counts follow the events at once; refresh() catches up after.
    if (event.kind === "stage") {
      const done = lastProgress.epochs_done || 0;
      lastProgress = { ...lastProgress, stage: event.data.stage, stage_epochs: event.data.stage_epochs,
        stage_epoch: event.data.stage_epochs ? 0 : null, epoch: done };
    }
    if (event.kind === "epoch") lastProgress = { ...lastProgress, epochs_done: event.data.epoch };
    if (event.kind === "progress") {
      const epoch = stageEpoch(lastProgress, event.data.epoch) || `epoch ${event.data.epoch}`;
      setText(progressLabel, `${epoch}, step ${event.data.step}/${event.data.steps}`);
      return;
    }
    try { await refresh(); } catch { /* the next event refreshes again */ }
  });
  return () => stream.stop();
}

function bestNote(epoch, job) {
  const monitor = (job.spec?.early_stopping?.monitor || "val_loss").replace("_", " ");
  const refit = job.resolved?.refit?.value === true
    ? ", its head then trained again on train+val (see “refit” below)" : "";
  return h("p", { class: "muted", id: "best-epoch" },
    `Epoch ${epoch} had the best ${monitor} (marked “best”): the model is made from it${refit}.`);
}

// One epoch's row; the best one (the weights the model keeps) marked in words, not colour only.
function epochRow(r, best, multi) {
  const values = [r.stage, num(r.train_loss), pct(r.train_accuracy), num(r.val_loss), pct(r.val_accuracy),
    ...(multi ? [pct(r.val_map)] : []), num(r.lr, 6), num(r.seconds, 1)];
  return h("tr", { class: best ? "best" : null, "data-epoch": r.epoch },
    h("td", {}, String(r.epoch), best ? [" ", h("span", { class: "badge" }, "best")] : null),
    values.map((v) => h("td", {}, String(v ?? ""))));
}

function describe(event) {
  const d = event.data;
  if (event.kind === "status") return `${d.status}${d.reason ? ` (${d.reason})` : ""}${d.error ? `: ${d.error}` : ""}`;
  if (event.kind === "stage") return d.stage;
  if (event.kind === "epoch") return `epoch ${d.epoch}: val loss ${num(d.val_loss)}, val accuracy ${pct(d.val_accuracy)}${d.val_map != null ? `, val mAP ${pct(d.val_map)}` : ""}`;
  if (event.kind === "progress") return `epoch ${d.epoch} step ${d.step}/${d.steps}`;
  if (event.kind === "pretrain") return `pretraining epoch ${d.epoch} (${d.method}): loss ${num(d.loss)}`;
  if (event.kind === "resolved") return Object.keys(d).filter((k) => k !== "at").join(", ");
  return d.message || JSON.stringify(d);
}

function resolvedCard(resolved) {
  const entries = Object.entries(resolved || {});
  return h("section", { class: "card", id: "resolved" }, h("h2", {}, "Choices made for you"),
    entries.length ? h("dl", {}, entries.flatMap(([k, v]) => [h("dt", {}, `${k} = ${JSON.stringify(v.value)}`), h("dd", {}, v.why)]))
      : h("p", {}, "None yet."));
}

function diagnosisCard(diagnosis) {
  return h("section", { class: "card", id: "diagnosis" }, h("h2", {}, "Diagnosis"),
    diagnosis == null ? h("p", {}, "When the job ends.") : diagnosis.length === 0 ? h("p", {}, "The run looks healthy.")
      : h("ul", {}, diagnosis.map((f) => h("li", {}, h("strong", {}, f.message), h("div", {}, f.evidence), h("div", { class: "action" }, `Try: ${f.action}`)))));
}

// ---- models ---------------------------------------------------------------------------

export async function modelsPage(view) {
  const list = await get("/models", { limit: 100 });
  view.replaceChildren(h("h1", {}, "Models"), table(["Model", "Version", "Aliases", "Val accuracy", "Created"],
    list.items.map((m) => h("tr", {}, h("td", {}, h("a", { href: `#/models/${m.id}` }, m.name)), h("td", {}, String(m.version)),
      h("td", {}, m.aliases.join(", ")), h("td", {}, m.task === "multi_label" ? `mAP ${pct(m.metrics?.best?.val_map)}` : pct(m.metrics?.best?.val_accuracy)), h("td", {}, when(m.created_at))))));
}

export async function modelPage(view, alert, id) {
  const [model, evaluation, card, cardFacts, all] = await Promise.all([get(`/models/${id}`),
    get(`/models/${id}/evaluation`), request("GET", `/models/${id}/card`).then((r) => r.text()),
    get(`/models/${id}/card`, { format: "json" }), get("/models", { limit: 100 })]);
  const split = evaluation.test?.num_images ? "test" : "val";  // held out to the end: first
  const e = evaluation[split] || {};
  // Refit on train+val: the model served has learned from the val images too.
  const valSeen = split === "val" && cardFacts.resolved?.refit?.value === true;
  const multi = model.task === "multi_label";
  // A multi-label model has precision-recall curves where a single-label one has a confusion matrix.
  const picture = (path, pictureId, alt) => {
    const img = h("img", { id: pictureId, alt });
    blobUrl(`/models/${id}/${path}`, { split }).then((url) => { img.src = url; }).catch(() => {});
    return img;
  };
  const results = h("div", { id: "predict-results" });
  // Explaining costs a backward pass per image: asked for, never by default.
  const explain = h("input", { type: "checkbox", id: "explain" });
  const predict = async (files) => {
    const form = new FormData();
    files.forEach((f) => form.append("files", f));
    const query = { ...(multi ? {} : { top_k: 3 }), ...(explain.checked ? { explain: "true" } : {}) };
    try {
      const out = await request("POST", `/models/${id}/predict`, { form, query });
      results.replaceChildren(...out.predictions.map((entry, i) =>
        predictionView(files[i].name, entry, multi, out.explanations?.[i])));
    } catch (error) { alert(plainError(error)); }
  };
  const aliasInput = h("input", { id: "alias-name", name: "alias", placeholder: "production", required: true, pattern: "[A-Za-z0-9_.-]+" });
  const setAlias = async (event) => {
    event.preventDefault();
    try { await request("PUT", `/models/aliases/${encodeURIComponent(aliasInput.value)}`, { json: { model: id } }); location.reload(); } catch (error) { alert(plainError(error)); }
  };
  const download = (format) => h("button", { type: "button", onclick: async () => {
    try {
      const response = await request("GET", `/models/${id}/download`, { query: { format } });
      const link = h("a", { href: URL.createObjectURL(await response.blob()), download: `model-${id}.${DOWNLOAD_SUFFIXES[format]}` });
      link.click();
    } catch (error) { alert(plainError(error)); }
  } }, format);
  const versions = all.items.filter((m) => m.name === model.name);
  const cardUrl = URL.createObjectURL(new Blob([card], { type: "text/markdown" }));
  view.replaceChildren(h("h1", {}, `${model.name} v${model.version}`),
    h("section", { class: "card" }, h("h2", {}, `Evaluation (${split}, ${e.num_images || 0} images${valSeen ? ", before the refit" : ""})`),
      valSeen ? refitNote() : null,
      multi ? h("p", { id: "accuracy" }, `mAP ${pct(e.mean_average_precision)}, micro F1 ${num(e.micro_f1, 3)}, macro F1 ${num(e.macro_f1, 3)}, ${calibrationText(e)}`)
        : h("p", { id: "accuracy" }, `Accuracy ${pct(e.accuracy)}, macro F1 ${num(e.macro_f1, 3)}, ${calibrationText(e)}`),
      multi ? table(["Class", "AP", "Precision", "Recall", "F1", "Positives"], (e.per_class || []).map((c) => h("tr", {},
        h("td", {}, c.class), h("td", {}, pct(c.average_precision)), h("td", {}, pct(c.precision)), h("td", {}, pct(c.recall)), h("td", {}, pct(c.f1)), h("td", {}, String(c.support)))))
        : table(["Class", "Precision", "Recall", "F1", "Images"], (e.per_class || []).map((c) => h("tr", {},
          h("td", {}, c.class ?? c.label ?? c.name), h("td", {}, pct(c.precision)), h("td", {}, pct(c.recall)), h("td", {}, pct(c.f1)), h("td", {}, String(c.support))))),
      h("div", { class: "pictures" },
        h("figure", {}, h("figcaption", {}, multi ? "Precision-recall curves" : "Confusion matrix"),
          multi ? picture("pr_curves.png", "pr-curves", `Precision-recall curves on ${split}`) : picture("confusion.png", "confusion", `Confusion matrix on ${split}`)),
        h("figure", {}, h("figcaption", {}, "Reliability (before and after calibration)"),
          picture("reliability.png", "reliability", `Reliability diagram on ${split}`)),
        // The worst files (highest loss), each with where the model looked for the class it gave.
        (e.highest_loss || e.worst || []).some((row) => row.overlay_png)
          ? h("figure", {}, h("figcaption", {}, "Worst files, explained (Grad-CAM)"),
            picture("worst.png", "worst", `Worst files on ${split} with their heat maps`)) : null)),
    h("section", { class: "card" }, h("h2", {}, "Predict"),
      h("label", { for: "explain" }, explain, " Explain: show where the evidence for the top class is (Grad-CAM)"),
      dropZone("Drop images here, or choose them", "image/*", true, predict), results),
    h("section", { class: "card" }, h("h2", {}, "Versions and aliases"),
      h("ul", {}, versions.map((m) => h("li", {}, h("a", { href: `#/models/${m.id}` }, `v${m.version}`), m.aliases.length ? ` (${m.aliases.join(", ")})` : ""))),
      h("form", { onsubmit: setAlias }, h("label", { for: "alias-name" }, `Point ${model.name}:ALIAS at this version`), aliasInput, h("button", { type: "submit" }, "Set alias"))),
    h("section", { class: "card" }, h("h2", {}, "Serving"), servingView(model.serving)),
    h("section", { class: "card" }, h("h2", {}, "Download"),
      Object.keys(DOWNLOAD_SUFFIXES).filter((f) => f !== "onnx-int8" || model.serving?.int8?.offered).map(download)),
    modelCard(card, `model-card-${model.name}-v${model.version}.md`, cardUrl));
  return () => URL.revokeObjectURL(cardUrl);
}

// Which engine runs the model's predictions here, why, and the int8 guard's verdict.
function servingView(serving) {
  const engine = serving.engine ?? "refused";
  return h("div", { id: "serving" },
    h("p", {}, `Engine: ${engine} (FTUNE_SERVE_ENGINE=${serving.policy}). ${serving.why}.`),
    serving.int8 ? h("p", {}, `int8: ${serving.int8.offered ? "offered" : "not offered"}: ${serving.int8.why}.`) : null);
}

function calibrationText(e) {
  const before = e.expected_calibration_error_uncalibrated;
  return before == null ? `calibration error (ECE) ${num(e.expected_calibration_error, 3)}`
    : `calibration error (ECE) ${num(before, 3)} before calibration, ${num(e.expected_calibration_error, 3)} after`;
}

// One image's prediction: a single-label model's top classes; a multi-label model's labels over
// their thresholds, marked among every class's score.
function predictionView(name, entry, multi, why) {
  const heatMap = why ? h("figure", { class: "explanation" },
    h("img", { src: `data:image/png;base64,${why.overlay_png}`, alt: `Where the evidence for ${why.label} is in ${name}` }),
    h("figcaption", {}, `Evidence for ${why.label}`)) : null;
  if (!multi) {
    return h("div", { class: "prediction" }, h("strong", {}, name),
      h("ol", {}, entry.map((p) => h("li", {}, h("span", { class: "label" }, p.label), ` ${pct(p.score)}`))), heatMap);
  }
  const over = new Set(entry.labels);
  return h("div", { class: "prediction multi" }, h("strong", {}, name),
    h("p", { class: "labels" }, entry.labels.length ? `Labels: ${entry.labels.join(", ")}` : "No label over its threshold"),
    h("ol", {}, entry.scores.map((p) => h("li", { class: over.has(p.label) ? "over" : "" },
      h("span", { class: "label" }, p.label), ` ${pct(p.score)}`, over.has(p.label) ? h("span", { class: "mark" }, " ✓ over threshold") : null))),
    heatMap);
}

// After a refit the model also learned from the val images: their scores (from the model
// before the refit) are no held-out measure of the model served. The job page's "Choices made
// for you" says so too; here it is next to the numbers.
function refitNote() {
  return h("p", { class: "caveat", id: "refit-note", role: "note" }, h("strong", {}, "Refit on train+val. "),
    "These scores are from the model before its head was trained again on train and val together: ",
    "the model you use has seen these val images, so they are no held-out measure of it. ",
    "Upload a dataset with a test split for that.");
}

// The card rendered (markdown.js builds text nodes only), with its Markdown source to read or
// download.
function modelCard(markdown, filename, href) {
  return h("section", { class: "card" }, h("h2", {}, "Model card"),
    h("div", { class: "model-card", id: "model-card" }, renderMarkdown(markdown, { headingOffset: 2 })),
    h("details", { id: "card-source" }, h("summary", {}, "Markdown source"),
      h("pre", { class: "card-markdown" }, markdown)),
    h("a", { class: "button", id: "card-download", download: filename, href }, "Download card (Markdown)"));
}
