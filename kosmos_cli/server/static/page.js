// The page at /: send a document to this server, watch its pages arrive with their boxes, text and
// confidence, and download the document files of the kept result. Plain JavaScript, no framework,
// no build step. It talks only to the server that served it (relative URLs; the Content-Security-
// Policy forbids any other host), and it puts record text into the page only as text (textContent,
// or the escaping markdown renderer): the text was written by whoever made the document.

import { renderMarkdown } from "./markdown.js";

// The confidence bins of the overlay PNGs (kosmos_cli/writers/overlay.py, CONFIDENCE_BINS), so that
// the page and the PNG overlays agree: the lowest confidence of the bin, its CSS class (page.css
// holds the colours: four of Okabe & Ito's colour-blind-safe set, surest first) and its label.
const BINS = [[0.95, "c0", "0.95-1"], [0.80, "c1", "0.80-0.95"], [0.50, "c2", "0.50-0.80"], [0, "c3", "0-0.50"]];
const UNKNOWN = ["cu", "unknown"];  // neutral grey: no confidence in the record
const KEY = "kosmos-api-key";  // sessionStorage: kept for this tab only
const SVG = "http://www.w3.org/2000/svg";
const TASK_LABELS = { ocr: "OCR: lines with their boxes", md: "Markdown", ground: "Grounded caption" };

const $ = (id) => document.getElementById(id);
const state = { info: null, key: sessionStorage.getItem(KEY), run: null, choices: [] };

/** An error whose message is already in plain words for the page. */
class Shown extends Error {}

// ------------------------------------------------------------------------------------------------
// Talking to the server
// ------------------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = state.key ? { Authorization: `Bearer ${state.key}` } : {};
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401) {
    askForKey(state.key !== null);
    throw new Shown(state.key !== null ? "The server refused the API key: enter it again above."
      : "This server needs its API key: enter it above.");
  }
  return response;
}

/** The plain words for a refused request: the server's own message, said what it means. */
async function problem(response) {
  let message = "";
  try {
    message = String((await response.json()).error ?? "");
  } catch {
    message = response.statusText;
  }
  switch (response.status) {
    case 400: return `The server refused the request: ${message}.`;
    case 404: return `Not found on the server: ${message}.`;
    case 413: return `Too large for this server: ${message}.`;
    case 422: return `The server cannot read this file: ${message}.`;
    case 429: {
      const wait = Number(response.headers.get("Retry-After"));
      return `The server is busy: ${message}.` + (wait ? ` Try again in ${wait} s.` : "");
    }
    case 503: return `The server is not ready: ${message || "try again shortly"}.`;
    default: return `The server answered ${response.status}${message ? ": " + message : ""}.`;
  }
}

/** Calls ``each`` with every record of an NDJSON answer as its line arrives. */
async function readRecords(response, each) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const parse = (line) => {
    try {
      return JSON.parse(line);
    } catch {
      throw new Shown("The server sent a line that is not a record; the pages shown so far stay here.");
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value ?? new Uint8Array(), { stream: !done });
    for (let end; (end = buffer.indexOf("\n")) >= 0; buffer = buffer.slice(end + 1)) {
      const line = buffer.slice(0, end);
      if (line.trim()) each(parse(line));
    }
    if (done) break;
  }
  if (buffer.trim()) each(parse(buffer));
}

// ------------------------------------------------------------------------------------------------
// The server, its key, its tasks
// ------------------------------------------------------------------------------------------------

function askForKey(refused) {
  $("key-why").textContent = refused ? "The server refused this API key. Enter it again; the page keeps it for this tab only."
    : "This server needs its API key. The page keeps it for this tab only.";
  if ($("key-form").hidden) {
    $("key-form").hidden = false;
    $("key").focus();
  }
}

async function loadInfo() {
  let response;
  try {
    response = await api("v1/info");
  } catch (err) {
    $("model").textContent = err instanceof Shown ? "This server needs its API key." : "The server cannot be reached.";
    if (!(err instanceof Shown)) showError("Cannot reach the server: is it still running? Reload the page to try again.");
    return;
  }
  if (!response.ok) {
    showError(await problem(response));
    return;
  }
  hideError();
  const info = await response.json();
  state.info = info;
  const kept = info.keep_results_minutes > 0 ? `results kept ${info.keep_results_minutes} min` : "no results kept";
  $("model").textContent = `${info.model} (${info.kind}) · uploads up to ${size(info.limits.max_upload_bytes)} · ${kept}`;
  state.choices = info.tasks.map((task) => ({ value: task, task, label: TASK_LABELS[task] ?? task }));
  if (info.kind === "kosmos-2.5" && info.tasks.includes("md") && /chat/i.test(info.model)) {
    state.choices.push({ value: "question", task: "md", label: "A question about the page" });
  }
  const select = $("task");
  select.replaceChildren(...state.choices.map((choice) => {
    const option = document.createElement("option");
    option.value = choice.value;
    option.textContent = choice.label;
    return option;
  }));
  taskChanged();
  $("run").disabled = false;
}

