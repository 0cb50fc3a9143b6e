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
    from pipeline.use.export import _tflite_runner

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

        import keras
        import tensorflow as tf

        import pipeline.data.resize_layer  # noqa: F401

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
            key = name.split(" ")[0]
            results[name] = {"latency_ms_median": latency, "batch32_images_per_second_median": throughput,
                             "size_mb": sizes[name] / 1e6, "parity": parity.get(key, {})}
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
        print(f"| {name} | {r['size_mb']:.1f} | {lat['photo']:.1f} | {lat['phone']:.1f} | {thr['224x224']:.0f} | "
              f"{thr['500x375']:.0f} | {check} |")


if __name__ == "__main__":
    main()
