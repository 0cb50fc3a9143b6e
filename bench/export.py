"""Exported model benchmark: single-image latency, batch throughput and size of every format.

    .venv/bin/python bench/export.py [--dataset dogs_vs_cats_1k] [--runs 50]

Trains the default pipeline (EfficientNet-Lite0 + logreg) on a shared dataset in a temporary
project, exports it twice (dynamic-range and int8 quantised TFLite beside the float formats),
then times each format in this process on the dataset's own JPEGs, decoded beforehand:
- latency: one photo at its own size (about 500 x 375), median over --runs photos; and one
  phone-sized photo (4032 x 3024, made by bench/harness.py), median over 10: the resize inside
  the model is part of it;
- throughput: batches of 32 of the photos resized beforehand to 224 x 224 (the resize does nothing)
  and to 500 x 375 (it does its work), images per second, median of 5 batches.
Results: a Markdown table on stdout and bench/results/export.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import DATASETS, ROOT, cli, require  # noqa: E402


def browser_latency(web: Path, photos: list[Path], phones: list[Path]) -> dict:
    """Median ms of ``window.photohead.classify`` in headless Chromium (the browser's decode included), on the
    page served by Python's static file server on 127.0.0.1; None where Chromium is not installed."""
    import re
    import shutil
    import subprocess
    import sys

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return {"photo": float("nan"), "phone": float("nan")}
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for i, path in enumerate(photos + phones):
        shutil.copy(path, web / f"bench_{i}.jpg")
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                               str(web)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = int(re.search(r"port (\d+)", server.stdout.readline()).group(1))
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/index.html")
        driver.set_script_timeout(600)
        timed = driver.execute_async_script("""
            const [names, done] = [arguments[0], arguments[1]];
            (async () => {
              await window.photohead.ready;
              await window.photohead.classify(names[0]);  // warm up
              const ms = [];
              for (const name of names) {
                const started = performance.now();
                await window.photohead.classify(name);
                ms.push(performance.now() - started);
              }
              return ms;
            })().then(done, e => done(String(e)));""", [f"bench_{i}.jpg" for i in range(len(photos) + len(phones))])
    finally:
        driver.quit()
        server.terminate()
    return {"photo": statistics.median(timed[:len(photos)]), "phone": statistics.median(timed[len(photos):])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="dogs_vs_cats_1k")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    root = DATASETS / args.dataset
    require(root)
    from harness import make_phone_images
    from PIL import Image

    from pipeline.data.decode import decode_rgb
    from pipeline.use import formats

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "params.yaml").write_text(json.dumps({"data": {"root": str(root)}}))
        cli(project, "train-head", "--with-upstream")
        cli(project, "export", "--set", "export.quantize=dynamic", "--set", "export.dir=models_dynamic")
        cli(project, "export", "--set", "export.quantize=int8", "--set", "export.dir=models")
        folder = project / "models"
        (folder / "model_dynamic.tflite").write_bytes((project / "models_dynamic" / "model_dynamic.tflite").read_bytes())
        parity = json.loads((folder / "model.json").read_text())["parity"]
        parity["model_dynamic.tflite"] = json.loads((project / "models_dynamic" / "model.json").read_text())[
            "parity"]["model_dynamic.tflite"]

        files = sorted(p for p in root.rglob("*.jpg"))[: args.runs]
        singles = [decode_rgb(p)[None] for p in files]
        phones = [decode_rgb(p)[None] for p in sorted(make_phone_images(200).rglob("*.jpg"))[:10]]

        def same_size_batch(width, height):
            return np.stack([np.asarray(Image.fromarray(s[0]).resize((width, height))) for s in singles[:32]])

        batches = {"224x224": same_size_batch(224, 224), "500x375": same_size_batch(500, 375)}

        names = ["model.keras", "saved_model", "model.tflite", "model_dynamic.tflite", "model_int8.tflite",
                 "model.onnx"]
        runners = {name: formats.FORMATS[name].runner(folder / name) for name in names}
        sizes = {name: sum(p.stat().st_size for p in (folder / name).rglob("*") if p.is_file())
                 if (folder / name).is_dir() else (folder / name).stat().st_size for name in names}
        browser = browser_latency(folder / "web", files, sorted(make_phone_images(200).rglob("*.jpg"))[:10])
        results = {}
        for name, run in runners.items():
            run(singles[0]), run(singles[1])  # warm up (tracing, allocation)
            latency = {}
            for label, images in (("photo", singles), ("phone", phones)):
                run(images[0])
                times = []
                for image in images:
                    started = time.perf_counter()
                    run(image)
                    times.append(time.perf_counter() - started)
                latency[label] = 1000 * statistics.median(times)
            throughput = {}
            for label, batch in batches.items():
                run(batch)
                rates = []
                for _ in range(5):
                    started = time.perf_counter()
                    run(batch)
                    rates.append(len(batch) / (time.perf_counter() - started))
                throughput[label] = statistics.median(rates)
            results[name] = {"latency_ms_median": latency, "batch32_images_per_second_median": throughput,
                             "size_mb": sizes[name] / 1e6, "parity": parity.get(name, {})}
        results["web (Chromium, onnxruntime-web)"] = {
            "latency_ms_median": browser, "batch32_images_per_second_median": {"224x224": None, "500x375": None},
            "size_mb": sum(p.stat().st_size for p in (folder / "web").iterdir()) / 1e6,
            "parity": parity.get("model.onnx", {})}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "export.json").write_text(json.dumps(results, indent=2))
    print("| format | size MB | latency, 1 photo ~500x375 (ms) | latency, 1 photo 4032x3024 (ms) "
          "| batch of 32 at 224x224 (img/s) | batch of 32 at 500x375 (img/s) | parity on the test split |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p = r["parity"]
        check = (f"max diff {p['max_abs_diff']:.1e}" if "dynamic" not in name and "int8" not in name
                 else f"top-1 agreement {100 * p['top1_agreement']:.1f}%") if p else ""
        lat, thr = r["latency_ms_median"], r["batch32_images_per_second_median"]
        rate = {k: "" if v is None else f"{v:.0f}" for k, v in thr.items()}
        print(f"| {name} | {r['size_mb']:.1f} | {lat['photo']:.1f} | {lat['phone']:.1f} | {rate['224x224']} | "
              f"{rate['500x375']} | {check} |")


if __name__ == "__main__":
    main()
