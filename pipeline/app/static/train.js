// The train page: classes (POST/PATCH/DELETE /api/classes), photos into them (uploads, folders, paste, webcam
// bursts: POST /api/classes/{name}/photos), training with its progress (POST /api/train, then Server-Sent
// Events from /api/train/{job}/events), and the export panel (/api/export).
"use strict";
const list = document.getElementById("classes");
let chosen = null;  // the class a paste goes into: the one clicked last
let health = null;
let stream = null;

const enc = encodeURIComponent;

async function refresh() {
  const body = await api("/api/classes");
  list.replaceChildren(...body.classes.map(classCard));
  document.getElementById("empty").hidden = body.classes.length > 0;
  if (chosen && !body.classes.some(c => c.name === chosen)) chosen = null;
  markChosen();
  return body;
}

function markChosen() {
  for (const node of list.children) node.classList.toggle("chosen", node.dataset.name === chosen);
}

function classCard(c) {
  const status = el("p", { class: "note status" });
  const picker = el("input", { type: "file", accept: "image/*,.heic,.heif,.avif", multiple: "", hidden: "" });
  const folder = el("input", { type: "file", webkitdirectory: "", multiple: "", hidden: "" });
  const count = el("span", { class: "count", text: c.photos + " photo" + (c.photos === 1 ? "" : "s") });
  const record = el("button", { class: "record", text: "Hold to record", title: "webcam burst into " + c.name });
  const card = el("div", { class: "card class", "data-name": c.name, tabindex: "0" },
    el("div", { class: "head" }, el("b", { class: "name", text: c.name }), count),
    el("div", { class: "strip" }, ...c.thumbnails.map(sha => el("img", { src: photoUrl(sha, 96), alt: c.name }))),
    el("div", { class: "actions" },
      el("button", { text: "Add photos", onclick: () => picker.click() }),
      el("button", { text: "Add a folder", onclick: () => folder.click() }),
      record,
      el("button", { text: "Rename", onclick: () => rename(c.name) }),
      el("button", { text: "Delete", class: "danger", onclick: () => remove(c) })),
    picker, folder, status);
  const send = files => addPhotos(c.name, files, status);
  picker.addEventListener("change", () => { send(Array.from(picker.files)); picker.value = ""; });
  folder.addEventListener("change", () => { send(Array.from(folder.files)); folder.value = ""; });
  card.addEventListener("click", () => { chosen = c.name; markChosen(); });
  ["dragenter", "dragover"].forEach(t => card.addEventListener(t, e => { e.preventDefault(); card.classList.add("over"); }));
  ["dragleave", "drop"].forEach(t => card.addEventListener(t, e => { e.preventDefault(); card.classList.remove("over"); }));
  card.addEventListener("drop", async e => send(await droppedFiles(e.dataTransfer)));
  burst(record, c.name, status);
  return card;
}

// Files of a drop, whole folders included (their files, at any depth).
async function droppedFiles(transfer) {
  const entries = Array.from(transfer.items || []).map(i => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (!entries.length) return Array.from(transfer.files);
  const files = [];
  async function walk(entry) {
    if (entry.isFile) files.push(await new Promise((ok, bad) => entry.file(ok, bad)));
    else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {  // readEntries gives at most 100 at a time
        const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
        if (!batch.length) break;
        for (const child of batch) await walk(child);
      }
    }
  }
  for (const entry of entries) await walk(entry);
  return files;
}

