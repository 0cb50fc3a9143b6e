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

function card(file) {
  const image = el("img", { class: "main", src: URL.createObjectURL(file), alt: file.name });
  image.addEventListener("error", () => { image.hidden = true; });  // not something the browser shows
  return el("div", { class: "card", "data-name": file.name },
    image, el("div", { class: "answer", text: "…" }), el("div", { class: "note", text: file.name }));
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
const healthReady = showModel().then(h => { health = h; return h; });
