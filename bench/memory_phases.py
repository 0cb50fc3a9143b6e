"""Peak memory of train-top phase by phase: during training, and after it (calibration, the guard's
embeddings of the train and val photos): no phase after training may peak above training itself.

    .venv/bin/python bench/memory_phases.py [--sizes 500 1000] [--backbones efficientnet_lite0 efficientnet_lite2]

The photos: the first N of dogs_vs_cats_1k (both classes). train_top runs 1 + 1 epochs (patience 0), so
that the training is short and the pass after it is what is measured. The stage's resident set is read
from /proc every 0.1 s beside its log lines; "training" is up to the line "trained on", "after" is the rest.
Results: Markdown on stdout and bench/results/memory_phases.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness
import yaml


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return 0.0


def phases(project: Path) -> dict:
    """Peak RSS (MB) of train-top before and after its 'trained on' line."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "train-top", "--params", "params.yaml"],
                               cwd=project, env=harness.pipeline_env(), stderr=subprocess.PIPE, text=True)
    trained_at: list[float] = []
    samples: list[tuple[float, float]] = []

    def read_log():
        for line in process.stderr:
            if "trained on" in line:
                trained_at.append(time.monotonic())

    reader = threading.Thread(target=read_log)
    reader.start()
    while process.poll() is None:
        samples.append((time.monotonic(), _rss_mb(process.pid)))
        time.sleep(0.1)
    reader.join()
    if process.returncode or not trained_at:
        raise SystemExit(f"train-top failed in {project}")
    during = max(mb for t, mb in samples if t <= trained_at[0])
    after = max((mb for t, mb in samples if t > trained_at[0]), default=0.0)
    return {"training_mb": round(during), "after_mb": round(after)}


def run(size: int, backbone: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        for label in ("cats", "dogs"):
            (project / "photos" / label).mkdir(parents=True)
            for path in sorted((harness.SOURCE / label).iterdir())[:size // 2]:
                (project / "photos" / label / path.name).symlink_to(path)
        (project / "params.yaml").write_text(yaml.safe_dump({
            "data": {"root": "photos"}, "features": {"backbone": backbone}, "train": {"strategy": "top"},
            "train_top": {"epochs_head": 1, "epochs": 1, "patience": 0}}))
        harness.cli(project, "top-features")
        return {"photos": size, "backbone": backbone, **phases(project)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000])
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    args = parser.parse_args()
    harness.require(harness.SOURCE)
    results = [run(size, backbone) for backbone in args.backbones for size in args.sizes]
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "memory_phases.json").write_text(json.dumps(results, indent=2))
    print(harness.table(["backbone", "photos", "train-top peak while training (MB)", "peak after training (MB)"],
                        [(r["backbone"], r["photos"], r["training_mb"], r["after_mb"]) for r in results]))


if __name__ == "__main__":
    main()
