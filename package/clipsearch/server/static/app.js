// The clipsearch page: reads the search from the URL, calls the JSON API, and renders the result grid.
"use strict";

// The server's /api/health states both limits (one default for the page, the CLI and the API);
// these stand in only until it answers, or if it cannot.
let maxTopK = 200;
let defaultTopK = 24;

const elements = {
  form: document.getElementById("search-form"),
  query: document.getElementById("query"),
  imageInput: document.getElementById("image-input"),
  topK: document.getElementById("top-k"),
  collectionInfo: document.getElementById("collection-info"),
  summary: document.getElementById("query-summary"),
  preview: document.getElementById("query-preview"),
  status: document.getElementById("status"),
  error: document.getElementById("error"),
  results: document.getElementById("results"),
  emptyHint: document.getElementById("empty-hint"),
  dropOverlay: document.getElementById("drop-overlay"),
  template: document.getElementById("result-template"),
  where: document.getElementById("where"),
  fieldList: document.getElementById("field-list"),
  terms: document.getElementById("terms"),
  refineForm: document.getElementById("refine-form"),
  refine: document.getElementById("refine"),
  more: document.getElementById("more"),
};
// The server's limits on paging and on the terms of one query (from /api/health).
let maxResults = 2000;
let maxTerms = 8;
// What the grid shows: the search, and how many of its results are on the page (for "More results").
let shown = { search: null, count: 0, update: null };

// Only the newest search may paint the grid; older responses arriving late are dropped.
let inFlight = null;
let previewUrl = null;
// The URL's own search waits for /api/health; one the user starts meanwhile must not be replaced by it.
let searchesStarted = 0;

function clampTopK(value) {
  const number = Number.parseInt(value, 10);
  if (!Number.isFinite(number)) return defaultTopK;
  return Math.min(maxTopK, Math.max(1, number));
}

// Refinements are terms added to the search (+) or subtracted from it (−): a collection item ("id:12",
// "id:12@3" for an id of update 3) or a word ("text:grass").
function termFromParam(value, weight) {
  const id = /^id:(\d+)(?:@(\d+))?$/.exec(value);
  if (id) return { kind: "id", id: id[1], update: id[2] ?? null, weight };
  if (value.startsWith("text:") && value.length > 5) return { kind: "text", text: value.slice(5), weight };
  return null;
}

function termParam(term) {
  if (term.kind === "text") return `text:${term.text}`;
  return term.update != null ? `id:${term.id}@${term.update}` : `id:${term.id}`;
}

// Filters are typed as one line, "taken>=2023-06-01; path~*/2023/*", and travel as one `where` each.
function parseWhere(text) {
  return text.split(";").map((part) => part.trim()).filter(Boolean);
}

// A search lives in the URL (?q=…, ?similar=ID, with &add=…, &sub=…, &where=…, &top_k=…) so any link reproduces it.
function searchFromUrl() {
  const params = new URLSearchParams(window.location.search);
  const topK = clampTopK(params.get("top_k") ?? defaultTopK);
  const terms = [
    ...params.getAll("add").map((value) => termFromParam(value, 1)),
    ...params.getAll("sub").map((value) => termFromParam(value, -1)),
  ].filter(Boolean);
  const where = params.getAll("where").filter(Boolean);
  if (params.has("similar")) {
    return { kind: "similar", id: params.get("similar"), update: params.get("update"), topK, terms, where };
  }
  if (params.get("q")) return { kind: "text", text: params.get("q"), topK, terms, where };
  return { kind: "none", topK, terms: [], where };
}

function urlForSearch(search) {
  const params = new URLSearchParams();
  if (search.kind === "text") params.set("q", search.text);
  if (search.kind === "similar") {
    params.set("similar", search.id);
    // Ids are rows of one update of the collection; the server maps an id of the update before.
    if (search.update != null) params.set("update", search.update);
  }
  for (const term of search.terms || []) params.append(term.weight > 0 ? "add" : "sub", termParam(term));
  for (const condition of search.where || []) params.append("where", condition);
  params.set("top_k", String(search.topK));
  return `${window.location.pathname}?${params}`;
}

function setPreview(url) {
  if (previewUrl && previewUrl.startsWith("blob:") && previewUrl !== url) URL.revokeObjectURL(previewUrl);
  previewUrl = url;
  elements.preview.hidden = !url;
  if (url) elements.preview.src = url;
  else elements.preview.removeAttribute("src");
}

