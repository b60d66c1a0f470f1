// The labelling view: a suggest job's images one at a time, large, the model's guess chosen
// already. Keys: 1-9 (or a class's first letter) choose, Enter confirms, S skips, Backspace
// goes back. "Train the next version" makes a dataset version from the labels given and
// starts a job on it with the spec of the job that made the model.

import { get, request } from "./api.js";
import { h, plainError } from "./views.js";

const SKIPPED = null;

export async function labelPage(view, alert, jobId, go) {
  const job = await get(`/jobs/${jobId}`);
  if (job.kind !== "suggest" || job.status !== "succeeded") {
    view.replaceChildren(h("h1", {}, "Label images"),
      h("p", {}, "Only a suggest job that has succeeded has images to label."));
    return null;
  }
  const model = await get(`/models/${job.spec.model_id}`);
  if (model.task === "multi_label") {
    view.replaceChildren(h("h1", {}, "Label images"), h("p", {}, "This view labels single-label "
      + "models' suggestions; for a multi-label dataset, send the label sets to POST /v1/datasets/{id}/versions."));
    return null;
  }
  const origin = await get(`/jobs/${model.job_id}`);  // its dataset and spec
  const items = job.suggestions || [];
  const classes = model.classes;
  const labels = items.map(() => undefined);  // a class, SKIPPED, or undefined: not seen
  let at = 0;
  let chosen = null;
  let shown = null;  // the image on screen, as a Blob (sent again to explain it)

  const picture = h("img", { id: "label-image", class: "label-image", alt: "" });
  const heat = h("img", { id: "label-heatmap", class: "label-image", alt: "", hidden: true });
  const where = h("p", { id: "label-path", class: "muted" });
  const counter = h("p", { id: "label-progress" });
  const buttons = classes.map((name, i) => h("button", {
    type: "button", "data-class": name, onclick: () => choose(name),
  }, h("kbd", {}, hint(i, name)), ` ${name}`));
  const confirm = h("button", { type: "button", id: "label-confirm", onclick: () => next(chosen) }, "Confirm (Enter)");
  const skip = h("button", { type: "button", id: "label-skip", onclick: () => next(SKIPPED) }, "Skip (S)");
  const back = h("button", { type: "button", id: "label-back", onclick: () => show(Math.max(0, at - 1)) }, "Back (Backspace)");
  const explain = h("button", { type: "button", id: "label-explain", onclick: showHeat }, "Show where the model looked");
  const train = h("button", { type: "button", id: "train-next", class: "primary", onclick: trainNext }, "Train the next version");
  const done = h("p", { id: "label-done", hidden: true });
  view.replaceChildren(h("h1", {}, `Label ${items.length} suggested images`),
    h("section", { class: "card labelling" }, counter, h("div", { class: "label-pictures" }, picture, heat), where,
      h("div", { id: "label-classes", class: "label-classes", role: "group", "aria-label": "Class" }, buttons),
      h("p", {}, confirm, " ", skip, " ", back, " ", explain), done),
    h("section", { class: "card" }, h("p", {}, `The labels make a new version of dataset ${origin.dataset_id.slice(0, 8)}; `
      + "its next job uses the spec of the job that trained this model."), train));

  function hint(i, name) { return i < 9 ? String(i + 1) : name[0].toUpperCase(); }
  function guessOf(item) { return item.guess?.[0]?.label ?? null; }
  function choose(name) {
    chosen = name;
    for (const button of buttons) button.setAttribute("aria-pressed", String(button.dataset.class === name));
  }
  function tally() {
    const given = labels.filter((l) => l !== undefined && l !== SKIPPED).length;
    const skipped = labels.filter((l) => l === SKIPPED).length;
    return { given, skipped };
  }
  async function show(index) {
    at = index;
    const { given, skipped } = tally();
    done.hidden = at < items.length;
    if (at >= items.length) {
      counter.textContent = `All ${items.length} seen: ${given} labelled, ${skipped} skipped`;
      done.textContent = "Done: train the next version, or go back to change a label.";
      train.focus();
      return;
    }
    const item = items[at];
    counter.textContent = `${at + 1} of ${items.length}: ${given} labelled, ${skipped} skipped`;
    where.textContent = `${item.path} (model's guess: ${guessOf(item)}, uncertainty ${item.uncertainty.toFixed(2)})`;
    choose(labels[at] ?? guessOf(item));
    heat.hidden = true;
    const path = item.path.split("/").map(encodeURIComponent).join("/");
    try {
      shown = await (await request("GET", `/datasets/${job.dataset_id}/images/${path}`)).blob();
      if (picture.src) URL.revokeObjectURL(picture.src);
      picture.src = URL.createObjectURL(shown);
    } catch (error) { alert(plainError(error)); }
    picture.alt = `Image ${at + 1}: ${item.path}`;
  }
  function next(label) {
    if (at >= items.length) return;
    if (label === undefined || (label !== SKIPPED && !classes.includes(label))) return;
    labels[at] = label;
    show(at + 1);
  }
  async function showHeat() {
    if (at >= items.length || !shown) return;
    try {
      const form = new FormData();
      form.append("files", shown, items[at].path.split("/").pop());
      const out = await request("POST", `/models/${model.id}/predict`, { form, query: { explain: "true" } });
      heat.src = `data:image/png;base64,${out.explanations[0].overlay_png}`;
      heat.alt = `Where the model looked for ${out.explanations[0].label}`;
      heat.hidden = false;
    } catch (error) { alert(plainError(error)); }
  }
  async function trainNext() {
    const given = Object.fromEntries(items.map((item, i) => [item.path, labels[i]])
      .filter(([, label]) => label !== undefined && label !== SKIPPED));
    if (!Object.keys(given).length) { alert("Label at least one image first."); return; }
    try {
      const version = await request("POST", `/datasets/${origin.dataset_id}/versions`,
        { json: { unlabeled_dataset_id: job.dataset_id, labels: given } });
      const next = await request("POST", "/jobs", { json: { dataset_id: version.id, spec: origin.spec } });
      go(`#/jobs/${next.id}`);
    } catch (error) { alert(plainError(error)); }
  }
  function onKey(event) {
    if (event.target.closest?.("input, textarea, select") || event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key;
    if (key === "Enter") { event.preventDefault(); next(chosen); return; }
    if (key === "Backspace") { event.preventDefault(); show(Math.max(0, at - 1)); return; }
    if (key.toLowerCase() === "s") { event.preventDefault(); next(SKIPPED); return; }
    if (/^[1-9]$/.test(key) && classes[Number(key) - 1] !== undefined) { choose(classes[Number(key) - 1]); return; }
    const byLetter = classes.findIndex((name) => name[0].toLowerCase() === key.toLowerCase());
    if (key.length === 1 && byLetter >= 0) choose(classes[byLetter]);
  }
  document.addEventListener("keydown", onKey);
  await show(0);
  return () => {
    document.removeEventListener("keydown", onKey);
    if (picture.src) URL.revokeObjectURL(picture.src);
  };
}
