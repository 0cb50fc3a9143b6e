"""int8 on a new dataset: the whole features process against float32, and what the calibration costs.

    .venv/bin/python bench/int8.py [--repeats 3]

The dataset: all 2,000 photos of both shared sets (7 classes: the 5 breeds, cats, dogs), ordinary
JPEGs. Whole processes (``python -m pipeline features``), from start to exit, an empty feature cache:
- *new dataset*: the machine has converted the backbone before (its weights folder, the default
  ``~/.cache/photohead/weights``, holds the Keras weights and the checked LiteRT files);
- *first on the machine*: an empty weights folder, so the run converts: the .pth to Keras weights,
  the LiteRT float file and its check, and for int8 the calibration on 200 generic photos
  (``pipeline.data.generic``) and the int8 conversion.
float32 and int8 alternate, --repeats times each, medians.

Accuracy (test top-1 of the default head, ``C: auto``, hash split) on dogs_vs_cats_1k,
cat_breeds_web5 and the 7-class set, with features from: float32; int8 calibrated on the generic
photos (the default); int8 calibrated as before on the dataset's own first 200 train photos
(by content hash), converted per dataset; and on its first 32 train photos. Conversion seconds
(Keras build, calibration, conversion, check) beside each. Then, with the same features, the same head
over --seeds stratified 40/10/50 splits of each set (half of it test photos, so that one photo is a
fraction of a point), paired against the calibration on the set's own 200 photos.
Raw numbers: bench/results/int8.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import DATASETS, ROOT, cli, require, seeded_split  # noqa: E402

from pipeline import params as params_mod  # noqa: E402
from pipeline import runtime  # noqa: E402
from pipeline.project import open_project
from pipeline.stages import features  # noqa: E402
from pipeline.training.heads import LogRegHead  # noqa: E402

SETS = ("dogs_vs_cats_1k", "cat_breeds_web5")


def seven_classes(work: Path) -> Path:
    root = work / "seven"
    if not root.is_dir():
        root.mkdir()
        for name in SETS:
            for folder in sorted((DATASETS / name).iterdir()):
                if folder.is_dir():
                    os.symlink(folder, root / folder.name)
    return root


def process(root: Path, work: Path, machine: Path, precision: str) -> dict:
    project = Path(tempfile.mkdtemp(dir=work))
    (project / "params.yaml").write_text(json.dumps({"data": {"root": str(root)},
                                                     "features": {"precision": precision}}))
    result = cli(project, "features", env={"XDG_CACHE_HOME": str(machine)})
    shutil.rmtree(project)
    return {"seconds": result["seconds"], "peak_mb": result["peak_mb"]}


def speed(root: Path, work: Path, repeats: int) -> dict:
    warm = work / "machine-warm"
    small = work / "small"
    for label in ("cats", "dogs"):
        (small / label).mkdir(parents=True, exist_ok=True)
        for path in sorted((DATASETS / "dogs_vs_cats_1k" / label).iterdir())[:10]:
            shutil.copy(path, small / label / path.name)
    for precision in ("float32", "int8"):  # the machine converts once
        process(small, work, warm, precision)
    runs: dict = {f"{p}, {when}": [] for when in ("new dataset", "first on the machine") for p in ("float32", "int8")}
    for repeat in range(repeats):
        for precision in (("float32", "int8") if repeat % 2 == 0 else ("int8", "float32")):
            runs[f"{precision}, new dataset"].append(process(root, work, warm, precision)["seconds"])
            empty = Path(tempfile.mkdtemp(dir=work))
            runs[f"{precision}, first on the machine"].append(process(root, work, empty, precision)["seconds"])
            shutil.rmtree(empty)
        print("repeat", repeat, {k: round(v[-1], 1) for k, v in runs.items()}, flush=True)
    out = {k: {"seconds": v, "median": statistics.median(v)} for k, v in runs.items()}
    for when in ("new dataset", "first on the machine"):
        out[f"int8 speed-up, {when}"] = out[f"float32, {when}"]["median"] / out[f"int8, {when}"]["median"]
    return out


def own_photos(count: int):
    """Calibrate as the features stage did before: the dataset's first ``count`` train photos by hash."""
    def calibration(f, records_root):
        def images():
            to_input, made = runtime.resizer(f, runtime.input_size(f)), []
            for path in records_root:
                image, _ = runtime.decode_file(path, runtime.draft_size(f), to_input)
                if image is not None:
                    made.append(image)
                if len(made) == count:
                    break
            return made
        return images
    return calibration


def table(root: Path, work: Path, precision: str, calibration=None) -> tuple:
    raw = {"data": {"root": str(root)}, "features": {"precision": precision},
           "paths": {"cache_dir": str(work / "cache"), "weights_dir": str(work / "weights")}}
    params = params_mod.build(raw, "bench")
    real = runtime.calibration_images
    converted = 0.0
    if calibration is not None:
        from pipeline import scan

        data = scan.scan(params.data, work)
        train = [root / r.path for r in sorted(data.records, key=lambda r: r.sha256) if r.split == "train"]
        runtime.calibration_images = lambda f: calibration(f, train)
    try:
        started = time.perf_counter()
        runner = runtime.open_backbone(params.features, work / "weights")  # converts
        from pipeline.data import generic

        to_input = runtime.resizer(params.features, runtime.input_size(params.features))
        runner.predict(np.stack([to_input(p) for p in generic.photos(8, seed=1)]))  # checks and keeps it
        converted = time.perf_counter() - started
        result = features.run(open_project(params, work))
    finally:
        runtime.calibration_images = real
    from pipeline.store import table as feature_store

    t = feature_store.read_table(result.path)
    return t, converted