function showError(message) {
  elements.error.textContent = message;
  elements.error.hidden = !message;
}

function describeSearch(search, response) {
  const count = shown.count;
  const noun = count === 1 ? "result" : "results";
  const fragment = document.createDocumentFragment();
  const strong = (text) => {
    const node = document.createElement("strong");
    node.textContent = text;
    return node;
  };
  // A combined query's answer names its terms; its first is the search's own text, item or image.
  const first = response.query.kind === "combined" ? response.query.terms[0] : response.query;
  if (search.kind === "text") {
    fragment.append(`${count} ${noun} for `, strong(`“${first.text ?? search.text}”`));
  } else if (search.kind === "similar") {
    fragment.append(`${count} images similar to `, strong(first.path ?? `item ${search.id}`));
  } else {
    fragment.append(`${count} images similar to `, strong(search.file?.name || "the image"));
  }
  if (search.where?.length) fragment.append(` where ${search.where.join(" and ")}`);
  return fragment;
}

// The refinements as chips, each removable; an item shows its thumbnail, a word itself.
function renderTerms(search) {
  const chips = (search.terms || []).map((term, position) => {
    const chip = document.createElement("li");
    chip.className = term.weight > 0 ? "term" : "term subtracted";
    chip.append(term.weight > 0 ? "+ " : "− ");
    if (term.kind === "id") {
      const image = document.createElement("img");
      image.alt = "";
      image.src = `/api/image/${encodeURIComponent(term.id)}?size=96${updateParameter(term)}`;
      chip.append(image);
    } else {
      chip.append(term.text);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.title = "Remove this refinement";
    remove.textContent = "×";
    remove.addEventListener("click", () => {
      const terms = search.terms.filter((_, index) => index !== position);
      runSearch({ ...search, terms }, { push: true });
    });
    chip.append(remove);
    return chip;
  });
  elements.terms.replaceChildren(...chips);
}

// "More like this" / "less" on a card, and the refine box: the current search with one more term.
function refineWith(term) {
  const search = shown.search;
  if (!search || search.kind === "none") return;
  if (1 + (search.terms?.length || 0) >= maxTerms) {
    showError(`A query takes at most ${maxTerms} terms; remove a refinement first.`);
    return;
  }
  runSearch({ ...search, terms: [...(search.terms || []), term], topK: clampTopK(elements.topK.value) }, { push: true });
}

function splitPath(path) {
  const cut = Math.max(path.lastIndexOf("/"), path.lastIndexOf("\\"));
  return cut < 0 ? ["", path] : [path.slice(0, cut + 1), path.slice(cut + 1)];
}

// Deep collection roots push the telling folders out of sight; the card title keeps the full path.
function shortFolder(folder) {
  const parts = folder.split(/[\\/]/).filter(Boolean);
  return parts.length > 3 ? `…/${parts.slice(-3).join("/")}/` : folder;
}

function renderResults(search, response, append) {
  const scores = response.results.map((result) => result.score);
  const best = Math.max(...scores, 1e-6);
  const worst = Math.min(...scores, 0);
  const cards = response.results.map((result) => {
    const card = elements.template.content.firstElementChild.cloneNode(true);
    const [folder, filename] = splitPath(result.path);
    const image = card.querySelector("img");
    image.src = result.thumbnail_url;
    image.alt = filename;
    card.querySelector(".rank").textContent = `#${result.rank}`;
    card.querySelector(".score").textContent = result.score.toFixed(3);
    // Bars are relative to this result list, since cosine scores of different models live on different scales.
    const share = best > worst ? (result.score - worst) / (best - worst) : 1;
    card.querySelector(".score-bar span").style.width = `${Math.round(8 + 92 * share)}%`;
    card.querySelector(".open").href = result.image_url || `/api/image/${result.id}`;
    card.querySelector(".filename").textContent = filename;
    card.querySelector(".folder").textContent = shortFolder(folder);
    card.querySelector(".meta").title = result.path;
    const fields = result.fields || {};
    showText(card.querySelector(".caption"), fields.caption);
    showText(card.querySelector(".taken"), fields.taken ? `taken ${fields.taken.replace("T", " ")}` : "");
    card.querySelector(".thumb").addEventListener("click", () => {
      const topK = clampTopK(elements.topK.value);
      const similar = { kind: "similar", id: String(result.id), update: response.update, topK, terms: [], where: currentWhere() };
      runSearch(similar, { push: true });
      window.scrollTo({ top: 0, behavior: "smooth" });
    });
    const item = { kind: "id", id: String(result.id), update: response.update };
    card.querySelector(".more-like").addEventListener("click", () => refineWith({ ...item, weight: 1 }));
    card.querySelector(".less-like").addEventListener("click", () => refineWith({ ...item, weight: -1 }));
    card.dataset.id = String(result.id);
    return card;
  });
  if (append) elements.results.append(...cards);
  else elements.results.replaceChildren(...cards);
  shown = { search, count: (append ? shown.count : 0) + cards.length, update: response.update };
  elements.more.hidden = response.results.length < search.topK || shown.count + search.topK > maxResults;
  elements.status.replaceChildren(describeSearch(search, response));
  renderTerms(search);
  elements.summary.hidden = false;
  elements.emptyHint.hidden = true;
}

function showText(element, text) {
  element.textContent = text || "";
  element.hidden = !text;
}

function currentWhere() {
  return parseWhere(elements.where.value);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (_) {
    // Not JSON (a proxy error page, say): fall through to the status line.
  }
  return `${response.status} ${response.statusText}`;
}

function updateParameter(search) {
  return search.update != null ? `&update=${encodeURIComponent(search.update)}` : "";
}

// A search of one term goes to its own endpoint; with refinements it is one POST /api/query of weighted terms.
function requestFor(search, offset) {
  const paging = new URLSearchParams({ top_k: String(search.topK) });
  if (offset) paging.set("offset", String(offset));
  for (const condition of search.where || []) paging.append("where", condition);
  if (!search.terms?.length) {
    if (search.kind === "text") return [`/api/search?q=${encodeURIComponent(search.text)}&${paging}`, {}];
    if (search.kind === "similar") {
      return [`/api/similar/${encodeURIComponent(search.id)}?${paging}${updateParameter(search)}`, {}];
    }
    const form = new FormData();
    form.append("image", search.file, search.file.name || "image");
    return [`/api/search/image?${paging}`, { method: "POST", body: form }];
  }
  const first = search.kind === "text" ? { text: search.text }
    : search.kind === "similar" ? idTerm(search) : { image: "image0" };
  const refinements = search.terms.map((term) => ({
    ...(term.kind === "text" ? { text: term.text } : idTerm(term)), weight: term.weight,
  }));
  const query = { terms: [{ ...first, weight: 1 }, ...refinements], top_k: search.topK, offset, where: search.where || [] };
  if (search.kind !== "image") {
    return ["/api/query", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(query) }];
  }
  const form = new FormData();
  form.append("query", JSON.stringify(query));
  form.append("image0", search.file, search.file.name || "image");
  return ["/api/query", { method: "POST", body: form }];
}

