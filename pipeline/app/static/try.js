// The try page: photos in, answers out (POST /api/predict, the same answers as `predict --format json`).
"use strict";
const results = document.getElementById("results");
const drop = document.getElementById("drop");
const picker = document.getElementById("files");
let health = null;

function bars(answer) {
  return answer.predictions.map(p => el("div", { class: "bar" },
    el("span", { class: "label", text: p.label, title: p.label }),
    el("div", { class: "track" }, (() => { const f = el("div", { class: "fill" }); f.style.width = (100 * p.probability).toFixed(1) + "%"; return f; })()),
    el("span", { class: "p", text: (100 * p.probability).toFixed(1) + "%" })));
}

// The correct-it loop: a photo answered wrongly goes, in one click, into the class it belongs to.
function addTo(file, note) {
  const classes = health && health.classes || [];
  return el("div", { class: "add-to" }, el("span", { class: "note", text: "Add to class: " }),
    ...classes.map(name => el("button", { text: name, class: "small", onclick: async () => {
      const form = new FormData();
      form.append("files", file, file.name || "photo.jpg");
      try {
        const r = await api("/api/classes/" + encodeURIComponent(name) + "/photos", { method: "POST", body: form });
        note.textContent = r.added ? `added to ${name}: Train to learn it` : r.duplicates ? `already in the project` :
          (r.skipped[0] || {}).reason || "not added";
      } catch (error) { note.textContent = error.message; }
    } })));
}

function card(file) {
  const image = el("img", { class: "main", src: URL.createObjectURL(file), alt: file.name });
  image.addEventListener("error", () => { image.hidden = true; });  // not something the browser shows
  const node = el("div", { class: "card", "data-name": file.name },
    image, el("div", { class: "answer", text: "…" }), el("div", { class: "note", text: file.name }));
  node.file = file;
  return node;
}

function fill(node, answer) {
  const head = node.querySelector(".answer");
  if (answer.error) {
    head.textContent = "not answered"; head.classList.add("unknown"); node.dataset.error = answer.error;
    node.append(el("p", { class: "error", text: answer.error })); return;
  }
  head.textContent = answer.answer;
  node.dataset.answer = answer.answer;
  if (!answer.accepted) {
    head.classList.add("unknown");
    node.append(el("p", { class: "note", text: "Unlike the training photos (score " + answer.score.toFixed(3) +
      " > threshold " + answer.threshold.toFixed(3) + "): none of the classes. Closest labels:" }));
  }
  node.append(...bars(answer));
  if (node.file) { const note = el("p", { class: "note added" }); node.append(addTo(node.file, note), note); }
  if (answer.neighbours && answer.neighbours.length) {
    node.append(el("p", { class: "note", text: "Nearest training photos:" }),
      el("div", { class: "neighbours" }, ...answer.neighbours.map(n => el("figure", {},
        el("img", { src: photoUrl(n.sha256, 192), alt: n.label }),
        el("figcaption", { text: n.label + " · " + n.similarity.toFixed(2) })))));
  }
}

// Each photo is its own request, so that one too large or unreadable answers alone; the cards of one
// drop keep its order, above the earlier ones.
async function send(files) {
  files = Array.from(files);
  if (!files.length) return;
  health = health || await healthReady;  // the upload limit, before anything is sent
  const nodes = files.map(card);
  results.prepend(...nodes);
  for (const [i, file] of files.entries()) {
    if (file.size === 0) { fill(nodes[i], { error: file.name + ": empty file (0 bytes)" }); continue; }
    const limit = health && health.max_upload_mb;
    if (limit && file.size > limit * 1024 * 1024) {  // what the server would refuse (413), said before sending
      fill(nodes[i], { error: `${file.name}: request body over ${limit} MB (serve.max_upload_mb)` });
      continue;
    }
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const answers = await api("/api/predict?neighbours=3&top_k=" + Math.min(5, health ? health.classes.length : 3),
                                { method: "POST", body: form });
      fill(nodes[i], answers[0]);
    } catch (error) {
      fill(nodes[i], { error: error.message.startsWith(file.name) ? error.message : file.name + ": " + error.message });
    }
  }
}

drop.addEventListener("click", () => picker.click());
drop.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") picker.click(); });
picker.addEventListener("change", () => { send(picker.files); picker.value = ""; });
["dragenter", "dragover"].forEach(t => drop.addEventListener(t, e => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach(t => drop.addEventListener(t, e => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", e => send(e.dataTransfer.files));
document.addEventListener("paste", e => send(Array.from(e.clipboardData.files)));

document.getElementById("camera").addEventListener("click", async () => {
  const note = document.getElementById("camera-note");
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: true });
    document.getElementById("video").srcObject = stream;
    document.getElementById("webcam").hidden = false;
  } catch (error) { note.textContent = "No webcam: " + error.message; }
});
document.getElementById("snap").addEventListener("click", () => {
  const video = document.getElementById("video");
  const canvas = el("canvas"); canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob(blob => send([new File([blob], "webcam-" + Date.now() + ".jpg", { type: "image/jpeg" })]), "image/jpeg", 0.92);
});
// The live preview: frame after frame, one request at a time, with the answers a second
let live = false;
function frameBlob() {
  const video = document.getElementById("video");
  const canvas = el("canvas"); canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  return new Promise(ok => canvas.toBlob(ok, "image/jpeg", 0.85));
}
async function liveLoop() {
  const times = [];
  let lastFrame = null;
  const adder = document.getElementById("live-add"), note = el("span", { class: "note" });
  adder.replaceChildren(...(health && health.classes || []).map(name => el("button", { class: "small", text: name,
    onclick: async () => {
      if (!lastFrame) return;
      const form = new FormData();
      form.append("files", new File([lastFrame], "webcam-" + Date.now() + ".jpg", { type: "image/jpeg" }));
      try { const r = await api("/api/classes/" + encodeURIComponent(name) + "/photos", { method: "POST", body: form });
            note.textContent = r.added ? " added to " + name : " already in the project"; }
      catch (error) { note.textContent = " " + error.message; }
    } })), note);
  while (live) {
    const blob = await frameBlob();
    const started = performance.now();
    try {
      const [answer] = await api("/api/predict?top_k=3", { method: "POST", body: blob, headers: { "Content-Type": "image/jpeg" } });
      lastFrame = blob;
      const head = document.getElementById("live-answer");
      head.textContent = answer.answer; head.classList.toggle("unknown", !answer.accepted);
      document.getElementById("live-bars").replaceChildren(...bars(answer));
      document.body.dataset.liveAnswer = answer.answer;
    } catch (error) { document.getElementById("live-answer").textContent = error.message; }
    const now = performance.now();
    times.push(now);
    while (times.length && times[0] < now - 1000) times.shift();
    document.getElementById("live-rate").textContent = times.length;
    document.getElementById("live-latency").textContent = (now - started).toFixed(0) + " ms a frame";
    document.body.dataset.liveFrames = String(Number(document.body.dataset.liveFrames || 0) + 1);
  }
}
document.getElementById("live").addEventListener("click", e => {
  live = !live;
  e.target.textContent = live ? "Stop the preview" : "Live preview";
  document.getElementById("live-panel").hidden = !live;
  if (live) liveLoop();
});

const healthReady = showModel().then(h => { health = h; return h; });
