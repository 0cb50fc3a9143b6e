// The exported model in the page, offline: onnxruntime-web (vendored beside this file) runs model.onnx.
// window.photohead.classify(url) -> {answer, label, probabilities, score, accepted}, with the meaning of
// `photohead predict --format json`: probabilities by label (calibrated), the rejection score, and the
// answer: the most probable label, or model.json's rejection label when the score is above the threshold.
"use strict";
(function () {
  ort.env.wasm.wasmPaths = "./";
  ort.env.wasm.numThreads = 1; // a static file server sends no cross-origin isolation headers
  const ready = (async () => {
    const meta = await (await fetch("model.json")).json();
    const session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
    return { meta, session };
  })();

  // RGB uint8 (1, H, W, 3) of a decoded image, upright (the browser applies the file's orientation)
  function pixels(source, width, height, canvas = document.createElement("canvas")) {
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d", { willReadFrequently: true });
    context.drawImage(source, 0, 0, width, height);
    const rgba = context.getImageData(0, 0, width, height).data;
    const rgb = new Uint8Array(width * height * 3);
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
      rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
    }
    return new ort.Tensor("uint8", rgb, [1, height, width, 3]);
  }

  async function run(image) {
    const { meta, session } = await ready;
    const out = await session.run({ image });
    const p = Array.from(out.probabilities.data);
    const score = out.score.data[0];
    const top = p.indexOf(Math.max(...p));
    const accepted = score <= meta.rejection.threshold;
    const probabilities = Object.fromEntries(meta.classes.map((c, i) => [c, p[i]]));
    return { answer: accepted ? meta.classes[top] : meta.rejection.label, label: meta.classes[top],
             probabilities, score, accepted };
  }

  async function classify(url) {
    const blob = await (await fetch(url)).blob();
    const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image" });
    try {
      return await run(pixels(bitmap, bitmap.width, bitmap.height));
    } finally {
      bitmap.close();
    }
  }

  function show(result, seconds) {
    document.getElementById("card").hidden = false;
    const answer = document.getElementById("answer");
    answer.textContent = result.answer;
    answer.className = "answer" + (result.accepted ? "" : " unknown");
    document.getElementById("detail").textContent = (result.accepted ? "" : "like none of the training photos; ")
      + `score ${result.score.toFixed(3)}, ${Math.round(seconds * 1000)} ms`;
    const bars = document.getElementById("bars");
    bars.replaceChildren(...Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]).map(([label, p]) => {
      const row = document.createElement("div");
      row.className = "bar";
      const name = document.createElement("span"); name.textContent = label;
      const track = document.createElement("span"); track.className = "track";
      const fill = document.createElement("span"); fill.className = "fill"; fill.style.width = `${(100 * p).toFixed(1)}%`;
      fill.style.display = "block";
      track.append(fill);
      const value = document.createElement("span"); value.textContent = `${(100 * p).toFixed(1)}%`;
      row.append(name, track, value);
      return row;
    }));
  }

  async function classifyFile(file) {
    const status = document.getElementById("status");
    const url = URL.createObjectURL(file);
    document.getElementById("video").hidden = true;
    const photo = document.getElementById("photo");
    photo.hidden = false;
    photo.src = url;
    try {
      const started = performance.now();
      show(await classify(url), (performance.now() - started) / 1000);
      status.textContent = "";
    } catch (error) {
      status.innerHTML = "";
      const line = document.createElement("span"); line.className = "error";
      line.textContent = `${file.name}: cannot read this photo (${error.message || error})`;
      status.append(line);
    }
  }

  // the webcam's frames, one after another: the last frame's pixels (as a lossless PNG) and its answer
  // stay readable through window.photohead.lastFrame(), so the live answer can be checked against predict
  const frame = { canvas: null, result: null, count: 0 };
  async function webcam() {
    const video = document.getElementById("video");
    video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
    video.hidden = false;
    document.getElementById("photo").hidden = true;
    const loop = async () => {
      if (video.videoWidth) {
        const started = performance.now();
        const canvas = document.createElement("canvas");
        const result = await run(pixels(video, video.videoWidth, video.videoHeight, canvas));
        Object.assign(frame, { canvas, result, count: frame.count + 1 });
        show(result, (performance.now() - started) / 1000);
      }
      requestAnimationFrame(loop);
    };
    loop();
  }
  function lastFrame() {
    return frame.result && { ...frame.result, frames: frame.count, png: frame.canvas.toDataURL("image/png") };
  }

  window.photohead = { classify, lastFrame, ready: ready.then(({ meta }) => meta) };
  ready.then(({ meta }) => {
    document.getElementById("model").textContent =
      `${meta.classes.join(", ")} · answers "${meta.rejection.label}" above score ${meta.rejection.threshold.toFixed(3)}`;
  }, error => { document.getElementById("model").textContent = `cannot load the model: ${error.message || error}`; });
  const drop = document.getElementById("drop");
  drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", e => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files.length) classifyFile(e.dataTransfer.files[0]);
  });
  document.getElementById("file").addEventListener("change", e => { if (e.target.files.length) classifyFile(e.target.files[0]); });
  document.getElementById("camera").addEventListener("click", () => webcam().catch(error => {
    document.getElementById("status").textContent = `no webcam: ${error.message || error}`;
  }));
})();