function idTerm(term) {
  const id = Number.parseInt(term.id, 10);
  const update = term.update != null ? Number.parseInt(term.update, 10) : null;
  return update != null && Number.isFinite(update) ? { id, update } : { id };
}

function showInForm(search) {
  elements.topK.value = String(search.topK);
  if (search.kind === "text") elements.query.value = search.text;
  if (search.kind !== "image") elements.imageInput.value = "";
  elements.where.value = (search.where || []).join("; ");
}

async function runSearch(search, { push, append = false }) {
  searchesStarted += 1;
  search = { terms: [], where: [], ...search };
  showInForm(search);
  if (search.kind === "none") return;

  // An uploaded image cannot live in a URL, so an image search keeps only top_k there.
  if (push) {
    const url = search.kind === "image" ? urlForSearch({ kind: "none", topK: search.topK }) : urlForSearch(search);
    window.history.pushState(null, "", url);
  }
  if (append) {
    // More of the same search: the preview, the title and the URL stay as they are.
  } else if (search.kind === "image") setPreview(URL.createObjectURL(search.file));
  else if (search.kind === "similar") setPreview(`/api/image/${encodeURIComponent(search.id)}?size=96${updateParameter(search)}`);
  else setPreview(null);
  document.title = search.kind === "text" ? `${search.text} · clipsearch` : "clipsearch";

  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  showError("");
  elements.results.classList.add("loading");
  elements.summary.hidden = false;
  if (!append) elements.status.textContent = "Searching…";
  elements.more.hidden = true;
  try {
    const [url, options] = requestFor(search, append ? shown.count : 0);
    const response = await fetch(url, { ...options, signal: controller.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    if (inFlight === controller) renderResults(search, body, append);
  } catch (error) {
    if (error.name === "AbortError") return;
    showError(error.message || String(error));
    if (!append) {
      elements.status.textContent = "";
      elements.results.replaceChildren();
    }
  } finally {
    if (inFlight === controller) {
      inFlight = null;
      elements.results.classList.remove("loading");
    }
  }
}

function searchByImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("That file is not an image.");
    return;
  }
  elements.query.value = "";
  runSearch({ kind: "image", file, topK: clampTopK(elements.topK.value), where: currentWhere() }, { push: true });
}