// Photos go in batches that stay under the upload limit; a file alone over it is said, not sent.
async function addPhotos(name, files, status) {
  files = files.filter(f => !f.name.startsWith("."));
  if (!files.length) return;
  health = health || await api("/api/health").catch(() => null);
  const limit = (health && health.max_upload_mb || 20) * 1024 * 1024 * 0.9;
  const totals = { added: 0, duplicates: 0, skipped: [] };
  let batch = [], size = 0;
  const flush = async () => {
    if (!batch.length) return;
    const form = new FormData();
    for (const f of batch) form.append("files", f, f.name);
    batch = []; size = 0;
    try {
      const r = await api("/api/classes/" + enc(name) + "/photos", { method: "POST", body: form });
      totals.added += r.added; totals.duplicates += r.duplicates; totals.skipped.push(...r.skipped);
    } catch (error) { totals.skipped.push({ name: "a batch", reason: error.message }); }
    status.textContent = "adding… " + totals.added + " added";
  };
  for (const file of files) {
    if (file.size > limit) { totals.skipped.push({ name: file.name, reason: "over the upload limit" }); continue; }
    if (size + file.size > limit || batch.length >= 50) await flush();
    batch.push(file); size += file.size;
  }
  await flush();
  await refresh();
  const card = list.querySelector(`[data-name="${CSS.escape(name)}"] .status`);
  if (card) {
    card.textContent = `${totals.added} added, ${totals.duplicates} duplicate${totals.duplicates === 1 ? "" : "s"}` +
      (totals.skipped.length ? `, ${totals.skipped.length} skipped` : "");
    for (const s of totals.skipped.slice(0, 10)) card.append(el("br"), el("span", { class: "error", text: s.name + ": " + s.reason }));
  }
}

async function rename(old) {
  const name = prompt("New name of class " + old, old);
  if (name == null || name === old) return;
  try { await api("/api/classes/" + enc(old), { method: "PATCH", headers: { "Content-Type": "application/json" },
                                              body: JSON.stringify({ name }) }); chosen = name; }
  catch (error) { alert(error.message); }
  refresh();
}

async function remove(c) {
  if (!confirm(`Delete class ${c.name} and its ${c.photos} photos? The folder moves to the project's .trash folder.`)) return;
  try { await api("/api/classes/" + enc(c.name), { method: "DELETE" }); } catch (error) { alert(error.message); }
  refresh();
}

document.getElementById("new-class").addEventListener("submit", async e => {
  e.preventDefault();
  const input = document.getElementById("class-name"), error = document.getElementById("class-error");
  error.textContent = "";
  try {
    await api("/api/classes", { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify({ name: input.value }) });
    chosen = input.value; input.value = ""; refresh();
  } catch (err) { error.textContent = err.message; }
});

document.addEventListener("paste", e => {
  const files = Array.from(e.clipboardData.files);
  if (!files.length) return;
  if (!chosen) { alert("Click a class first: the pasted photo goes into it."); return; }
  const card = list.querySelector(`[data-name="${CSS.escape(chosen)}"] .status`);
  addPhotos(chosen, files, card);
});

// ---- webcam bursts: hold the button, N frames a second go into the class, a counter shows how many
async function openCamera() {
  if (stream) return stream;
  const note = document.getElementById("camera-note");
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
    document.getElementById("video").srcObject = stream;
    document.getElementById("webcam").hidden = false;
    note.textContent = "";
  } catch (error) { note.textContent = "No webcam: " + error.message; stream = null; }
  return stream;
}
document.getElementById("camera").addEventListener("click", openCamera);

function frame() {
  const video = document.getElementById("video");
  const canvas = el("canvas"); canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  return new Promise(ok => canvas.toBlob(blob => ok(new File([blob], "webcam-" + Date.now() + ".jpg",
                                                              { type: "image/jpeg" })), "image/jpeg", 0.92));
}

function burst(button, name, status) {
  let timer = null, taken = 0, pending = [];
  const start = async e => {
    e.preventDefault();
    if (timer || !(await openCamera())) return;
    const video = document.getElementById("video");
    if (!video.videoWidth) await new Promise(ok => video.addEventListener("loadeddata", ok, { once: true }));
    taken = 0;
    const rate = Math.max(1, Math.min(30, Number(document.getElementById("rate").value) || 5));
    const shoot = async () => {
      taken++; button.textContent = "Recording… " + taken;
      pending.push(await frame());
      if (pending.length >= rate) { const files = pending; pending = []; addPhotos(name, files, status); }
    };
    shoot();
    timer = setInterval(shoot, 1000 / rate);
  };
  const stop = () => {
    if (!timer) return;
    clearInterval(timer); timer = null;
    button.textContent = "Hold to record";
    const files = pending; pending = [];
    setTimeout(() => { addPhotos(name, files, status); status.textContent = taken + " frames recorded"; }, 50);
  };
  button.addEventListener("pointerdown", start);
  ["pointerup", "pointerleave", "pointercancel"].forEach(t => button.addEventListener(t, stop));
}