function choice() {
  return state.choices.find((c) => c.value === $("task").value);
}

function taskChanged() {
  const picked = choice();
  const field = $("prompt-field");
  field.hidden = !picked || (picked.task !== "ground" && picked.value !== "question");
  if (!field.hidden) {
    const question = picked.value === "question";
    $("prompt-label").textContent = question ? "Question" : "Prompt (empty: the model's, <grounding> An image of)";
    $("prompt").required = question;
  }
}

// ------------------------------------------------------------------------------------------------
// A run: send the file, show each page as its record arrives
// ------------------------------------------------------------------------------------------------

async function run(event) {
  event.preventDefault();
  hideError();
  if (!state.info) return loadInfo();
  const file = $("file").files[0];
  if (!file) return showError("Choose a PDF or an image first.");
  const limit = state.info.limits.max_upload_bytes;
  if (file.size > limit) {
    return showError(`${file.name} is ${size(file.size)}: larger than this server takes (${size(limit)}). Nothing was sent.`);
  }
  const picked = choice();
  const prompt = $("prompt").value.trim();
  if (picked.value === "question" && !prompt) return showError("Write the question to ask about each page.");
  const form = new FormData();
  form.append("file", file, file.name);
  if ($("pages").value.trim()) form.append("pages", $("pages").value.trim());
  if ($("dpi").value.trim()) form.append("dpi", $("dpi").value.trim());
  if (prompt && picked.task === "ground") form.append("prompt", prompt);
  if (prompt && picked.value === "question") form.append("question", prompt);

  if (state.run) state.run.controller.abort();
  clearResults();
  const current = { controller: new AbortController(), started: performance.now(), done: 0, total: 0, result: null,
    task: picked.task, stem: stem(file.name), urls: [], observer: null };
  state.run = current;
  const mine = () => state.run === current;
  $("view").hidden = false;
  $("legend").hidden = current.task === "md";
  $("md-view").hidden = current.task !== "md";
  $("stop").hidden = false;
  $("results").setAttribute("aria-busy", "true");
  setStatus(`Sending ${file.name}…`);
  try {
    const response = await api(`v1/${picked.task}`, { method: "POST", body: form, signal: current.controller.signal });
    if (!response.ok) {
      if (mine()) showError(await problem(response));
      if (mine()) setStatus("");
      return;
    }
    current.total = Number(response.headers.get("X-Kosmos-Pages")) || 0;
    current.result = response.headers.get("X-Kosmos-Result");
    if (current.result) {
      // Each page's image is fetched once its record is in and its page comes near the screen (the
      // server has it from then on; a long document is many renders).
      current.observer = new IntersectionObserver((entries) => {
        for (const entry of entries) {
          if (!entry.isIntersecting) continue;
          current.observer.unobserve(entry.target);
          loadImage(current, entry.target);
        }
      }, { rootMargin: "800px" });
    }
    progress(current);
    await readRecords(response, (record) => {
      if (!mine()) return;
      current.done += 1;
      addPage(current, record);
      progress(current);
    });
    if (!mine()) return;
    if (current.done < current.total) {
      showError(`The answer stopped after ${current.done} of ${current.total} pages: the connection to the server `
        + "was lost. The pages shown stay here; run the document again for the rest.");
    } else {
      finish(current);
    }
  } catch (err) {
    if (!mine()) return;
    if (err.name === "AbortError") {
      setStatus(`Stopped after ${current.done} of ${current.total} pages.`);
    } else if (err instanceof Shown) {
      showError(err.message);
    } else if (current.done > 0) {
      showError(`The connection to the server was lost after ${current.done} of ${current.total} pages. `
        + "The pages shown stay here; run the document again for the rest.");
    } else {
      showError("The connection to the server was lost, or it cannot be reached: is it still running? Try again.");
      setStatus("");
    }
  } finally {
    if (mine()) {
      $("stop").hidden = true;
      $("results").removeAttribute("aria-busy");
    }
  }
}

