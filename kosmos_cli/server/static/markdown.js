// A small markdown renderer for the model's text. Whoever made the document wrote that text, so the
// renderer builds DOM nodes and puts text in them only as text (createTextNode / textContent): a tag
// in the text shows as the characters it is made of and never becomes HTML. It knows what Kosmos-2.5
// writes: headings, paragraphs, lists, block quotes, fenced code, tables and rules; inline code,
// strong, emphasis and backslash escapes. A link or an image shows as its text (the address as a
// tooltip): the page goes to no other host.

const FENCE = /^\s*(`{3,}|~{3,})/;
const HEADING = /^\s*(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^\s*(?:(?:\*\s*){3,}|(?:-\s*){3,}|(?:_\s*){3,})$/;
const QUOTE = /^\s*>\s?/;
const BULLET = /^\s*[-*+]\s+/;
const NUMBER = /^\s*(\d{1,9})[.)]\s+/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$/;

// Inline pieces, each alternative one capture group layout: code, strong, strong, emphasis,
// emphasis, image or link, escaped character.
const INLINE = new RegExp([
  "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",
  "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",
  "(?<![\\p{L}\\p{N}])__(?=\\S)([\\s\\S]*?\\S)__(?![\\p{L}\\p{N}])",
  "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",
  "(?<![\\p{L}\\p{N}])_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?![\\p{L}\\p{N}])",
  "(!?)\\[([^\\]\\n]*)\\]\\(([^()\\s]*)(?:\\s+\"[^\"\\n]*\")?\\)",
  "\\\\([\\\\`*_{}\\[\\]()#+\\-.!|>~<])",
].join("|"), "gu");

/** The markdown ``text`` as a DocumentFragment of safe nodes; headings start at level ``top``. */
export function renderMarkdown(text, top = 3) {
  const fragment = document.createDocumentFragment();
  blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment, top);
  return fragment;
}

function element(tag, parent, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (parent) parent.appendChild(node);
  return node;
}

function startsBlock(line, next) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || BULLET.test(line)
    || NUMBER.test(line) || (line.includes("|") && next !== undefined && TABLE_RULE.test(next) && next.includes("-"));
}

function blocks(lines, parent, top) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i += 1; continue; }
    let match;
    if ((match = FENCE.exec(line))) {
      const close = new RegExp("^\\s*" + match[1][0] + "{" + match[1].length + ",}\\s*$");
      const body = [];
      for (i += 1; i < lines.length && !close.test(lines[i]); i += 1) body.push(lines[i]);
      i += 1;  // the closing fence (or the end)
      element("code", element("pre", parent)).textContent = body.join("\n");
    } else if ((match = HEADING.exec(line))) {
      inline(match[2], element("h" + Math.min(6, top + match[1].length - 1), parent));
      i += 1;
    } else if (RULE.test(line)) {
      element("hr", parent);
      i += 1;
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      i = table(lines, i, parent);
    } else if (QUOTE.test(line)) {
      const body = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i += 1) body.push(lines[i].replace(QUOTE, ""));
      blocks(body, element("blockquote", parent), top);
    } else if (BULLET.test(line) || NUMBER.test(line)) {
      i = list(lines, i, parent);
    } else {
      const p = element("p", parent);
      for (let first = true; i < lines.length && lines[i].trim() && (first || !startsBlock(lines[i], lines[i + 1])); i += 1) {
        if (!first) element("br", p);
        inline(lines[i].trim(), p);
        first = false;
      }
    }
  }
}

function list(lines, i, parent) {
  const numbered = NUMBER.test(lines[i]);
  const marker = numbered ? NUMBER : BULLET;
  const node = element(numbered ? "ol" : "ul", parent);
  if (numbered) {
    const start = Number(NUMBER.exec(lines[i])[1]);
    if (start !== 1) node.start = start;
  }
  let item = null;
  for (; i < lines.length && lines[i].trim(); i += 1) {
    if (marker.test(lines[i])) {
      item = element("li", node);
      inline(lines[i].replace(marker, "").trim(), item);
    } else if (startsBlock(lines[i], lines[i + 1])) {
      break;
    } else {  // a line that continues the item
      element("br", item);
      inline(lines[i].trim(), item);
    }
  }
  return i;
}

function cells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(lines, i, parent) {
  const aligns = cells(lines[i + 1]).map((rule) =>
    rule.startsWith(":") && rule.endsWith(":") ? "center" : rule.endsWith(":") ? "right" : "");
  // A wide table scrolls inside its box, never the page.
  const node = element("table", element("div", parent, "table-wrap"));
  const head = element("tr", element("thead", node));
  cells(lines[i]).forEach((cell, k) => inline(cell, element("th", head, aligns[k])));
  const body = element("tbody", node);
  for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i += 1) {
    const row = element("tr", body);
    cells(lines[i]).forEach((cell, k) => inline(cell, element("td", row, aligns[k])));
  }
  return i;
}

function inline(text, parent) {
  let last = 0;
  INLINE.lastIndex = 0;
  for (let m; (m = INLINE.exec(text)) !== null;) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    last = INLINE.lastIndex;
    const [, ticks, code, strong1, strong2, em1, em2, bang, label, address, escaped] = m;
    if (ticks !== undefined) {
      element("code", parent).textContent = code;
    } else if (strong1 !== undefined || strong2 !== undefined) {
      inlineAgain(strong1 ?? strong2, element("strong", parent));
    } else if (em1 !== undefined || em2 !== undefined) {
      inlineAgain(em1 ?? em2, element("em", parent));
    } else if (label !== undefined) {
      const span = element("span", parent, bang ? "md-image" : "md-link");
      if (bang) span.textContent = `[image${label ? ": " + label : ""}]`;
      else inlineAgain(label, span);
      if (address) span.title = address;
    } else {
      parent.appendChild(document.createTextNode(escaped));
    }
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function inlineAgain(text, parent) {
  // INLINE is one global regex: keep the caller's place while the inside is parsed.
  const saved = INLINE.lastIndex;
  inline(text, parent);
  INLINE.lastIndex = saved;
}