// ---- training, with its progress as Server-Sent Events
const trainButton = document.getElementById("train"), message = document.getElementById("train-message");
function showJob(job) {
  const bar = document.getElementById("progress"), fill = document.getElementById("progress-fill");
  const running = job.state === "queued" || job.state === "running";
  trainButton.disabled = running;
  message.textContent = job.message;
  message.className = job.state === "failed" ? "error" : "note";
  bar.hidden = !running;
  fill.style.width = job.total ? (100 * job.done / job.total).toFixed(1) + "%" : "100%";
  fill.classList.toggle("busy", running && !job.total);
  const figures = [];
  if (job.total) figures.push(`${job.done} of ${job.total} photos`);
  if (job.photos_per_second) figures.push(`${job.photos_per_second} photos/s`);
  if (running && job.seconds_left != null && job.total) figures.push(`${Math.ceil(job.seconds_left)} s left`);
  if (job.state === "done" && job.result && job.result.val_accuracy_after !== undefined) figures.push(describeRetrain(job.result));
  document.getElementById("train-figures").textContent = figures.join(" · ");
  document.body.dataset.job = job.state;
}

function follow(id) {
  return new Promise(done => {
    const events = new EventSource("/api/train/" + id + "/events");
    events.onmessage = e => {
      const job = JSON.parse(e.data);
      showJob(job);
      if (job.state === "done" || job.state === "failed") {
        events.close(); showModel(); refresh(); showExport(); done(job);
      }
    };
    events.onerror = () => { events.close(); api("/api/train/" + id).then(job => { showJob(job); done(job); }); };
  });
}

trainButton.addEventListener("click", async () => {
  try { const { job } = await api("/api/train", { method: "POST" }); showJob({ state: "queued", message: "starting…" }); follow(job); }
  catch (error) { message.textContent = error.message; message.className = "error"; }
});

// ---- export
async function showExport() {
  const state = document.getElementById("export-state"), formats = document.getElementById("formats");
  const e = await api("/api/export");
  if (!e.model) { state.textContent = "No model yet: train first."; formats.replaceChildren(); return; }
  state.textContent = e.current ? "The export is of the model served; every format below was checked against it on the test photos."
    : e.exported_model ? "The export is of an older model (" + e.exported_model.slice(0, 12) + "), not the one served: export again."
    : "Nothing exported yet.";
  formats.replaceChildren(...(e.current ? e.formats : []).map(f => el("div", { class: "format" },
    el("a", { href: "/api/export/" + enc(f.format), download: "", text: f.format + (f.zip ? ".zip" : "") }),
    el("span", { class: "note", text: " " + (f.bytes / 1e6).toFixed(1) + " MB" + (f.parity ?
      (f.parity.max_abs_diff != null ? ` · parity: max |diff| ${f.parity.max_abs_diff.toExponential(1)} (limit ${e.tolerance}), top-1 agreement ${(100 * f.parity.top1_agreement).toFixed(1)}% on ${f.parity.n_images} test photos` : "") : "") }),
    f.snippet ? el("pre", { text: f.snippet }) : null)));
}
document.getElementById("export").addEventListener("click", async () => {
  try { const { job } = await api("/api/export", { method: "POST" }); showJob({ state: "queued", message: "exporting…" }); await follow(job); }
  catch (error) { document.getElementById("export-state").textContent = error.message; }
});

refresh();
showModel();
showExport();
api("/api/train").then(r => { if (r.job) { showJob(r.job); if (!["done", "failed"].includes(r.job.state)) follow(r.job.id); } });