function progress(current) {
  const seconds = (performance.now() - current.started) / 1000;
  const rate = current.done / Math.max(seconds, 1e-3);
  const bar = $("progress");
  bar.hidden = false;
  bar.max = Math.max(current.total, 1);
  bar.value = current.done;
  setStatus(`${current.done} / ${current.total} pages · ${rate.toFixed(rate < 10 ? 2 : 1)} pages/s`);
}

function finish(current) {
  const seconds = (performance.now() - current.started) / 1000;
  setStatus(`Done: ${current.done} / ${current.total} pages in ${seconds.toFixed(1)} s `
    + `(${(current.done / Math.max(seconds, 1e-3)).toFixed(2)} pages/s).`);
  if (!current.result) {
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = state.info.keep_results_minutes > 0
      ? "The server kept no result for this document, so the pages show without their image and there is nothing to download."
      : "This server keeps no results (--keep-results 0), so the pages show without their image and there is nothing to download.";
    $("results").prepend(note);
    return;
  }
  showDownloads(current);
}

async function loadImage(current, sheet) {
  const img = sheet.querySelector("img");
  try {
    const response = await api(`v1/results/${encodeURIComponent(current.result)}/pages/${sheet.dataset.page}.png`);
    if (state.run !== current) return;
    if (!response.ok) {
      sheetNote(sheet, response.status === 404 ? "No page image: the server no longer keeps this result."
        : await problem(response));
      return;
    }
    // With an API key the image needs the Authorization header, so it comes by fetch and shows from
    // a blob: URL of this page (the policy allows img-src blob:, which stays on this machine).
    const url = URL.createObjectURL(await response.blob());
    current.urls.push(url);
    img.addEventListener("load", () => sheet.classList.add("loaded"), { once: true });
    img.src = url;
  } catch (err) {
    if (state.run === current) sheetNote(sheet, err instanceof Shown ? err.message : "No page image: the connection to the server was lost.");
  }
}

function sheetNote(sheet, text) {
  const note = sheet.parentElement.querySelector(".sheet-note");
  note.textContent = text;
  note.hidden = false;
}

// ------------------------------------------------------------------------------------------------
// One page: the image, its boxes in SVG, its text
// ------------------------------------------------------------------------------------------------

function bin(confidence) {
  if (typeof confidence !== "number" || !(confidence >= 0 && confidence <= 1)) return UNKNOWN;
  const [, cls, label] = BINS.find(([low]) => confidence >= low);
  return [cls, label];
}

function confidenceText(confidence) {
  return typeof confidence === "number" ? confidence.toFixed(2) : "unknown";
}

function element(tag, parent, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function addPage(current, record) {
  const section = element("section", $("results"), "page");
  const title = element("h2", null, null, `Page ${record.page}`);
  title.id = `page-${record.page}-title`;
  section.setAttribute("aria-labelledby", title.id);
  const head = element("div", section, "page-head");
  head.appendChild(title);
  element("span", head, "source", record.source ?? "");
  if (record.error) {
    element("p", section, "page-error", `This page failed: ${record.error}`);
    return;
  }
  const [cls] = bin(record.confidence);
  const conf = element("span", head, "page-conf");
  element("span", conf, `swatch ${cls}`).setAttribute("aria-hidden", "true");
  conf.append(`confidence ${confidenceText(record.confidence)}`);
  if (record.truncated) element("span", head, "flag", "cut at the token budget");

  const body = element("div", section, "page-body");
  const figure = element("div", body, "figure");
  const sheet = element("div", figure, "sheet");
  const width = record.width || 1, height = record.height || 1;
  sheet.style.aspectRatio = `${width} / ${height}`;
  if (current.result) sheet.dataset.page = String(record.page);
  const img = element("img", sheet, "page-img");
  img.alt = `Page ${record.page} as the model saw it`;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "group");
  svg.setAttribute("aria-label", `Boxes on page ${record.page}`);
  sheet.appendChild(svg);
  const note = element("p", figure, "sheet-note hint");
  note.hidden = true;
  if (current.observer) current.observer.observe(sheet);

  const text = element("div", body, "text");
  if (record.task === "md" || current.task === "md") {
    markdown(text, record.text ?? "");
  } else if ((record.entities ?? []).length || record.task === "ground") {
    grounded(svg, text, record);
  } else {
    lines(svg, text, record);
  }
}

