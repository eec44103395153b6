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
};

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

// A search lives in the URL (?q=…&top_k=… or ?similar=ID&top_k=…) so any link reproduces it.
function searchFromUrl() {
  const params = new URLSearchParams(window.location.search);
  const topK = clampTopK(params.get("top_k") ?? defaultTopK);
  if (params.has("similar")) return { kind: "similar", id: params.get("similar"), update: params.get("update"), topK };
  if (params.get("q")) return { kind: "text", text: params.get("q"), topK };
  return { kind: "none", topK };
}

function urlForSearch(search) {
  const params = new URLSearchParams();
  if (search.kind === "text") params.set("q", search.text);
  if (search.kind === "similar") {
    params.set("similar", search.id);
    // Ids are rows of one update of the collection; the server maps an id of the update before.
    if (search.update != null) params.set("update", search.update);
  }
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
  const count = response.results.length;
  const noun = count === 1 ? "result" : "results";
  const fragment = document.createDocumentFragment();
  const strong = (text) => {
    const node = document.createElement("strong");
    node.textContent = text;
    return node;
  };
  if (search.kind === "text") {
    fragment.append(`${count} ${noun} for `, strong(`“${response.query.text}”`));
  } else if (search.kind === "similar") {
    fragment.append(`${count} images similar to `, strong(response.query.path));
  } else {
    fragment.append(`${count} images similar to `, strong(response.query.filename));
  }
  return fragment;
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

function renderResults(search, response) {
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
    card.querySelector(".thumb").addEventListener("click", () => {
      const similar = { kind: "similar", id: String(result.id), update: response.update, topK: clampTopK(elements.topK.value) };
      runSearch(similar, { push: true });
      window.scrollTo({ top: 0, behavior: "smooth" });
    });
    card.dataset.id = String(result.id);
    return card;
  });
  elements.results.replaceChildren(...cards);
  elements.status.replaceChildren(describeSearch(search, response));
  elements.summary.hidden = false;
  elements.emptyHint.hidden = true;
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

function requestFor(search) {
  const topK = encodeURIComponent(search.topK);
  if (search.kind === "text") {
    return [`/api/search?q=${encodeURIComponent(search.text)}&top_k=${topK}`, {}];
  }
  if (search.kind === "similar") {
    return [`/api/similar/${encodeURIComponent(search.id)}?top_k=${topK}${updateParameter(search)}`, {}];
  }
  const form = new FormData();
  form.append("image", search.file, search.file.name || "image");
  return [`/api/search/image?top_k=${topK}`, { method: "POST", body: form }];
}

function showInForm(search) {
  elements.topK.value = String(search.topK);
  if (search.kind === "text") elements.query.value = search.text;
  if (search.kind !== "image") elements.imageInput.value = "";
}

async function runSearch(search, { push }) {
  searchesStarted += 1;
  showInForm(search);
  if (search.kind === "none") return;

  // An uploaded image cannot live in a URL, so an image search keeps only top_k there.
  if (push) {
    const url = search.kind === "image" ? urlForSearch({ kind: "none", topK: search.topK }) : urlForSearch(search);
    window.history.pushState(null, "", url);
  }
  if (search.kind === "image") setPreview(URL.createObjectURL(search.file));
  else if (search.kind === "similar") setPreview(`/api/image/${encodeURIComponent(search.id)}?size=96${updateParameter(search)}`);
  else setPreview(null);
  document.title = search.kind === "text" ? `${search.text} · clipsearch` : "clipsearch";

  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  showError("");
  elements.results.classList.add("loading");
  elements.summary.hidden = false;
  elements.status.textContent = "Searching…";
  try {
    const [url, options] = requestFor(search);
    const response = await fetch(url, { ...options, signal: controller.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    if (inFlight === controller) renderResults(search, body);
  } catch (error) {
    if (error.name === "AbortError") return;
    showError(error.message || String(error));
    elements.status.textContent = "";
    elements.results.replaceChildren();
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
  runSearch({ kind: "image", file, topK: clampTopK(elements.topK.value) }, { push: true });
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
    elements.topK.max = String(maxTopK);
  } catch (error) {
    elements.collectionInfo.textContent = `Server unreachable (${error.message})`;
  }
}

elements.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = elements.query.value.trim();
  const topK = clampTopK(elements.topK.value);
  if (text) {
    runSearch({ kind: "text", text, topK }, { push: true });
  } else {
    showError("Type something to search for, or choose an image.");
  }
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
