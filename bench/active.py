"""Labelling in the app's order against labelling in random order: accuracy after 1, 2, 5, 10 photos per class.

    .venv/bin/python bench/active.py [--work DIR] [--seeds 10]

On dogs_vs_cats_1k, cat_breeds_web5 and the 7-class set made of both, with the pipeline's own
features (EfficientNet-Lite0, default params, hash split). The labels of the train split are hidden.
A simulated user then labels train photos, a batch of K (the number of classes) at a time:
- in the app's order (``pipeline.app.active.order``: typical photos first at tiny budgets, then the
  least certain photos spread over clusters), the model retrained after every batch;
- in random order (a new permutation per seed).
After 1, 2, 5 and 10 photos per class (K, 2K, 5K, 10K labels), the same head for both orders is
trained on the labelled photos and scored on the test split: scikit-learn's LogisticRegression
(C = 1, balanced) on the features centred on the train photos' mean and scaled to unit length (the
geometry of the app's neighbours; standardising each feature on a handful of photos, as the default
head does on hundreds, is degenerate at these budgets). A class with no labelled photo is never
predicted. Mean and standard deviation over the seeds (the app's order varies with the k-means seed,
the random order with the permutation). Raw numbers: bench/results/active.json.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from default_c import featurise, splits  # noqa: E402
from harness import DATASETS, ROOT, require  # noqa: E402

from pipeline.app import active  # noqa: E402
from pipeline.vectors import unit_rows  # noqa: E402

BUDGETS = (1, 2, 5, 10)  # labelled photos per class



def fit_score(x, y, tx, ty, n_classes, centre):
    """(test accuracy, the fitted model's probabilities function) of a head on the labelled photos."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    present = np.unique(y)
    if len(present) == 1:
        return float(np.mean(ty == present[0])), None
    model = make_pipeline(FunctionTransformer(unit_rows, kw_args={"centre": centre}),
                          LogisticRegression(class_weight="balanced", max_iter=2000)).fit(x, y)

    def proba(z):  # over every class: the unseen ones get 0
        out = np.zeros((len(z), n_classes))
        out[:, model.classes_] = model.predict_proba(z)
        return out

    return float(np.mean(model.predict(tx) == ty)), proba


def simulate(data, n_classes: int, seed: int, strategy: str) -> dict[int, float]:
    (x, y), (tx, ty) = data["train"], data["test"]
    rng = np.random.default_rng(seed)
    labelled: list[int] = []
    scores = {}
    proba = None
    random_order = rng.permutation(len(x))
    for budget in range(1, max(BUDGETS) + 1):
        want = budget * n_classes
        while len(labelled) < want:
            pool = np.setdiff1d(np.arange(len(x)), labelled)
            if strategy == "random":
                taken = set(labelled)
                labelled += [i for i in random_order if i not in taken][:want - len(labelled)]
            else:
                picks, _ = active.order(x[pool], x[labelled], n_classes, proba(x[pool]) if proba else None,
                                        batch=want - len(labelled), seed=seed)
                labelled += pool[picks[:want - len(labelled)]].tolist()
        accuracy, proba = fit_score(x[labelled], y[labelled], tx, ty, n_classes, x.mean(axis=0))
        if budget in BUDGETS:
            scores[budget] = accuracy
    return scores


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None,
                        help="keep the feature caches in this folder (default: a temporary one)")
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    require(DATASETS)
    results = {"command": f"bench/active.py --seeds {args.seeds}", "budgets": list(BUDGETS), "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        plain = {name: featurise(DATASETS / name, work / name) for name in ("dogs_vs_cats_1k", "cat_breeds_web5")}
    sets = {"dogs_vs_cats_1k": [plain["dogs_vs_cats_1k"]], "cat_breeds_web5": [plain["cat_breeds_web5"]],
            "7 classes (both sets)": list(plain.values())}
    for name, tables in sets.items():
        data = splits(tables)
        n_classes = len(np.unique(data["train"][1]))
        row = {}
        for strategy in ("app", "random"):
            runs = [simulate(data, n_classes, seed, strategy) for seed in range(args.seeds)]
            row[strategy] = {b: [r[b] for r in runs] for b in BUDGETS}
        results["sets"][name] = {"classes": n_classes, "train": int(len(data["train"][1])),
                                 "test": int(len(data["test"][1])), **row}
        print(name, json.dumps({s: {b: round(statistics.mean(v), 4) for b, v in row[s].items()} for s in row}),
              flush=True)
    out = ROOT / "bench" / "results" / "active.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("| set | photos per class | app's order | random order | difference (points) |")
    print("|---|---|---|---|---|")
    for name, r in results["sets"].items():
        for b in BUDGETS:
            app, rand = np.array(r["app"][b]), np.array(r["random"][b])
            diff = 100 * (app - rand)
            se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            print(f"| {name} ({r['classes']} classes) | {b} | {100 * app.mean():.1f} ± {100 * app.std(ddof=1):.1f} | "
                  f"{100 * rand.mean():.1f} ± {100 * rand.std(ddof=1):.1f} | {diff.mean():+.1f} (se {se:.1f}) |")


if __name__ == "__main__":
    main()