function shape(svg, kind, confidence, label) {
  const node = document.createElementNS(SVG, kind);
  node.setAttribute("class", `shape ${bin(confidence)[0]}`);
  node.setAttribute("tabindex", "0");
  node.setAttribute("role", "img");
  node.setAttribute("aria-label", label);
  const tip = document.createElementNS(SVG, "title");
  tip.textContent = label;
  node.appendChild(tip);
  svg.appendChild(node);
  return node;
}

function item(list, text, confidence, label) {
  const li = element("li", list);
  li.tabIndex = 0;
  li.setAttribute("aria-label", label);
  element("span", li, `swatch ${bin(confidence)[0]}`).setAttribute("aria-hidden", "true");
  element("span", li, "item-text", text);
  element("span", li, "conf", confidenceText(confidence)).setAttribute("aria-hidden", "true");
  return li;
}

function lines(svg, text, record) {
  const found = (record.lines ?? []).filter((line) => Array.isArray(line.polygon) && line.polygon.length >= 6);
  if (!record.lines?.length) {  // no line of the page came with a box: its text as it is
    if (record.text) element("pre", text, "plain", record.text);
    else element("p", text, "hint", "No text found on this page.");
    return;
  }
  const list = element("ol", text, "lines");
  list.setAttribute("aria-label", `Lines of page ${record.page}`);
  record.lines.forEach((line, k) => {
    const label = `Line ${k + 1}: ${line.text} (confidence ${confidenceText(line.confidence)})`;
    const shapes = [];
    if (found.includes(line)) {
      const polygon = shape(svg, "polygon", line.confidence, label);
      const points = [];
      for (let i = 0; i + 1 < line.polygon.length; i += 2) points.push(`${line.polygon[i]},${line.polygon[i + 1]}`);
      polygon.setAttribute("points", points.join(" "));
      polygon.dataset.line = String(k);
      shapes.push(polygon);
    }
    const li = item(list, line.text, line.confidence, label);
    li.dataset.line = String(k);
    link(shapes, li);
  });
}

function grounded(svg, text, record) {
  element("p", text, "caption", record.text ?? "");
  const entities = record.entities ?? [];
  if (!entities.length) return;
  const list = element("ul", text, "entities");
  list.setAttribute("aria-label", `Grounded phrases of page ${record.page}`);
  entities.forEach((entity, k) => {
    const label = `${entity.text} (confidence ${confidenceText(entity.confidence)})`;
    // Pixel boxes where the record has them, else the normalised ones scaled to the page.
    const boxes = entity.pixel_boxes ?? (entity.boxes ?? []).map(([x0, y0, x1, y1]) =>
      [x0 * record.width, y0 * record.height, x1 * record.width, y1 * record.height]);
    const shapes = boxes.map(([x0, y0, x1, y1], b) => {
      const rect = shape(svg, "rect", entity.confidence,
        boxes.length > 1 ? `${label}, box ${b + 1} of ${boxes.length}` : label);
      rect.setAttribute("x", String(Math.min(x0, x1)));
      rect.setAttribute("y", String(Math.min(y0, y1)));
      rect.setAttribute("width", String(Math.abs(x1 - x0)));
      rect.setAttribute("height", String(Math.abs(y1 - y0)));
      rect.dataset.entity = String(k);
      return rect;
    });
    const li = item(list, entity.text, entity.confidence, label);
    li.dataset.entity = String(k);
    link(shapes, li);
  });
}

const markdownTexts = new WeakMap();

function markdown(text, value) {
  const box = element("div", text, "md");
  markdownTexts.set(box, value);
  showMarkdown(box);
}

function showMarkdown(box) {
  const value = markdownTexts.get(box);
  const rendered = document.querySelector("input[name=md-view]:checked")?.value !== "text";
  if (!value) box.replaceChildren(element("p", null, "hint", "No text on this page."));
  else box.replaceChildren(rendered ? renderMarkdown(value) : element("pre", null, "plain", value));
}

/** Hovering or focusing any of ``shapes`` or ``li`` highlights them all. */
function link(shapes, li) {
  const all = [...shapes, li];
  const hot = (on) => all.forEach((node) => node.classList.toggle("hot", on));
  for (const node of all) {
    node.addEventListener("mouseenter", () => hot(true));
    node.addEventListener("mouseleave", () => hot(node === document.activeElement));
    node.addEventListener("focus", () => hot(true));
    node.addEventListener("blur", () => hot(false));
  }
  for (const node of shapes) {  // a box clicked (or Enter on it): its line comes into view
    const show = () => li.scrollIntoView({ block: "nearest" });
    node.addEventListener("click", show);
    node.addEventListener("keydown", (event) => { if (event.key === "Enter") show(); });
  }
}

