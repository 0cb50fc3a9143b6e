"""Time and peak memory of every stage as the number of photos grows: 1k, 4k and 16k.

    .venv/bin/python bench/scale.py [--sizes 1000 4000 16000] [--backbone efficientnet_lite0]

The photos: the 2,000 of ../shared/datasets (dogs_vs_cats_1k and cat_breeds_web5, 7 classes),
each copied ``ceil(N / 2000)`` times with a different trailing comment after the JPEG/PNG data
(``copy-K`` appended: other bytes, so another sha256 and another row, and the same pixels), then cut
to N. That keeps the work real (every row is decoded and featurised) and the set distinct, with no
re-encoding; what memory does with N is what is measured.

Each stage runs as its own process with default params except: train-head softmax also measured,
train_top with 2 + 2 epochs (patience 0), so that epochs, not early stopping, decide the time.
Peak memory is the process's maximum resident set. Results: Markdown on stdout and
bench/results/scale.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from harness import DATASETS, ROOT, cli, require  # noqa: E402

STAGES = [  # (label, command, extra --set)
    ("features", ["features"], []),
    ("train-head (logreg)", ["train-head"], []),
    ("train-head (softmax)", ["train-head"], ["train_head.model=softmax", "train_head.epochs=10"]),
    ("evaluate (head)", ["evaluate"], []),
    ("top-features", ["top-features"], []),
    ("train-top", ["train-top"], ["train_top.epochs_head=2", "train_top.epochs=2", "train_top.patience=0"]),
    ("evaluate (top)", ["evaluate"], ["train.strategy=top", "train_top.epochs_head=2", "train_top.epochs=2",
                                      "train_top.patience=0"]),
]


def make_photos(target: Path, n: int) -> Path:
    sources = sorted(p for name in ("dogs_vs_cats_1k", "cat_breeds_web5") for p in (DATASETS / name).rglob("*")
                     if p.is_file())
    import random

    random.Random(0).shuffle(sources)  # every size draws from every class
    copies = math.ceil(n / len(sources))
    made = 0
    for k in range(copies):
        for source in sources:
            if made == n:
                return target
            folder = target / source.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            data = source.read_bytes()
            (folder / f"{source.stem}-{k}{source.suffix}").write_bytes(data + f"copy-{k}".encode() if k else data)
            made += 1
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--dataset", help="one shared dataset as it is, instead of the made sets of --sizes")
    args = parser.parse_args()
    require(DATASETS)
    results: dict = {"backbone": args.backbone, "dataset": args.dataset, "sizes": {}}
    sizes = [sum(1 for p in (DATASETS / args.dataset).rglob("*") if p.is_file())] if args.dataset else args.sizes
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"  # converted once (once per machine for a user): not what is measured
        for n in sizes:
            project = Path(tmp) / f"n{n}"
            if args.dataset:
                project.mkdir()
                os.symlink(DATASETS / args.dataset, project / "photos")
            else:
                make_photos(project / "photos", n)
            (project / "params.yaml").write_text(json.dumps({"paths": {"weights_dir": "cache/weights"}, "data": {"root": "photos"},
                                                             "features": {"backbone": args.backbone}}))
            (project / "cache").mkdir()
            if not weights.exists():
                cli(project, "features")
                cli(project, "top-features")
                os.replace(project / "cache" / "weights", weights)
                for folder in ("features", "top_features"):
                    os.system(f"rm -rf {project / 'cache' / folder}")
            os.symlink(weights, project / "cache" / "weights")
            rows = {}
            for label, command, sets in STAGES:
                extra = [a for s in sets for a in ("--set", s)]
                result = cli(project, *command, *extra)
                rows[label] = {"seconds": result["seconds"], "peak_mb": result["peak_mb"]}
                print(f"{n} {label}: {result['seconds']:.1f} s, {result['peak_mb']:.0f} MB", file=sys.stderr)
            cache = {folder: sum(p.stat().st_size for p in (project / "cache" / folder).rglob("*.h5")) / 1e6
                     for folder in ("features", "top_features")}
            results["sizes"][n] = {"stages": rows, "cache_mb": cache}
            os.system(f"rm -rf {project}")
    name = f"scale-{args.backbone}" + (f"-{args.dataset}" if args.dataset else "")
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / f"{name}.json").write_text(json.dumps(results, indent=2))
    sizes = list(results["sizes"])
    print(f"{args.backbone}: seconds / peak MB per stage, each a process of its own")
    print("| stage | " + " | ".join(f"{n:,} photos" for n in sizes) +
          f" | peak {sizes[-1]:,} / {sizes[-2] if len(sizes) > 1 else sizes[0]:,} |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for label, _, _ in STAGES:
        peaks = [results["sizes"][n]["stages"][label]["peak_mb"] for n in sizes]
        cells = [f"{results['sizes'][n]['stages'][label]['seconds']:.1f} s / {peak:.0f} MB"
                 for n, peak in zip(sizes, peaks)]
        print(f"| {label} | " + " | ".join(cells) + f" | {peaks[-1] / peaks[max(0, len(peaks) - 2)]:.2f} |")
    print("| cache MB (pooled / top) | " + " | ".join(
        f"{results['sizes'][n]['cache_mb']['features']:.0f} / {results['sizes'][n]['cache_mb']['top_features']:.0f}"
        for n in sizes) + " | |")


if __name__ == "__main__":
    main()
