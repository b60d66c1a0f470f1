// A small Markdown renderer for the subset model cards use (service/cards.py card_markdown):
// headings, paragraphs, "- " lists, pipe tables, fenced code, **bold**, `code` and
// [links](https://…). It builds DOM nodes and sets only textContent: whatever a card holds
// (class or dataset names come from uploads) is shown as text, never parsed as HTML.

const FENCE = /^```/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const ITEM = /^\s*[-*]\s+(.*)$/;
const TABLE_ROW = /^\s*\|.*\|\s*$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const INLINE = /(`+)([\s\S]*?)\1|\*\*([\s\S]+?)\*\*|\[([^\]]+)\]\(([^)\s]+)\)/g;
const SAFE_LINK = /^(https?:\/\/|#)/i;

function el(tag, ...children) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}

// Inline markup of one block's text, as nodes: text, <code>, <strong>, <a>.
function inline(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    if (m[1]) out.push(el("code", m[2]));
    else if (m[3] !== undefined) out.push(el("strong", ...inline(m[3])));
    else if (SAFE_LINK.test(m[5])) {
      const link = el("a", ...inline(m[4]));
      link.href = m[5];
      if (!m[5].startsWith("#")) link.rel = "noopener noreferrer";
      out.push(link);
    } else out.push(m[0]);  // a javascript: or other link stays plain text
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

// A table row's cells; "\|" is a pipe inside a cell.
function cells(line) {
  const inner = line.trim().replace(/^\|/, "").replace(/(?<!\\)\|$/, "");
  return inner.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function table(lines) {
  const [head, , ...body] = lines.map(cells);
  const row = (values, tag) => el("tr", ...values.map((v) => {
    const cell = el(tag, ...inline(v));
    if (tag === "th") cell.scope = "col";
    return cell;
  }));
  // In a scroller of its own, so a wide table scrolls instead of widening the page.
  const wrap = el("div", el("table", el("thead", row(head, "th")),
    el("tbody", ...body.map((values) => row(values, "td")))));
  wrap.className = "table-wrap";
  return wrap;
}

// Each block: [node, lines consumed]. headingOffset shifts levels (# -> h{1+offset}) so a
// card's headings sit under the page's own.
function block(lines, i, headingOffset) {
  const line = lines[i];
  if (FENCE.test(line)) {
    let end = i + 1;
    while (end < lines.length && !FENCE.test(lines[end])) end += 1;
    return [el("pre", el("code", lines.slice(i + 1, end).join("\n"))), end + 1 - i];
  }
  const heading = line.match(HEADING);
  if (heading) {
    const level = Math.min(6, heading[1].length + headingOffset);
    return [el(`h${level}`, ...inline(heading[2].trim())), 1];
  }
  if (TABLE_ROW.test(line) && TABLE_RULE.test(lines[i + 1] || "")) {
    let end = i + 2;
    while (end < lines.length && TABLE_ROW.test(lines[end])) end += 1;
    return [table(lines.slice(i, end)), end - i];
  }
  if (ITEM.test(line)) {
    let end = i;
    while (end < lines.length && ITEM.test(lines[end])) end += 1;
    return [el("ul", ...lines.slice(i, end).map((l) => el("li", ...inline(l.match(ITEM)[1])))),
      end - i];
  }
  let end = i;  // a paragraph: up to a blank line or another block's start
  while (end < lines.length && lines[end].trim() && (end === i || !starts(lines, end))) end += 1;
  // Each line break kept (cards put one fact a line: environment, then timings).
  const parts = lines.slice(i, end).flatMap((l, n) => [n ? el("br") : "", ...inline(l.trim())]);
  return [el("p", ...parts), end - i];
}

function starts(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || ITEM.test(line)
    || (TABLE_ROW.test(line) && TABLE_RULE.test(lines[i + 1] || ""));
}

// Markdown text -> a DocumentFragment of safe nodes.
export function renderMarkdown(text, { headingOffset = 0 } = {}) {
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  const fragment = document.createDocumentFragment();
  for (let i = 0; i < lines.length;) {
    if (!lines[i].trim()) { i += 1; continue; }
    const [node, used] = block(lines, i, headingOffset);
    fragment.append(node);
    i += used;
  }
  return fragment;
}
