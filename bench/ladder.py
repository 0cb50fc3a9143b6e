"""The ladder on real photos: cache size per cut point, train-top speed against running the frozen
layers every epoch, and the accuracy and training time of each rung on one test split.

    .venv/bin/python bench/ladder.py [--dataset cat_breeds_web5] [--cut-points block15 block14 block10]

In this process, with EfficientNet-Lite0 and the default 70/15/15 hash split:
1. the features stage at `pooled` and at each cut point (float16 spatial maps): MB per image;
2. seconds per epoch of the same trainable model (layers above the cut + softmax) fed from the
   cut-point cache, and fed from pre-decoded images through the frozen layers (the frozen part
   runs every epoch; decoding is not counted): median of 3 epochs each, and the ratio;
3. head (logreg, C by CV), head (softmax with a 256-unit hidden layer), train-top at each cut
   point, and finetune (2 epochs per phase, to bound the time on a CPU): test accuracy, balanced
   accuracy, training seconds.
Results: Markdown on stdout and bench/results/ladder.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import DATASETS, ROOT, require  # noqa: E402

from pipeline import layout
from pipeline import params as params_mod  # noqa: E402
from pipeline.project import open_project
from pipeline.stages import evaluate, features, finetune, train_head, train_top  # noqa: E402
from pipeline.store import table as feature_store  # noqa: E402


def epoch_seconds(model, x, y, epochs=3) -> float:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(x, y, batch_size=32, epochs=epochs + 1, verbose=0, callbacks=[Timer()])
    return statistics.median(times[1:])  # the first epoch includes tracing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cat_breeds_web5")
    parser.add_argument("--cut-points", nargs="+", default=["block15", "block14", "block10"])
    args = parser.parse_args()
    root = DATASETS / args.dataset
    require(root)
    out: dict = {"dataset": args.dataset, "cache": {}, "speed": {}, "rungs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        params = params_mod.build({"data": {"root": str(root)}}, "bench")
        pooled = features.run(open_project(params, base))
        out["cache"]["pooled (float32)"] = pooled.path.stat().st_size / pooled.n_rows / 1e3
        for cut in args.cut_points:
            p = params_mod.build({"data": {"root": str(root)}, "train_top": {"cut_point": cut}}, "bench")
            result = features.run_top(open_project(p, base))
            shape = feature_store.read_attrs(result.path)["feature_shape"]
            out["cache"][f"{cut} {tuple(shape)} (float16, gzip)"] = result.path.stat().st_size / result.n_rows / 1e3

        # 2. epoch time: cached activations vs the frozen layers run every epoch
        import keras

        from pipeline.backbones import keras_models as backbones
        from pipeline.data.decode import decode_rgb
        from pipeline.data.resize_layer import single_image_resizer

        out["speed"] = []
        for cut in args.cut_points:
            p = params_mod.build({"data": {"root": str(root)}, "train_top": {"cut_point": cut}}, "bench")
            table = feature_store.read_table(layout.top_cache_file(p, base))
            train = table.splits == "train"
            x_cut, labels, paths = table.features[train], table.labels[train], table.paths[train]
            classes = sorted(set(labels))
            y = np.array([classes.index(c) for c in labels])
            full = backbones.build("efficientnet_lite0", layer="pooled", weights_dir=base / "cache" / "weights")
            top = train_top.build_top(full.model, cut)
            cached_model = keras.Sequential([keras.Input(x_cut.shape[1:]), top,
                                             keras.layers.Dense(len(classes), activation="softmax")])
            cached = epoch_seconds(cached_model, x_cut, y)
            resize = single_image_resizer(224, "squash")
            images = np.stack([resize(decode_rgb(root / path)) for path in paths])
            frozen = keras.Model(full.model.input, full.model.get_layer(cut).output)
            frozen.trainable = False
            end_to_end = keras.Sequential([keras.Input((224, 224, 3)), frozen, top,
                                           keras.layers.Dense(len(classes), activation="softmax")])
            uncached = epoch_seconds(end_to_end, images, y)
            out["speed"].append({"cut_point": cut, "train_images": int(len(y)), "cached_seconds_per_epoch": cached,
                                 "frozen_layers_every_epoch_seconds": uncached, "ratio": uncached / cached})
            del images

        # 3. every rung on one split
        setups = {
            "head: logreg, C by CV": ({"train_head": {"model": "logreg", "search_C": True}}, "head"),
            "head: softmax + hidden 256": ({"train_head": {"model": "softmax", "hidden_units": [256],
                                                           "learning_rate": 0.001}}, "head"),
        }
        for cut in args.cut_points:
            setups[f"train-top above {cut}"] = ({"train_top": {"cut_point": cut}}, "top")
        setups["finetune (2 + 2 epochs)"] = ({"finetune": {"epochs_head": 2, "epochs_all": 2}}, "finetune")
        stages = {"head": train_head.run, "top": train_top.run, "finetune": finetune.run}
        for label, (overrides, rung) in setups.items():
            p = params_mod.build({"data": {"root": str(root)}, "train": {"strategy": rung}, **overrides}, "bench")
            model = stages[rung](p, base).classifier
            result = evaluate.run(open_project(p, base))
            assert result.run["rung"] == rung
            metrics = result.metrics
            out["rungs"][label] = {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
                                   "n_test": metrics["n_test"], "fit_seconds": model.history.get("fit_seconds"),
                                   "epochs": model.history.get("epochs_run")}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "ladder.json").write_text(json.dumps(out, indent=2))
    print(f"dataset {args.dataset}\n\n| cache | KB per image on disk |\n|---|---|")
    for name, kb in out["cache"].items():
        print(f"| {name} | {kb:.1f} |")
    print("\n| train-top above | s/epoch from the cut-point cache | s/epoch running the frozen layers | ratio |")
    print("|---|---|---|---|")
    for s in out["speed"]:
        print(f"| {s['cut_point']} ({s['train_images']} train images) | {s['cached_seconds_per_epoch']:.2f} | "
              f"{s['frozen_layers_every_epoch_seconds']:.2f} | {s['ratio']:.1f}x |")
    print()
    print("| rung | test accuracy | balanced accuracy | test images | training s | epochs |\n|---|---|---|---|---|---|")
    for label, r in out["rungs"].items():
        fit = f"{r['fit_seconds']:.1f}" if r["fit_seconds"] is not None else "-"
        print(f"| {label} | {r['accuracy']:.4f} | {r['balanced_accuracy']:.4f} | {r['n_test']} | {fit} | "
              f"{r['epochs'] or '-'} |")


if __name__ == "__main__":
    main()
