"""Accuracy of the int8 backbone and of flip views against the float32 original, on the shared sets.

    .venv/bin/python bench/precision_views.py

For dogs_vs_cats_1k and cat_breeds_web5 (default 70/15/15 hash split), and for a harder split of
cat_breeds_web5 (20 train photos per class, the first by content hash; every other photo is test):
- float32 vs int8: features with ``features.precision`` float32 and int8, the default head
  (logistic regression, C=1), test accuracy and balanced accuracy;
- views: ``features.views: [original]`` vs ``[original, hflip]``, two ways of using the mirrored view:
  (a) the mean of the views' features as one row, in training and prediction (what the pipeline
  does); (b) each view as its own training row, predictions averaged over the views' probabilities.
Accuracy is in points (percent); one test photo of 124 is 0.8 points.
Results: Markdown on stdout and bench/results/precision_views.json.
"""
from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
from harness import DATASETS, ROOT, require  # noqa: E402

from pipeline import params as params_mod  # noqa: E402
from pipeline.project import open_project
from pipeline.stages import features  # noqa: E402
from pipeline.store import labels as feature_labels


def logreg():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))


def scores(y_true, y_pred) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    return {"accuracy": 100 * accuracy_score(y_true, y_pred), "balanced": 100 * balanced_accuracy_score(y_true, y_pred),
            "n_test": int(len(y_true))}


def load(result):
    """Each view's features of the labelled photos of a features run, with their labels and splits."""
    labelling = feature_labels.read(result.labels)
    with h5py.File(result.path) as f:
        rows = feature_labels.positions_in(labelling, f["sha256"].asstr()[...], result.path).tolist()
        views = {name: f[name][rows].astype(np.float32) for name in ("features", "features_hflip") if name in f}
    return views, labelling.labels, labelling.splits


def evaluate(result) -> dict:
    views, labels, splits = load(result)
    train, test = splits == "train", splits == "test"
    out = {}
    original = views["features"]
    out["original"] = scores(labels[test], logreg().fit(original[train], labels[train]).predict(original[test]))
    if "features_hflip" in views:
        mirrored = views["features_hflip"]
        mean = (original + mirrored) / 2
        out["views: mean row"] = scores(labels[test], logreg().fit(mean[train], labels[train]).predict(mean[test]))
        model = logreg().fit(np.concatenate([original[train], mirrored[train]]),
                             np.concatenate([labels[train], labels[train]]))
        proba = (model.predict_proba(original[test]) + model.predict_proba(mirrored[test])) / 2
        out["views: each view a row"] = scores(labels[test], model.classes_[np.argmax(proba, axis=1)])
    return out


def hard_split_csv(root: Path, target: Path, per_class: int = 20) -> Path:
    import hashlib

    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted((hashlib.sha256(f.read_bytes()).hexdigest(), f) for f in folder.iterdir() if f.is_file())
        rows += [(f.relative_to(root).as_posix(), "train" if i < per_class else "test") for i, (_, f) in
                 enumerate(files)]
    with open(target, "w", newline="") as f:
        csv.writer(f).writerows([("path", "split"), *rows])
    return target


def main() -> None:
    require(DATASETS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        sets = {"dogs_vs_cats_1k": {"root": str(DATASETS / "dogs_vs_cats_1k")},
                "cat_breeds_web5": {"root": str(DATASETS / "cat_breeds_web5")},
                "cat_breeds_web5, 20 train photos per class": {
                    "root": str(DATASETS / "cat_breeds_web5"),
                    "split_csv": str(hard_split_csv(DATASETS / "cat_breeds_web5", base / "hard.csv"))}}
        for name, data in sets.items():
            row = {}
            for label, extra in (("float32", {}), ("int8", {"precision": "int8"}),
                                 ("float32 + hflip", {"views": ("original", "hflip")})):
                if name.endswith("per class") and label == "int8":
                    continue
                params = params_mod.build({"data": data, "features": dict(extra)}, "bench")
                row[label] = evaluate(features.run(open_project(params, base)))
            results[name] = row
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "precision_views.json").write_text(json.dumps(results, indent=2))
    print("| set | features | head input | test accuracy | balanced accuracy | test photos |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        for label, evaluated in row.items():
            for way, s in evaluated.items():
                if label == "float32 + hflip" and way == "original":
                    continue
                print(f"| {name} | {label} | {way} | {s['accuracy']:.2f} | {s['balanced']:.2f} | {s['n_test']} |")


if __name__ == "__main__":
    main()
