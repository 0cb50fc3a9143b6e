"""Open-set benchmark: how well each rejection score tells unknown photos from known ones, what
calibration does, and how the heads compare with few photos per class.

    .venv/bin/python bench/open_set.py [--seeds 5]

- Near unknowns: a head trained on cat_breeds_web5; unknown photos: dogs_vs_cats_1k's dogs (the neighbour's dog).
- Far unknowns: a head trained on dogs_vs_cats_1k; unknown photos: no animal at all, the photographs
  scikit-image ships without a cat or dog (bench/quality.py's strangers) and 60 made here (noise,
  gradients, stripes, flat colours), 72 in all.
Every photo is featurised once by the pipeline's own features stage (EfficientNet-Lite0, default
params); the default head (logistic regression, C = 1) is fitted on the train split, the guard
(``training.guard.fit_guard``) on the val split, and the figures are on the test split against the
unknown photos. No unknown photo sets anything.

Per score: AUROC, FPR at 95% of known test photos kept (the share of unknown photos above the
threshold that keeps 95% of the known test photos), and, with the guard's own threshold (set on val,
keep 0.95): the share of known test photos kept, of unknown photos accepted, and the accuracy on the
accepted known photos. Then the kNN bank's size (all train photos, k-means centres, one mean per
class) against AUROC; ECE (15 bins) and Brier before and after temperature scaling; and the
few-shot table: ncm, knn, logreg and softmax heads at 1, 2, 5, 10 and 20 train photos per class
(mean and standard deviation over seeds), on both sets and on a 7-class set made of both (the 5
breeds, cats, dogs). Raw numbers: bench/results/open_set.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import typing
from pathlib import Path

import numpy as np
from harness import DATASETS, ROOT, require  # noqa: E402
from PIL import Image
from quality import strangers  # noqa: E402

from pipeline import layout  # noqa: E402
from pipeline import params as params_mod  # noqa: E402
from pipeline.params import RejectParams  # noqa: E402
from pipeline.project import open_project
from pipeline.stages import features  # noqa: E402
from pipeline.store import table as feature_store  # noqa: E402
from pipeline.training import guard as guard_mod  # noqa: E402
from pipeline.training.classifiers import HeadClassifier  # noqa: E402
from pipeline.training.heads import HEADS  # noqa: E402
from pipeline.training.heads.softmax import Steps  # noqa: E402

SHOTS = (1, 2, 5, 10, 20)


def featurise(root: Path, work: Path) -> feature_store.FeatureTable:
    """The pooled features of every photo under ``root`` (class folders), by the features stage."""
    params = params_mod.build({"data": {"root": str(root)}, "paths": {"cache_dir": str(work / "cache"),
                                                                      "reports_dir": str(work / "reports")}}, "bench")
    features.run(open_project(params, work))
    return feature_store.read_table(layout.cache_file(params, work))


def made_photos(folder: Path) -> Path:
    """72 photos with no animal: scikit-image's strangers and 60 made ones."""
    rng = np.random.default_rng(0)
    # two folders: the features stage wants at least two classes; the names play no part
    for name in ("photographs", "made"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(strangers()):
        image.convert("RGB").save(folder / "photographs" / f"skimage_{i}.png")
    for i in range(60):
        kind = i % 4
        if kind == 0:
            pixels = rng.integers(0, 256, (300, 400, 3))
        elif kind == 1:
            pixels = np.linspace(0, 255, 400)[None, :, None] * rng.uniform(0, 1, 3) + np.zeros((300, 1, 3))
        elif kind == 2:
            pixels = np.zeros((300, 400, 3)) + rng.integers(0, 256, 3) * ((np.arange(400) // rng.integers(4, 40)) % 2)[None, :, None]
        else:
            pixels = np.zeros((300, 400, 3)) + rng.integers(0, 256, 3)
        pixels = np.clip(pixels + rng.normal(0, 8, (300, 400, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "made" / f"made_{i}.png")
    return folder


def split(table, classes=None):
    classes = classes or sorted(set(table.labels))
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for name in ("train", "val", "test"):
        mask = (table.splits == name) & np.isin(table.labels, classes)
        out[name] = (table.features[mask], np.array([index[c] for c in table.labels[mask]]))
    return out, classes


def open_set(known, unknown_x, bank_sizes=(2048, 256, 64)) -> dict:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = known["train"], known["val"], known["test"]
    classes = [str(k) for k in range(int(train_y.max()) + 1)]
    classifier = HeadClassifier(HEADS["logreg"]().fit(train_x, train_y), classes, {})
    base = params_mod.build({}, "bench").reject
    rows = {}
    for score in typing.get_args(RejectParams.__pydantic_fields__["score"].annotation):
        reject = type(base)(score=score, k=base.k, keep=base.keep, label=base.label, bank_size=base.bank_size)
        guard = guard_mod.fit_guard(classifier, train_x, train_y, val_x, val_y, reject)
        known_s = guard.scores(classifier.embed(test_x), classifier.logits(test_x))
        unknown_s = guard.scores(classifier.embed(unknown_x), classifier.logits(unknown_x))
        at95 = np.quantile(known_s, 0.95)
        accepted = guard.accepted(known_s)
        correct = classifier.logits(test_x).argmax(axis=1) == test_y
        rows[score] = {"auroc": guard_mod.auroc(known_s, unknown_s), "fpr_at_95": float(np.mean(unknown_s <= at95)),
                       "known_kept": float(accepted.mean()), "unknown_accepted": float(np.mean(guard.accepted(unknown_s))),
                       "accuracy_accepted": float(correct[accepted].mean()), "accuracy_all": float(correct.mean())}
    banks = {}
    for size in (*bank_sizes, len(classes)):
        reject = type(base)(score="knn", k=min(base.k, size), keep=base.keep, label=base.label, bank_size=size)
        guard = guard_mod.fit_guard(classifier, train_x, train_y, val_x, val_y, reject)
        known_s = guard.scores(classifier.embed(test_x), classifier.logits(test_x))
        unknown_s = guard.scores(classifier.embed(unknown_x), classifier.logits(unknown_x))
        banks[f"{guard.bank_rows} ({guard.bank_kind}, k={guard.k if guard.bank_rows > guard.k else min(guard.k, guard.bank_rows)})"] = {
            "rows": guard.bank_rows, "megabytes": guard.arrays["bank"].nbytes / 1e6,
            "auroc": guard_mod.auroc(known_s, unknown_s)}
    reject = base
    guard = guard_mod.fit_guard(classifier, train_x, train_y, val_x, val_y, reject)
    logits = classifier.logits(test_x)
    before, after = guard_mod.softmax(logits), guard_mod.softmax(logits / guard.temperature)
    calibration = {"temperature": guard.temperature,
                   "ece_before": guard_mod.expected_calibration_error(before, test_y)["ece"],
                   "ece_after": guard_mod.expected_calibration_error(after, test_y)["ece"],
                   "brier_before": guard_mod.brier_score(before, test_y),
                   "brier_after": guard_mod.brier_score(after, test_y)}
    return {"scores": rows, "banks": banks, "calibration": calibration, "n_test": int(len(test_y)),
            "n_unknown": int(len(unknown_x)), "n_train": int(len(train_y))}


def few_shot(known, seeds: int) -> dict:
    """Test accuracy of each head trained on `shots` train photos per class (mean, sd over seeds)."""
    (train_x, train_y), _, (test_x, test_y) = known["train"], known["val"], known["test"]
    table = {}
    for name in ("ncm", "knn", "logreg", "softmax"):
        table[name] = {}
        for shots in SHOTS:
            accuracies = []
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                chosen = np.concatenate([rng.choice(np.flatnonzero(train_y == k), min(shots, np.sum(train_y == k)),
                                                    replace=False) for k in range(int(train_y.max()) + 1)])
                head = HEADS[name](k=min(10, len(chosen))) if name == "knn" else HEADS[name]()
                if name == "softmax":
                    head.set_params(steps=Steps(epochs=100, patience=0))
                head.fit(train_x[chosen], train_y[chosen])
                accuracies.append(float(np.mean(head.predict(test_x) == test_y)))
            table[name][shots] = {"mean": statistics.mean(accuracies),
                                  "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    require(DATASETS)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cats_dogs = featurise(DATASETS / "dogs_vs_cats_1k", work / "dogs_vs_cats_1k")
        breeds = featurise(DATASETS / "cat_breeds_web5", work / "cat_breeds_web5")
        nothing = featurise(made_photos(work / "no_animal" / "photos"), work / "no_animal")
    results = {"command": "bench/open_set.py", "seeds": args.seeds}
    breeds_known, _ = split(breeds)
    dogs = cats_dogs.features[cats_dogs.labels == "dogs"]
    results["near: cat_breeds_web5 vs dogs"] = open_set(breeds_known, dogs)
    cats_known, _ = split(cats_dogs)
    results["far: dogs_vs_cats_1k vs no animal"] = open_set(cats_known, nothing.features)
    # the 7-class set: both caches side by side (the same backbone and settings, so the same feature space)
    merged = feature_store.FeatureTable(
        path=Path("merged"), sha256=np.r_[breeds.sha256, cats_dogs.sha256], paths=np.r_[breeds.paths, cats_dogs.paths],
        labels=np.r_[breeds.labels, cats_dogs.labels], splits=np.r_[breeds.splits, cats_dogs.splits],
        features=np.concatenate([breeds.features, cats_dogs.features]), attrs={})
    results["few_shot"] = {"cat_breeds_web5": few_shot(breeds_known, args.seeds),
                           "dogs_vs_cats_1k": few_shot(cats_known, args.seeds),
                           "7 classes (both sets)": few_shot(split(merged)[0], args.seeds)}
    results["seconds"] = time.perf_counter() - started
    out = ROOT / "bench" / "results" / "open_set.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    for name in ("near: cat_breeds_web5 vs dogs", "far: dogs_vs_cats_1k vs no animal"):
        r = results[name]
        print(f"\n{name} ({r['n_train']} train, {r['n_test']} known test, {r['n_unknown']} unknown photos)")
        print("| score | AUROC | FPR at 95% known kept | known kept (val threshold) | unknown accepted | accuracy on accepted (all) |")
        print("|---|---|---|---|---|---|")
        for score, s in r["scores"].items():
            print(f"| {score} | {s['auroc']:.3f} | {100 * s['fpr_at_95']:.1f}% | {100 * s['known_kept']:.1f}% | "
                  f"{100 * s['unknown_accepted']:.1f}% | {s['accuracy_accepted']:.4f} ({s['accuracy_all']:.4f}) |")
        print("| kNN bank | MB | AUROC |\n|---|---|---|")
        for bank, b in r["banks"].items():
            print(f"| {bank} | {b['megabytes']:.2f} | {b['auroc']:.3f} |")
        c = r["calibration"]
        print(f"calibration: T {c['temperature']:.3g}, ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}, "
              f"Brier {c['brier_before']:.4f} -> {c['brier_after']:.4f}")
    for name, table in results["few_shot"].items():
        print(f"\nfew-shot test accuracy, {name} (mean ± sd over {args.seeds} seeds)")
        print("| head | " + " | ".join(f"{s}/class" for s in SHOTS) + " |")
        print("|---|" + "---|" * len(SHOTS))
        for head, row in table.items():
            print(f"| {head} | " + " | ".join(f"{row[s]['mean']:.3f} ± {row[s]['sd']:.3f}" for s in SHOTS) + " |")
    print(f"\n{results['seconds']:.0f} s; raw numbers in {out}")


if __name__ == "__main__":
    main()
