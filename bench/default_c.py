"""The default head against a tuned one: accuracy with no tuning, what choosing C costs, the flip view.

    .venv/bin/python bench/default_c.py

On dogs_vs_cats_1k, cat_breeds_web5 and a 7-class set made of both (the 5 breeds, cats, dogs), with
the pipeline's own features (EfficientNet-Lite0, default params) and hash split:
- test top-1 of the default head (``train_head.C: auto``: C from 10^-3..10^2 on the val split along a
  warm-started path), of C = 1, and of the reference: StandardScaler + LogisticRegression with C chosen
  by 5-fold cross-validation over the same grid on the train split (GridSearchCV, accuracy);
- the default head's fitting time on the train split, and on 10,000 rows (the 7-class set's train
  rows repeated with 1% noise: the same difficulty, 10k rows);
- ``features.views: [original, hflip]`` with the default head, against the original view alone;
- the whole ``python -m pipeline train-head`` process after a change of C (the
  median of 3) on cat_breeds_web5 (about 700 train photos).
Raw numbers: bench/results/default_c.json.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import DATASETS, ROOT, require  # noqa: E402

from pipeline import layout  # noqa: E402
from pipeline import params as params_mod  # noqa: E402
from pipeline.project import open_project
from pipeline.stages import features  # noqa: E402
from pipeline.store import table as feature_store  # noqa: E402
from pipeline.training.heads import LogRegHead  # noqa: E402

GRID = (0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0, 31.6, 100.0)


def featurise(root: Path, work: Path, views=("original",)):
    raw = {"data": {"root": str(root)}, "features": {"views": list(views)},
           "paths": {"cache_dir": str(work / "cache"), "reports_dir": str(work / "reports")}}
    params = params_mod.build(raw, "bench")
    features.run(open_project(params, work))
    table = feature_store.read_table(layout.cache_file(params, work))
    if len(views) > 1:  # the mean of the views, as the heads see it
        import h5py

        with h5py.File(layout.cache_file(params, work), "r") as f:
            table.features = np.mean([f[feature_store.view_dataset(v)][...] for v in views], axis=0)
    return table


def splits(tables):
    labels = np.concatenate([t.labels for t in tables])
    classes = sorted(set(labels))
    out = {}
    for name in ("train", "val", "test"):
        mask = np.concatenate([t.splits == name for t in tables])
        x = np.concatenate([t.features for t in tables])[mask]
        out[name] = (x, np.array([classes.index(c) for c in labels[mask]]))
    return out


def reference(data) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x, y), (tx, ty) = data["train"], data["test"]
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    started = time.perf_counter()
    grid = GridSearchCV(model, {"logisticregression__C": list(GRID)}, cv=StratifiedKFold(5, shuffle=True,
                                                                                          random_state=0)).fit(x, y)
    return {"accuracy": float(np.mean(grid.predict(tx) == ty)), "C": float(grid.best_params_["logisticregression__C"]),
            "seconds": time.perf_counter() - started}


def head(data, C) -> dict:
    (x, y), (vx, vy), (tx, ty) = data["train"], data["val"], data["test"]
    started = time.perf_counter()
    fitted = LogRegHead(C=C).fit(x, y, X_val=vx, y_val=vy)
    seconds = time.perf_counter() - started
    return {"accuracy": float(np.mean(fitted.predict(tx) == ty)), "seconds": seconds,
            "C": fitted.history_.get("chosen_C", C)}


def process_seconds(root: Path, work: Path) -> list[float]:
    (work / "params.yaml").write_text(json.dumps({"data": {"root": str(root)}}))
    subprocess.run([sys.executable, "-m", "pipeline", "train-head"], cwd=work, check=True, capture_output=True)
    times = []
    for C in (0.5, 0.25, 0.125):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "train-head", "--set", f"train_head.C={C}"], cwd=work,
                       check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="keep the feature caches in this folder (default: a temporary one)")
    args = parser.parse_args()
    require(DATASETS)
    results = {"command": "bench/default_c.py", "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        plain = {name: featurise(DATASETS / name, work / name) for name in ("dogs_vs_cats_1k", "cat_breeds_web5")}
        # the whole process, with the views a new user has (the flip view is added to the same cache below)
        results["process_seconds_cat_breeds"] = process_seconds(DATASETS / "cat_breeds_web5", work / "cat_breeds_web5")
        flipped = {name: featurise(DATASETS / name, work / name, ("original", "hflip")) for name in plain}
        sets = {"dogs_vs_cats_1k": ([plain["dogs_vs_cats_1k"]], [flipped["dogs_vs_cats_1k"]]),
                "cat_breeds_web5": ([plain["cat_breeds_web5"]], [flipped["cat_breeds_web5"]]),
                "7 classes (both sets)": (list(plain.values()), list(flipped.values()))}
        for name, (tables, flips) in sets.items():
            data, data_flip = splits(tables), splits(flips)
            row = {"train": int(len(data["train"][1])), "val": int(len(data["val"][1])),
                   "test": int(len(data["test"][1])), "reference_cv": reference(data), "auto": head(data, "auto"),
                   "C=1": head(data, 1.0), "auto_hflip": head(data_flip, "auto")}
            results["sets"][name] = row
            print(name, json.dumps(row), flush=True)
        x, y = splits(list(plain.values()))["train"]
        vx, vy = splits(list(plain.values()))["val"]
        rng = np.random.default_rng(0)
        reps = int(np.ceil(10_000 / len(x)))
        big_x = np.concatenate([x + rng.normal(0, 0.01 * x.std(), x.shape).astype(np.float32) for _ in range(reps)])[:10_000]
        big_y = np.tile(y, reps)[:10_000]
        started = time.perf_counter()
        LogRegHead(C="auto").fit(big_x, big_y, X_val=vx, y_val=vy)
        results["fit_seconds_10k"] = time.perf_counter() - started
    results["process_seconds_median"] = statistics.median(results["process_seconds_cat_breeds"])
    out = ROOT / "bench" / "results" / "default_c.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("| set | train/val/test | C by 5-fold CV (reference) | C: auto (default) | C = 1 | auto + hflip | fit s (auto) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["sets"].items():
        print(f"| {name} | {r['train']}/{r['val']}/{r['test']} | {r['reference_cv']['accuracy']:.4f} (C={r['reference_cv']['C']:g}) "
              f"| {r['auto']['accuracy']:.4f} (C={r['auto']['C']:g}) | {r['C=1']['accuracy']:.4f} | "
              f"{r['auto_hflip']['accuracy']:.4f} | {r['auto']['seconds']:.2f} |")
    print(f"fit at 10,000 rows: {results['fit_seconds_10k']:.2f} s; train-head process after a change of C "
          f"(cat_breeds_web5): median {results['process_seconds_median']:.2f} s of {results['process_seconds_cat_breeds']}")


if __name__ == "__main__":
    main()
