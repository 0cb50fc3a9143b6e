// Shared by the app's pages: the API with this server's same-origin token, small DOM helpers.
"use strict";
const TOKEN = document.querySelector('meta[name="csrf"]').content;

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (options.method && options.method !== "GET") headers["X-CSRF-Token"] = TOKEN;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const body = await response.json().catch(() => ({
    error: response.status === 413 ? "request body over the app's limit (serve.max_upload_mb)" : response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

// A retrain's result in words: val accuracy before and after as the photos behind them, so that a change of
// one photo reads as one photo (on 68 val photos, 95.6% -> 94.1% is 65 -> 64 right), not as a trend.
function describeRetrain(r) {
  const pct = v => v == null ? "–" : (100 * v).toFixed(1) + "%";
  const right = (acc, n) => acc == null || !n ? null : Math.round(acc * n);
  const before = right(r.val_accuracy_before, r.val_photos_before), after = right(r.val_accuracy_after, r.val_photos_after);
  let change = "";
  if (before != null && after != null) {
    const moved = after - before;
    change = ` (${before} → ${after} of ${r.val_photos_after} val photos right` +
      (r.val_photos_before === r.val_photos_after && Math.abs(moved) <= 1 && moved !== 0
        ? `: one photo, within what ${r.val_photos_after} photos can tell)` : ")");
  }
  return "val accuracy " + pct(r.val_accuracy_before) + " → " + pct(r.val_accuracy_after) + change + ", " +
    r.train_photos_before + " → " + r.train_photos_after + " train photos (" + r.seconds + " s)";
}

function photoUrl(sha, size = 192) { return "/photo/" + sha + "?size=" + size; }

function neighbourStrip(items) {
  return el("div", { class: "strip" }, ...items.map(n => el("figure", {},
    el("img", { src: photoUrl(n.sha256, 96), alt: n.label, title: "similarity " + n.similarity }),
    el("figcaption", { text: n.label + " · " + n.similarity.toFixed(2) }))));
}

async function showModel() {
  try {
    const health = await api("/api/health");
    if (health.status === "untrained") {
      document.getElementById("model").textContent = "no model yet: add classes and photos, then Train";
      return health;
    }
    const val = health.val_accuracy == null ? "" : ", val accuracy " + (100 * health.val_accuracy).toFixed(1) + "%";
    document.getElementById("model").textContent =
      health.rung + " model on " + health.backbone + ", " + health.classes.length + " classes" + val;
    return health;
  } catch (error) {
    document.getElementById("model").textContent = "model unavailable: " + error.message;
    return null;
  }
}