async function loadCollectionInfo() {
  try {
    const response = await fetch("/api/health");
    if (!response.ok) throw new Error(await errorMessage(response));
    const health = await response.json();
    const model = health.model || {};
    const name = [model.family, model.architecture].filter(Boolean).join(" · ");
    elements.collectionInfo.textContent =
      `${health.collection_size.toLocaleString()} images · ${name} · ${health.embedding_dim}-d`;
    const limits = health.limits || {};
    if (Number.isInteger(limits.max_top_k)) maxTopK = limits.max_top_k;
    if (Number.isInteger(limits.default_top_k)) defaultTopK = limits.default_top_k;
    if (Number.isInteger(limits.max_results)) maxResults = limits.max_results;
    if (Number.isInteger(limits.max_terms)) maxTerms = limits.max_terms;
    elements.topK.max = String(maxTopK);
    const fields = Object.keys(health.fields || {});
    elements.fieldList.textContent = fields.length ? `fields: ${fields.join(", ")}` : "";
    elements.fieldList.title = Object.entries(health.fields || {}).map(([name, kind]) => `${name}: ${kind}`).join("\n");
  } catch (error) {
    elements.collectionInfo.textContent = `Server unreachable (${error.message})`;
  }
}

elements.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = elements.query.value.trim();
  const topK = clampTopK(elements.topK.value);
  const where = currentWhere();
  if (text) {
    // The same words again keep their refinements; new words start a new search.
    const same = shown.search?.kind === "text" && shown.search.text === text;
    runSearch({ kind: "text", text, topK, where, terms: same ? shown.search.terms : [] }, { push: true });
  } else if (shown.search && shown.search.kind !== "text") {
    runSearch({ ...shown.search, topK, where }, { push: true });  // new filters for the item or image shown
  } else {
    showError("Type something to search for, or choose an image.");
  }
});

elements.refineForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = elements.refine.value.trim();
  if (!text) return;
  const weight = Number(event.submitter?.value || 1) < 0 ? -1 : 1;
  elements.refine.value = "";
  refineWith({ kind: "text", text, weight });
});

elements.more.addEventListener("click", () => {
  if (shown.search) runSearch(shown.search, { push: false, append: true });
});

elements.imageInput.addEventListener("change", () => searchByImage(elements.imageInput.files[0]));

// Dragging a file anywhere over the page offers an image search; the counter survives child enter/leave events.
let dragDepth = 0;
const carriesFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
window.addEventListener("dragenter", (event) => {
  if (!carriesFiles(event)) return;
  dragDepth += 1;
  elements.dropOverlay.hidden = false;
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) elements.dropOverlay.hidden = true;
});
window.addEventListener("dragover", (event) => {
  if (carriesFiles(event)) event.preventDefault();
});
window.addEventListener("drop", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  elements.dropOverlay.hidden = true;
  searchByImage(event.dataTransfer.files[0]);
});
window.addEventListener("paste", (event) => {
  const file = Array.from(event.clipboardData?.files || []).find((item) => item.type.startsWith("image/"));
  if (file) searchByImage(file);
});

window.addEventListener("popstate", () => {
  const search = searchFromUrl();
  if (search.kind === "none") {
    elements.results.replaceChildren();
    elements.summary.hidden = true;
    elements.emptyHint.hidden = false;
  }
  runSearch(search, { push: false });
});

// The form shows the URL's search at once, so an image dropped before /api/health answers gets the
// URL's top_k. The search itself waits for the server's limits, so a URL without top_k gets the
// server's default, unless the user has started a search of their own by then.
showInForm(searchFromUrl());
const searchesBeforeHealth = searchesStarted;
loadCollectionInfo().finally(() => {
  if (searchesStarted === searchesBeforeHealth) runSearch(searchFromUrl(), { push: false });
});