def accuracy(t) -> float:
    classes = sorted(set(t.labels))
    y = np.array([classes.index(c) for c in t.labels])
    split = {s: t.splits == s for s in ("train", "val", "test")}
    head = LogRegHead(C="auto").fit(t.features[split["train"]], y[split["train"]], X_val=t.features[split["val"]],
                                    y_val=y[split["val"]])
    return float(np.mean(head.predict(t.features[split["test"]]) == y[split["test"]]))


REFERENCE = "int8, own 200 train photos"  # the calibration int8 had before: the one to keep within 0.5 points of


def seeded(tables: dict, seeds: int) -> dict:
    """Test top-1 of the default head trained and tested on each calibration's own features, over ``seeds``
    stratified 40/10/50 splits of the set (half of it test photos), and its difference to ``REFERENCE``'s
    on the same split, in points: mean, sd and standard error of the mean."""
    labels = next(iter(tables.values())).labels
    assert all(list(t.paths) == list(next(iter(tables.values())).paths) for t in tables.values())  # same rows
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    scores = {label: [] for label in tables}
    for seed in range(seeds):
        train, val, test = seeded_split(y, seed)
        for label, t in tables.items():
            head = LogRegHead(C="auto").fit(t.features[train], y[train], X_val=t.features[val], y_val=y[val])
            scores[label].append(float(np.mean(head.predict(t.features[test]) == y[test])))
    out = {"seeds": seeds, "test_photos": int(len(test))}
    for label, values in scores.items():
        delta = 100 * (np.array(values) - np.array(scores[REFERENCE]))
        out[label] = {"mean": float(np.mean(values)), "delta_mean_points": float(delta.mean()),
                      "delta_sd_points": float(delta.std(ddof=1)),
                      "delta_se_points": float(delta.std(ddof=1) / np.sqrt(seeds))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--seeds", type=int, default=20, help="splits of each set for the paired accuracy")
    args = parser.parse_args()
    require(DATASETS)
    results: dict = {"command": "bench/int8.py", "accuracy": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seven = seven_classes(work)
        if not args.skip_speed:
            results["speed"] = speed(seven, work, args.repeats)
        for name, root in (("dogs_vs_cats_1k", DATASETS / SETS[0]), ("cat_breeds_web5", DATASETS / SETS[1]),
                           ("7 classes (both sets)", seven)):
            row, tables = {}, {}
            for label, precision, calibration in (("float32", "float32", None), ("int8, generic (default)", "int8", None),
                                                  ("int8, own 200 train photos", "int8", own_photos(200)),
                                                  ("int8, own 32 train photos", "int8", own_photos(32))):
                folder = Path(tempfile.mkdtemp(dir=work))
                t, seconds = table(root, folder, precision, calibration)
                row[label] = {"accuracy": accuracy(t), "conversion_seconds": seconds, "test": int(np.sum(t.splits == "test"))}
                tables[label] = t
                shutil.rmtree(folder)
            results["accuracy"][name] = row
            results.setdefault("seeded", {})[name] = seeded(tables, args.seeds)
            print(name, json.dumps(row), json.dumps(results["seeded"][name]), flush=True)
    out = ROOT / "bench" / "results" / "int8.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if "speed" in results:
        s = results["speed"]
        print("| 2,000 photos, whole process | float32 s | int8 s | int8 speed-up |")
        print("|---|---|---|---|")
        for when in ("new dataset", "first on the machine"):
            print(f"| {when} | {s[f'float32, {when}']['median']:.1f} | {s[f'int8, {when}']['median']:.1f} | "
                  f"{s[f'int8 speed-up, {when}']:.2f}x |")
    print("\n| set | test photos | float32 | int8, generic (default) | int8, own 200 train photos | int8, own 32 |")
    print("|---|---|---|---|---|---|")
    for name, row in results["accuracy"].items():
        cells = " | ".join(f"{r['accuracy']:.4f} ({r['conversion_seconds']:.0f} s)" for r in row.values())
        print(f"| {name} | {row['float32']['test']} | {cells} |")
    print(f"\nOver {args.seeds} stratified 40/10/50 splits: mean test top-1, and the difference to {REFERENCE} in "
          "points, mean ± sd (se)")
    labels = [k for k in next(iter(results["seeded"].values())) if k not in ("seeds", "test_photos")]
    print("| set | test photos | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for name, r in results["seeded"].items():
        cells = " | ".join(f"{v['mean']:.4f}, {v['delta_mean_points']:+.2f} ± {v['delta_sd_points']:.2f} "
                           f"({v['delta_se_points']:.2f})" for k, v in r.items() if k not in ("seeds", "test_photos"))
        print(f"| {name} | {r['test_photos']} | {cells} |")


if __name__ == "__main__":
    main()
