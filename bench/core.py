"""Core pipeline benchmark on ../shared/datasets: features throughput and memory, head retrain time (after a
change of C, and a cache hit), accuracy of the heads. Every figure is measured in this run, on this machine.

    .venv/bin/python bench/core.py [--datasets dogs_vs_cats_1k cat_breeds_web5] [--repeats 3]

Each stage runs as its own process (`python -m pipeline ...`), as a user runs it; wall time
includes interpreter start and imports. Peak memory is the command's own maximum resident set size (bench/harness.py).
Results: a Markdown table on stdout and bench/results/core.json.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

from harness import DATASETS, ROOT, cli, table  # noqa: E402


def bench_dataset(name: str, repeats: int) -> dict:
    root = DATASETS / name
    n_images = sum(1 for p in root.rglob("*") if p.is_file())
    out: dict = {"dataset": name, "files": n_images}
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "params.yaml").write_text(json.dumps({"data": {"root": str(root)}}))
        first = cli(project, "features")
        stage = re.search(r"featurised (\d+) image\(s\) in ([\d.]+) s", first["stderr"])
        out["features"] = {
            "wall_seconds": first["seconds"], "peak_mb": first["peak_mb"],
            "images": int(stage.group(1)), "images_per_second_end_to_end": int(stage.group(1)) / first["seconds"],
            "images_per_second_in_stage": int(stage.group(1)) / float(stage.group(2)),
        }
        hit = cli(project, "features")
        assert "cache hit" in hit["stderr"], hit["stderr"]
        out["features"]["cache_hit_seconds"] = hit["seconds"]
        cache_file = next((project / "cache" / "features").glob("*.h5"))
        out["features"]["cache_mb"] = cache_file.stat().st_size / 1e6
        mtime = cache_file.stat().st_mtime_ns

        cli(project, "train-head")
        retrain = []
        for i in range(repeats):
            result = cli(project, "train-head", "--set", f"train_head.C={0.5 + i / 10}")
            assert "recomputing (train_head.C" in result["stderr"], result["stderr"]
            retrain.append(result["seconds"])
        assert cache_file.stat().st_mtime_ns == mtime, "train-head touched the feature cache"
        out["train_head_after_param_change_seconds"] = {"median": statistics.median(retrain), "runs": retrain}
        hits = []
        for i in range(repeats):  # the same C again: nothing to fit
            result = cli(project, "train-head", "--set", f"train_head.C={0.5 + i / 10}")
            assert "train_head: cache hit" in result["stderr"], result["stderr"]
            hits.append(result["seconds"])
        out["train_head_cache_hit_seconds"] = {"median": statistics.median(hits), "runs": hits}

        heads = {"logreg (C: auto, the default)": [], "logreg (C=1)": ["--set", "train_head.C=1.0"],
                 "logreg (C by 5-fold CV)": ["--set", "train_head.search_C=true"],
                 "softmax (Keras)": ["--set", "train_head.model=softmax"]}
        out["accuracy"] = {}
        for label, extra in heads.items():
            cli(project, "evaluate", "--with-upstream", *extra)
            metrics = json.loads((project / "reports" / "metrics.json").read_text())
            out["accuracy"][label] = {"accuracy": metrics["accuracy"],
                                      "balanced_accuracy": metrics["balanced_accuracy"], "n_test": metrics["n_test"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["dogs_vs_cats_1k", "cat_breeds_web5"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    missing = [d for d in args.datasets if not (DATASETS / d).is_dir()]
    if missing:
        raise SystemExit(f"no {', '.join(missing)} under {DATASETS}; this benchmark needs the shared photo datasets")
    results = [bench_dataset(name, args.repeats) for name in args.datasets]
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "core.json").write_text(json.dumps(results, indent=2))
    print(table(["dataset", "images", "features img/s (end to end)", "img/s (in stage)", "peak MB", "cache hit s",
                 "train-head after a change, s (median)", "train-head cache hit, s (median)"],
                [[r["dataset"], r["features"]["images"], f"{r['features']['images_per_second_end_to_end']:.1f}",
                  f"{r['features']['images_per_second_in_stage']:.1f}", f"{r['features']['peak_mb']:.0f}",
                  f"{r['features']['cache_hit_seconds']:.1f}",
                  f"{r['train_head_after_param_change_seconds']['median']:.2f}",
                  f"{r['train_head_cache_hit_seconds']['median']:.2f}"] for r in results]))
    print()
    print(table(["dataset", "head", "test accuracy", "balanced accuracy", "test images"],
                [[r["dataset"], head, f"{m['accuracy']:.4f}", f"{m['balanced_accuracy']:.4f}", m["n_test"]]
                 for r in results for head, m in r["accuracy"].items()]))

if __name__ == "__main__":
    main()
