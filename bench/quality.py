"""How well inspect finds what is planted, what it finds as it is, and how long it takes at 10k photos.

    .venv/bin/python bench/quality.py [--seed 0]

1. dogs_vs_cats_1k with planted problems (seeded):
   - label errors: 5% of the photos (50) moved to the other class's folder;
   - near-duplicates: 40 photos copied in ways the calibration does not use (rotated 2 degrees and
     re-saved; shrunk to 40% and re-saved at quality 60; 5% cropped off each side and darkened 10%;
     mirrored), each copy beside its original;
   - outliers: the 12 photographs scikit-image ships that show neither a cat nor a dog (rocket,
     coffee, astronaut, camera man, ...), 6 in each folder.
   Precision and recall of each finder against what was planted (label issues: the moved photos;
   pairs: original-copy pairs; outliers: the 12 strangers among the photos inspect lists).
2. cat_breeds_web5 as it is: counts, and the first findings.
3. Seconds and peak memory of ``python -m pipeline inspect`` at 2.5k and 10k photos (bench/scale.py's
   copies of the 2,000 shared photos: at 10k every photo has 4 byte-different copies, so the pair
   search has work to do).
Results: Markdown on stdout and bench/results/inspect.json.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from harness import DATASETS, ROOT, cli, require  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps
from scale import make_photos  # noqa: E402

STRANGERS = ["rocket", "coffee", "astronaut", "camera", "chelsea_never", "coins", "moon", "page", "text", "horse",
             "immunohistochemistry", "hubble_deep_field", "clock", "motorcycle_left", "brick", "grass", "gravel",
             "retina", "skin", "logo"]


def copy_kinds(image: Image.Image, kind: int) -> Image.Image:
    image = image.convert("RGB")
    if kind == 0:
        return image.rotate(2, resample=Image.BILINEAR)
    if kind == 1:
        return image.resize((max(1, int(image.width * 0.4)), max(1, int(image.height * 0.4))), Image.BILINEAR)
    if kind == 2:
        w, h = image.size
        return ImageEnhance.Brightness(image.crop((w // 20, h // 20, w - w // 20, h - h // 20))).enhance(0.9)
    return ImageOps.mirror(image)


def strangers() -> list[Image.Image]:
    from skimage import data

    found = []
    for name in STRANGERS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            array = np.asarray(loader())
        except Exception:  # some need a download: not here
            continue
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if array.dtype != np.uint8:
            array = array.astype(np.float64)
            array = (255 * (array - array.min()) / max(1e-9, float(array.max() - array.min()))).astype(np.uint8)
        found.append(Image.fromarray(array[..., :3]))
        if len(found) == 12:
            break
    return found


def precision_recall(found: set, planted: set) -> dict:
    hits = len(found & planted)
    return {"found": len(found), "planted": len(planted), "hits": hits,
            "precision": hits / len(found) if found else 0.0, "recall": hits / len(planted) if planted else 0.0}


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def planted_run(work: Path, seed: int) -> dict:
    rng = random.Random(seed)
    photos = work / "planted" / "photos"
    shutil.copytree(DATASETS / "dogs_vs_cats_1k", photos)
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    moved = set()
    for path in rng.sample(files, 50):
        other = "dogs" if path.parent.name == "cats" else "cats"
        target = photos / other / path.name
        shutil.move(path, target)
        moved.add(f"{other}/{path.name}")
    files = sorted(p for p in photos.rglob("*") if p.is_file() and f"{p.parent.name}/{p.name}" not in moved)
    pairs = set()
    for i, path in enumerate(rng.sample(files, 40)):
        with Image.open(path) as image:
            copy = copy_kinds(image, i % 4)
        name = f"copy{i}_{path.stem}.jpg"
        copy.save(path.with_name(name), quality=60 if i % 4 == 1 else 90)
        pairs.add(frozenset((f"{path.parent.name}/{path.name}", f"{path.parent.name}/{name}")))
    outsiders = set()
    for i, image in enumerate(strangers()):
        label = ("cats", "dogs")[i % 2]
        image.save(photos / label / f"stranger_{i}.jpg", quality=90)
        outsiders.add(f"{label}/stranger_{i}.jpg")
    project = photos.parent
    (project / "params.yaml").write_text(json.dumps({"data": {"root": "photos"},
                                                     "inspect": {"outliers": 0.012}}))
    cli(project, "features")
    timed = cli(project, "inspect")
    reports = project / "reports"
    issues = {r["path"] for r in read_csv(reports / "label_issues.csv")}
    found_pairs = {frozenset((r["path_a"], r["path_b"])) for r in read_csv(reports / "near_duplicates.csv")}
    outliers = {r["path"] for r in read_csv(reports / "outliers.csv")}
    summary = json.loads((reports / "inspect.json").read_text())
    return {"photos": summary["photos"], "seconds": timed["seconds"], "threshold": summary["near_duplicate_threshold"],
            "calibration": {k: summary["calibration"][k] for k in ("recall_on_copies", "distinct_pairs_above")},
            "label_issues": precision_recall(issues, moved), "near_duplicates": precision_recall(found_pairs, pairs),
            "outliers": precision_recall(outliers, outsiders)}


def as_is(work: Path) -> dict:
    project = work / "breeds"
    project.mkdir()
    (project / "params.yaml").write_text(json.dumps({"data": {"root": str(DATASETS / "cat_breeds_web5")}}))
    cli(project, "features")
    timed = cli(project, "inspect")
    summary = json.loads((project / "reports" / "inspect.json").read_text())
    reports = project / "reports"
    return {"summary": {k: summary[k] for k in ("photos", "label_issues", "near_duplicate_pairs", "leaking_pairs",
                                                "pairs_with_different_labels", "outliers", "near_duplicate_threshold")},
            "seconds": timed["seconds"], "first_label_issues": read_csv(reports / "label_issues.csv")[:5],
            "first_pairs": read_csv(reports / "near_duplicates.csv")[:5]}


def at_scale(work: Path, n: int) -> dict:
    project = work / f"n{n}"
    make_photos(project / "photos", n)
    (project / "params.yaml").write_text(json.dumps({"data": {"root": "photos"}}))
    cli(project, "features")
    timed = cli(project, "inspect")
    summary = json.loads((project / "reports" / "inspect.json").read_text())
    return {"photos": summary["photos"], "seconds": timed["seconds"], "peak_mb": timed["peak_mb"],
            "seconds_inside": summary["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, nargs="+", default=[2_500, 10_000])
    args = parser.parse_args()
    require(DATASETS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"planted": planted_run(work, args.seed), "cat_breeds_web5": as_is(work),
                   "scale": [at_scale(work, n) for n in args.scale]}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "inspect.json").write_text(json.dumps(results, indent=2))
    planted = results["planted"]
    print(f"dogs_vs_cats_1k with planted problems ({planted['photos']} photos; threshold {planted['threshold']:.3f}, "
          f"calibration: {100 * planted['calibration']['recall_on_copies']:.0f}% of its copies caught, "
          f"{100 * planted['calibration']['distinct_pairs_above']:.2f}% of distinct pairs above)")
    print("| finder | planted | found | right | precision | recall |")
    print("|---|---|---|---|---|---|")
    for finder in ("label_issues", "near_duplicates", "outliers"):
        r = planted[finder]
        print(f"| {finder.replace('_', ' ')} | {r['planted']} | {r['found']} | {r['hits']} | {r['precision']:.2f} "
              f"| {r['recall']:.2f} |")
    breeds = results["cat_breeds_web5"]["summary"]
    print(f"\ncat_breeds_web5 as it is: {breeds['photos']} photos, {breeds['label_issues']} likely label errors, "
          f"{breeds['near_duplicate_pairs']} near-duplicate pairs ({breeds['leaking_pairs']} straddle splits, "
          f"{breeds['pairs_with_different_labels']} with different labels), {breeds['outliers']} outliers listed")
    print()
    for scale in results["scale"]:
        print(f"inspect at {scale['photos']:,} photos: {scale['seconds']:.1f} s as a process "
              f"({scale['seconds_inside']:.1f} s inside), peak {scale['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
