"""What the safety measures cost, and what a kill -9 loses, on ../shared/datasets/dogs_vs_cats_1k.

    .venv/bin/python bench/safety.py [--pairs 6]

1. Overhead: the features stage on an empty cache, in this process, alternately with every safety
   measure on (part commits every 256 images, fletcher32 checksums, the file lock, the checksum
   pass over an existing cache) and with them off; median of --pairs runs each, and the ratio.
   The time spent inside the safety code in the "on" runs is reported too.
2. Kill test: `python -m pipeline features` is killed with SIGKILL after its 1st and 3rd committed
   part and during its final merge; the next run's rows kept and recomputed are counted.
Results: Markdown on stdout and bench/results/safety.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASET = ROOT.parent / "shared" / "datasets" / "dogs_vs_cats_1k"

import h5py  # noqa: E402

from pipeline import feature_store, features, params as params_mod  # noqa: E402


class Timed:
    """Wraps module functions and adds up the seconds spent in them."""

    def __init__(self):
        self.seconds = 0.0
        self.saved = []

    def wrap(self, module, name):
        original = getattr(module, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        self.saved.append((module, name, original))
        setattr(module, name, timed)

    def restore(self):
        for module, name, original in self.saved:
            setattr(module, name, original)


def one_run(safe: bool) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        overrides = {"data": {"root": str(DATASET)}}
        if not safe:
            overrides["features"] = {"commit_every": 10**9}
        params = params_mod.build(overrides, "bench")
        timer = Timed()
        saved = []
        if safe:
            timer.wrap(features, "_write_part")
            timer.wrap(feature_store, "verify_features")
        else:
            saved.append((features, "FileLock", features.FileLock))
            features.FileLock = lambda path: _NoLock()
            saved.append((feature_store, "verify_features", feature_store.verify_features))
            feature_store.verify_features = lambda path: None
            saved.append((h5py.File, "create_dataset", None))
            original_create = h5py.Group.create_dataset

            def no_checksum(self, *args, **kwargs):
                kwargs["fletcher32"] = False
                return original_create(self, *args, **kwargs)

            h5py.Group.create_dataset = no_checksum
        started = time.perf_counter()
        try:
            features.run(params, project)
            elapsed = time.perf_counter() - started
            if safe:  # the checksum pass a later run makes over this cache
                timed_verify = time.perf_counter()
                feature_store.verify_features(features.cache_file(params, project))
                timer.seconds += time.perf_counter() - timed_verify
        finally:
            timer.restore()
            for module, name, original in saved:
                if module is h5py.File:
                    h5py.Group.create_dataset = original_create
                else:
                    setattr(module, name, original)
        return elapsed, timer.seconds


class _NoLock:
    def acquire(self, timeout=None):
        return self

    def release(self):
        pass


def kill_test(point: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "params.yaml").write_text(json.dumps({"data": {"root": str(DATASET)}}))
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "features"], cwd=project, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        folder = project / "cache" / "features"

        def reached():
            n_parts = len(list(folder.glob("*.parts/part-*.h5")))
            if point == "merge":
                return any(folder.glob(".*.h5.*.tmp"))
            return n_parts >= int(point.split()[1])

        while process.poll() is None and not reached():
            time.sleep(0.002)
        caught = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        kept = sum(len(h5py.File(p)["sha256"]) for p in folder.glob("*.parts/part-*.h5"))
        kept += sum(len(feature_store.read_index(p)[0]) for p in folder.glob("*.h5"))
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "pipeline", "features"], cwd=project, env=env,
                             capture_output=True, text=True)
        seconds = time.perf_counter() - started
        line = [l for l in out.stderr.splitlines() if "to featurise" in l or "cache hit" in l]
        rows = len(feature_store.read_index(next(folder.glob("*.h5")))[0])
        recomputed = int(line[0].split()[1]) if line and "to featurise" in line[0] else 0
        return {"kill": point, "caught": caught, "rows_kept": kept, "rows_recomputed": recomputed,
                "rows_after_rerun": rows, "rerun_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    if not DATASET.is_dir():
        raise SystemExit(f"no {DATASET}; this benchmark needs the shared photo datasets")
    one_run(True)  # warm-up: converted weights, file system cache
    on, off, inside = [], [], []
    for i in range(args.pairs):
        for safe in ((True, False) if i % 2 == 0 else (False, True)):  # alternate the order: no drift bias
            seconds, in_safety = one_run(safe)
            if safe:
                on.append(seconds), inside.append(in_safety)
            else:
                off.append(seconds)
    overhead = {"safe_seconds_median": statistics.median(on), "unsafe_seconds_median": statistics.median(off),
                "ratio": statistics.median(on) / statistics.median(off),
                "seconds_inside_safety_code_median": statistics.median(inside),
                "share_inside_safety_code": statistics.median(inside) / statistics.median(on),
                "runs_on": on, "runs_off": off}
    kills = [kill_test(point) for point in ("part 1", "part 3", "merge")]
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "safety.json").write_text(json.dumps({"overhead": overhead, "kills": kills},
                                                                       indent=2))
    print(f"features stage, 1,000 images, median of {args.pairs}: safety on {overhead['safe_seconds_median']:.1f} s, "
          f"off {overhead['unsafe_seconds_median']:.1f} s, ratio {overhead['ratio']:.3f}; time inside the safety "
          f"code {overhead['seconds_inside_safety_code_median']:.2f} s "
          f"({100 * overhead['share_inside_safety_code']:.1f}%)")
    print()
    print("| killed with SIGKILL | rows kept | rows recomputed by the next run | rows after it | next run, s |")
    print("|---|---|---|---|---|")
    for k in kills:
        note = "" if k["caught"] else " (finished first)"
        print(f"| after {k['kill']}{note} | {k['rows_kept']} | {k['rows_recomputed']} | {k['rows_after_rerun']} | "
              f"{k['rerun_seconds']:.1f} |")


if __name__ == "__main__":
    main()
