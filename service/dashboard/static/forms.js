// The spec form, made from the API's own schema (GET /openapi.json): every field with its
// default and description; "auto" fields say what they will decide. 422 errors are placed
// next to the field they name.

// Fields the HTTP API always refuses (the service reads no path a client names): not offered.
const NOT_OVER_HTTP = new Set(["weights_path"]);

let schemaCache;

export async function specSchema() {
  if (!schemaCache) {
    const response = await fetch("/openapi.json");
    schemaCache = await response.json();
  }
  return schemaCache;
}

function resolve(schema, node) {
  while (node && node.$ref) node = schema.components.schemas[node.$ref.split("/").pop()];
  return node || {};
}

// Leaf fields of the spec as [path, fieldSchema], nested objects flattened ("optimizer.lr").
export function specFields(schema) {
  const fields = [];
  const walk = (node, prefix) => {
    for (const [name, raw] of Object.entries(resolve(schema, node).properties || {})) {
      const field = resolve(schema, raw);
      const path = prefix ? `${prefix}.${name}` : name;
      if (field.type === "object" && field.properties) walk(field, path);
      else fields.push([path, { ...raw, ...field, description: raw.description || field.description }]);
    }
  };
  walk(schema.components.schemas.FineTuneSpec, "");
  return fields;
}

function choices(schema, field) {
  const options = new Set();
  const visit = (node) => {
    node = resolve(schema, node);
    if (node.enum) node.enum.forEach((v) => options.add(v));
    if (node.const !== undefined) options.add(node.const);
    (node.anyOf || node.oneOf || []).forEach(visit);
  };
  visit(field);
  return [...options];
}

const id = (path) => `spec-${path.replace(/\./g, "-")}`;

export function renderSpecForm(schema, container, autoHints = {}) {
  container.replaceChildren();
  for (const [path, field] of specFields(schema)) {
    if (NOT_OVER_HTTP.has(path)) continue;
    const wrap = document.createElement("div");
    wrap.className = "field";
    wrap.dataset.path = path;
    const label = document.createElement("label");
    label.htmlFor = id(path);
    label.textContent = path;
    const input = document.createElement("input");
    input.id = id(path);
    input.name = path;
    const def = field.default;
    const options = choices(schema, field).filter((o) => o !== null);
    if (options.length && options.every((o) => typeof o === "string")) input.setAttribute("list", `${id(path)}-list`);
    input.placeholder = def === undefined ? "" : JSON.stringify(def);
    input.setAttribute("aria-describedby", `${id(path)}-help ${id(path)}-error`);
    const help = document.createElement("p");
    help.id = `${id(path)}-help`;
    help.className = "help";
    help.textContent = [field.description, def !== undefined ? `Default: ${JSON.stringify(def)}.` : "",
      def === "auto" && autoHints[path] ? `Will decide: ${autoHints[path]}.` : ""].filter(Boolean).join(" ");
    const error = document.createElement("p");
    error.id = `${id(path)}-error`;
    error.className = "field-error";
    wrap.append(label, input, help, error);
    if (input.getAttribute("list")) {
      const list = document.createElement("datalist");
      list.id = `${id(path)}-list`;
      for (const o of options) list.append(new Option(o, o));
      wrap.append(list);
    }
    container.append(wrap);
  }
}

// The spec the form describes: only the fields the user filled in (the rest stay default).
export function readSpecForm(container) {
  const spec = {};
  for (const input of container.querySelectorAll("input[name]")) {
    const raw = input.value.trim();
    if (!raw) continue;
    let value = raw;
    try { value = JSON.parse(raw); } catch { /* a plain string */ }
    const parts = input.name.split(".");
    let target = spec;
    for (const part of parts.slice(0, -1)) target = target[part] ??= {};
    target[parts.at(-1)] = value;
  }
  return spec;
}

// Each 422 error next to its field (loc ["spec", "optimizer", "lr"] -> optimizer.lr).
// Returns the inputs marked (in form order) and the messages that name no field, for the
// form's own summary.
export function showErrors(container, errors) {
  container.querySelectorAll(".field-error").forEach((e) => { e.textContent = ""; });
  container.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
  const unplaced = [];
  for (const err of errors) {
    const loc = (err.loc || []).filter((p) => typeof p === "string");
    if (loc[0] === "spec") loc.shift();
    let path = loc.join(".");
    let wrap = null;
    while (path && !(wrap = container.querySelector(`.field[data-path="${CSS.escape(path)}"]`))) {
      path = path.split(".").slice(0, -1).join(".");
    }
    if (!wrap) { unplaced.push(err.msg); continue; }
    const error = wrap.querySelector(".field-error");
    error.textContent = error.textContent ? `${error.textContent} ${err.msg}` : err.msg;
    wrap.querySelector("input").setAttribute("aria-invalid", "true");
  }
  return { invalid: [...container.querySelectorAll("input[aria-invalid]")], unplaced };
}
