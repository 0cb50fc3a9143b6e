"""Exported model benchmark: single-image latency, batch throughput and size of every format.

    .venv/bin/python bench/export.py [--dataset dogs_vs_cats_1k] [--runs 50]

Trains the default pipeline (EfficientNet-Lite0 + logreg) on a shared dataset in a temporary
project, exports it twice (dynamic-range and int8 quantised TFLite beside the float formats),
then times each format in this process on the dataset's own JPEGs, decoded beforehand:
- latency: one image at its own size (about 500 x 375), the resize inside the model included;
  median over --runs images;
- throughput: batches of 32 images of 224 x 224, images per second, median of 5 batches.
Results: a Markdown table on stdout and bench/results/export.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT))


def cli(project: Path, *args: str) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pipeline", *args, "--params", str(project / "params.yaml")],
                         cwd=project, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="dogs_vs_cats_1k")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    root = DATASETS / args.dataset
    if not root.is_dir():
        raise SystemExit(f"no {root}; this benchmark needs the shared photo datasets")
    from pipeline.export import _tflite_runner
    from pipeline.images import decode_rgb

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "params.yaml").write_text(json.dumps({"data": {"root": str(root)}}))
        cli(project, "features")
        cli(project, "train-head")
        cli(project, "export", "--set", "export.quantize=dynamic", "--set", "export.dir=models_dynamic")
        cli(project, "export", "--set", "export.quantize=int8", "--set", "export.dir=models")
        folder = project / "models"
        (folder / "model_dynamic.tflite").write_bytes((project / "models_dynamic" / "model_dynamic.tflite").read_bytes())
        parity = json.loads((folder / "model.json").read_text())["parity"]
        parity["model_dynamic.tflite"] = json.loads((project / "models_dynamic" / "model.json").read_text())[
            "parity"]["model_dynamic.tflite"]

        files = sorted(p for p in root.rglob("*.jpg"))[: args.runs]
        singles = [decode_rgb(p, 224)[None] for p in files]
        batch = np.stack([np.asarray(s[0][:224, :224]) for s in singles[:32] if s.shape[1] >= 224 and s.shape[2] >= 224])
        batch = np.concatenate([batch] * (32 // len(batch) + 1))[:32]

        import keras
        import tensorflow as tf

        import pipeline.preprocessing  # noqa: F401

        keras_model = keras.saving.load_model(folder / "model.keras")
        traced = tf.function(lambda x: keras_model(x, training=False), reduce_retracing=True)
        serving = tf.saved_model.load(str(folder / "saved_model")).signatures["serve"]
        runners = {
            "model.keras (tf.function)": lambda x: traced(x).numpy(),
            "saved_model (serve)": lambda x: next(iter(serving(tf.constant(x)).values())).numpy(),
        }
        for name in ("model.tflite", "model_dynamic.tflite", "model_int8.tflite"):
            runners[name] = _tflite_runner(folder / name)
        sizes = {"model.keras (tf.function)": (folder / "model.keras").stat().st_size,
                 "saved_model (serve)": sum(p.stat().st_size for p in (folder / "saved_model").rglob("*") if p.is_file())}
        sizes.update({n: (folder / n).stat().st_size for n in ("model.tflite", "model_dynamic.tflite", "model_int8.tflite")})

        results = {}
        for name, run in runners.items():
            run(singles[0]), run(singles[1])  # warm up (tracing, allocation)
            latencies = []
            for image in singles:
                started = time.perf_counter()
                run(image)
                latencies.append(time.perf_counter() - started)
            run(batch)
            throughputs = []
            for _ in range(5):
                started = time.perf_counter()
                run(batch)
                throughputs.append(len(batch) / (time.perf_counter() - started))
            key = name.split(" ")[0]
            agreement = parity.get(key, {})
            results[name] = {"latency_ms_median": 1000 * statistics.median(latencies),
                             "batch32_images_per_second_median": statistics.median(throughputs),
                             "size_mb": sizes[name] / 1e6, "parity": agreement}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "export.json").write_text(json.dumps(results, indent=2))
    print("| format | size MB | latency, 1 image (ms, median) | batch of 32 (img/s, median) | parity on the test split |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        p = r["parity"]
        check = (f"max diff {p['max_abs_diff']:.1e}" if "dynamic" not in name and "int8" not in name
                 else f"top-1 agreement {100 * p['top1_agreement']:.1f}%") if p else ""
        print(f"| {name} | {r['size_mb']:.1f} | {r['latency_ms_median']:.1f} | "
              f"{r['batch32_images_per_second_median']:.0f} | {check} |")


if __name__ == "__main__":
    main()
