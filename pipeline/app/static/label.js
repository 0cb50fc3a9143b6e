// The label page: unlabelled photos in the order that teaches most (GET /api/label); a key files one.
"use strict";
let data = null, position = 0, labelled = 0;
const box = document.getElementById("current");
const pct = v => v == null ? "–" : (100 * v).toFixed(1) + "%";

async function load() {
  data = await api("/api/label");
  position = 0;
  document.getElementById("remaining").textContent = data.remaining;
  document.getElementById("keys").replaceChildren(...data.classes.slice(0, 9).flatMap((c, i) =>
    [el("kbd", { text: String(i + 1) }), " " + c + "  "]));
  document.getElementById("regime").textContent = data.regime === "typical"
    ? "Few photos are labelled yet: typical photos come first (one per cluster of look-alikes)."
    : data.regime === "uncertain" ? "The model's least certain photos come first, spread over clusters of look-alikes." : "";
  show();
}

function show() {
  const photo = data.photos[position];
  document.getElementById("queue").replaceChildren(...data.photos.slice(position + 1, position + 13).map(p =>
    el("figure", { "data-sha": p.sha256 }, el("img", { src: photoUrl(p.sha256, 96), alt: "" }))));
  if (!photo) { box.replaceChildren(el("p", { text: "Nothing left to label. Add photos to data.unlabelled, or retrain." })); return; }
  const guess = photo.suggested ? "Model's guess: " + photo.suggested.map(s => s.label + " " + pct(s.probability)).join(", ") : "";
  box.replaceChildren(el("div", { class: "finding", "data-sha": photo.sha256 },
    el("div", {}, el("img", { class: "big", src: photoUrl(photo.sha256, 768), alt: photo.path }), el("p", { class: "note", text: photo.path })),
    el("div", {}, el("p", { text: guess }), el("div", { class: "actions" },
      ...data.classes.slice(0, 9).map((c, i) => el("button", { "data-label": c, onclick: () => file(c), text: c + " (" + (i + 1) + ")" })),
      el("button", { onclick: skip, text: "Skip (N)" })))));
}

function skip() { position += 1; show(); }

async function file(label) {
  const photo = data.photos[position];
  if (!photo) return;
  try {
    await api("/api/decide", { method: "POST", headers: { "Content-Type": "application/json" },
                               body: JSON.stringify({ sha256: photo.sha256, action: "relabel", label }) });
    labelled += 1;
    document.getElementById("labelled").textContent = labelled;
    document.getElementById("remaining").textContent = data.remaining - labelled;
    skip();
  } catch (error) { box.append(el("p", { class: "error", text: error.message })); }
}

document.addEventListener("keydown", e => {
  if (e.ctrlKey || e.metaKey || e.altKey || !data) return;
  if (/^[1-9]$/.test(e.key) && data.classes[+e.key - 1]) file(data.classes[+e.key - 1]);
  else if (e.key.toLowerCase() === "n") skip();
});

document.getElementById("retrain").addEventListener("click", async () => {
  const out = document.getElementById("retrain-result");
  const button = document.getElementById("retrain");
  out.textContent = "retraining…"; button.disabled = true;
  try {
    const r = await api("/api/retrain", { method: "POST" });
    out.textContent = describeRetrain(r);
    out.dataset.before = r.val_accuracy_before; out.dataset.after = r.val_accuracy_after;
    document.getElementById("val").textContent = pct(r.val_accuracy_after);
    labelled = 0; document.getElementById("labelled").textContent = 0;
    await load(); showModel();
  } catch (error) { out.textContent = error.message; }
  button.disabled = false;
});
showModel().then(h => { if (h) document.getElementById("val").textContent = pct(h.val_accuracy); });
load().catch(error => box.replaceChildren(el("p", { class: "error", text: error.message })));
