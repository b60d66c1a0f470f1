// The API, with the key from sessionStorage in a header. Errors become ApiError with the
// API's own words (detail) and, for a 422, its list of bad fields (errors).

const KEY = "ftune.key";

export class ApiError extends Error {
  constructor(status, detail, errors) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.errors = errors || [];
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

function headers(extra = {}) {
  return { Authorization: `Bearer ${key.get()}`, ...extra };
}

async function failure(response) {
  let body = {};
  try { body = await response.json(); } catch { /* not JSON */ }
  const detail = typeof body.detail === "string" ? body.detail : response.statusText;
  return new ApiError(response.status, detail, body.errors);
}

export async function request(method, path, { json, form, query } = {}) {
  const url = new URL(`/v1${path}`, location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const init = { method, headers: headers() };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  const response = await fetch(url, init);
  if (!response.ok) throw await failure(response);
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response;
}

export const get = (path, query) => request("GET", path, { query });

// A protected picture or file as an object URL (an <img src> cannot send the key).
export async function blobUrl(path, query) {
  const response = await request("GET", path, { query });
  return URL.createObjectURL(await response.blob());
}

// Upload with progress: fetch cannot report upload progress, XMLHttpRequest can.
export function upload(file, name, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/datasets");
    xhr.setRequestHeader("Authorization", `Bearer ${key.get()}`);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body.detail || xhr.statusText, body.errors));
    };
    xhr.onerror = () => reject(new ApiError(0, "the upload could not reach the server"));
    const form = new FormData();
    form.append("file", file);
    if (name) form.append("name", name);
    xhr.send(form);
  });
}

// A job's (or, with collection "sweeps", a sweep's) events (server-sent events) read through
// fetch, so the key goes in a header: an EventSource cannot send one, and a key in the URL
// would end up in logs and history. Reconnects with Last-Event-ID until it ends or stop().
export function followEvents(jobId, onEvent, collection = "jobs") {
  const controller = new AbortController();
  let lastId = 0;
  let stopped = false;
  (async () => {
    while (!stopped) {
      try {
        const response = await fetch(`/v1/${collection}/${jobId}/events`, {
          headers: headers({ Accept: "text/event-stream", "Last-Event-ID": String(lastId) }),
          signal: controller.signal,
        });
        if (!response.ok) throw await failure(response);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const event = parseEvent(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
            if (!event) continue;
            lastId = event.id || lastId;
            onEvent(event);
            if (event.kind === "status" && ["succeeded", "failed", "cancelled", "pruned"]
              .includes(event.data.status)) { stopped = true; controller.abort(); return; }
          }
        }
      } catch (error) {
        if (stopped || error.name === "AbortError") return;
        if (error instanceof ApiError && error.status < 500) { onEvent({ error }); return; }
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
  })();
  return { stop() { stopped = true; controller.abort(); } };
}

function parseEvent(text) {
  const fields = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const at = line.indexOf(":");
    const name = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    fields[name] = name === "data" && fields.data ? `${fields.data}\n${value}` : value;
  }
  if (fields.data === undefined) return null;
  return { id: Number(fields.id || 0), kind: fields.event || "message", data: JSON.parse(fields.data) };
}