// ------------------------------------------------------------------------------------------------
// Downloads, messages, the rest
// ------------------------------------------------------------------------------------------------

function showDownloads(current) {
  const buttons = $("download-buttons");
  const names = (state.info.formats[current.task] ?? []).map((format) =>
    [`${current.stem}.${format === "alto" ? "alto.xml" : format}`, null]);
  names.push([`${current.stem}.jsonl`, ""]);  // the records again
  buttons.replaceChildren(...names.map(([name, path]) => {
    const button = element("button", null, "secondary", name);
    button.type = "button";
    button.setAttribute("aria-label", `Download ${name}`);
    const where = `v1/results/${encodeURIComponent(current.result)}` + (path === "" ? "" : `/${encodeURIComponent(name)}`);
    button.addEventListener("click", () => download(where, name));
    return button;
  }));
  $("downloads").hidden = false;
}

async function download(path, name) {
  hideError();
  let response;
  try {
    response = await api(path);
  } catch (err) {
    showError(err instanceof Shown ? err.message : `${name}: the connection to the server was lost. Try again.`);
    return;
  }
  if (response.status === 404) {
    showError(`${name}: the server no longer keeps this result (it keeps results ${state.info.keep_results_minutes} `
      + "minutes). Run the document again to download it.");
    return;
  }
  if (!response.ok) {
    showError(`${name}: ${await problem(response)}`);
    return;
  }
  // fetch + blob + <a download>: with an API key a plain link could not send the Authorization header.
  const url = URL.createObjectURL(await response.blob());
  const a = element("a", document.body);
  a.href = url;
  a.download = name;
  a.hidden = true;
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function clearResults() {
  const old = state.run;
  if (old) {
    old.observer?.disconnect();
    old.urls.forEach((url) => URL.revokeObjectURL(url));
  }
  $("results").replaceChildren();
  $("downloads").hidden = true;
  $("download-buttons").replaceChildren();
  $("progress").hidden = true;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

function size(bytes) {
  if (bytes >= 2 ** 20) return `${+(bytes / 2 ** 20).toFixed(1)} MB`;
  if (bytes >= 1024) return `${+(bytes / 1024).toFixed(1)} KB`;
  return `${bytes} bytes`;
}

/** The document files' name on the server: the upload's name without its suffix (Path.stem). */
function stem(name) {
  const dot = name.lastIndexOf(".");
  return (dot > 0 && dot < name.length - 1 ? name.slice(0, dot) : name) || "document";
}

function legend() {
  $("legend-list").replaceChildren(...[...BINS.map(([, cls, label]) => [cls, label]), UNKNOWN].map(([cls, label]) => {
    const li = element("li");
    element("span", li, `swatch ${cls}`).setAttribute("aria-hidden", "true");
    li.append(label);
    return li;
  }));
}

function wire() {
  $("run-form").addEventListener("submit", run);
  $("task").addEventListener("change", taskChanged);
  $("stop").addEventListener("click", () => state.run?.controller.abort());
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim() || null;
    if (state.key) sessionStorage.setItem(KEY, state.key);
    else sessionStorage.removeItem(KEY);
    $("key").value = "";
    $("key-form").hidden = true;
    loadInfo();
  });
  for (const radio of document.querySelectorAll("input[name=md-view]")) {
    radio.addEventListener("change", () => document.querySelectorAll("#results .md").forEach(showMarkdown));
  }
  const drop = $("drop");
  // A file dropped anywhere else must not make the browser leave the page to open it.
  for (const kind of ["dragover", "drop"]) document.addEventListener(kind, (event) => event.preventDefault());
  drop.addEventListener("dragover", () => drop.classList.add("over"));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    drop.classList.remove("over");
    if (event.dataTransfer?.files.length) {
      $("file").files = event.dataTransfer.files;
      $("drop-hint").textContent = `Dropped: ${event.dataTransfer.files[0].name}`;
    }
  });
  $("file").addEventListener("change", () => { $("drop-hint").textContent = "or drop a file on this box"; });
}

legend();
wire();
loadInfo();
