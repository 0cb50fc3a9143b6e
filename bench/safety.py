"""What the safety measures cost, and what a kill -9 loses, on ../shared/datasets/dogs_vs_cats_1k.

    .venv/bin/python bench/safety.py [--pairs 6]

1. Overhead. The features stage on an empty cache, in this process, from weights converted once
   beforehand (a copy of them in every run's cache, so no run pays a conversion):
   - "on": as shipped: a part file committed every 256 photos (temporary name + rename), the
     parts read back and merged, fletcher32 checksums on the cache, the file lock, and the
     checksum pass the next run makes over the cache;
   - "off": none of it: no lock, rows kept in memory and written once into the cache file,
     no part file at all, no checksums, no checksum pass.
   Alternately, median of --pairs runs each; and, in the "on" runs, the seconds spent inside the
   safety code itself: the lock, writing parts, reading them back (index and rows), the checksum
   pass, plus the cost of the fletcher32 filter (the same table written with and without it).
2. Kill test: ``python -m pipeline features`` is killed with SIGKILL after its 1st and 3rd committed
   part and during its final merge; what the next run kept and recomputed is counted.
Results: Markdown on stdout and bench/results/safety.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
from harness import ROOT, SOURCE, require

from pipeline import layout
from pipeline import params as params_mod  # noqa: E402
from pipeline.project import open_project
from pipeline.stages import features  # noqa: E402
from pipeline.store import parts as parts_mod  # noqa: E402
from pipeline.store import table


class Patches:
    """Replaces module attributes for one run and puts them back."""

    def __init__(self):
        self.saved = []

    def set(self, owner, name, value):
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def timed(self, owner, name, clock: list):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock[0] += time.perf_counter() - started

        self.set(owner, name, wrapper)

    def restore(self):
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)


class _NoLock:
    def __init__(self, path):
        pass

    def acquire(self, timeout=None):
        return self

    def release(self):
        pass


def _in_memory_parts(patches: Patches) -> None:
    """Safety off: rows stay in memory and go straight into the cache file; no part is ever written."""
    store = {"rows": {}, "bad": {}, "meta": {}}

    def write(folder, key, meta, shas, columns, bad):
        store["meta"] = meta
        store["rows"].update(dict(zip(shas, columns["features"])))
        store["bad"].update(dict(bad))

    class MemoryParts(parts_mod.Parts):
        def row(self, sha256, column="features"):
            return store["rows"][sha256]

    def read(folder, key):
        parts = MemoryParts(meta=store["meta"], bad=dict(store["bad"]))
        parts.rows = {(sha, "features"): (0, i) for i, sha in enumerate(store["rows"])}
        return parts

    patches.set(parts_mod, "write", write)
    patches.set(parts_mod, "read", read)
    patches.set(parts_mod.Parts, "remove", lambda self: None)
    patches.set(features, "FileLock", _NoLock)
    patches.set(table, "verify_features", lambda path: None)
    original_create = h5py.Group.create_dataset

    def no_checksum(self, *args, **kwargs):
        kwargs["fletcher32"] = False
        return original_create(self, *args, **kwargs)

    patches.set(h5py.Group, "create_dataset", no_checksum)


def one_run(safe: bool, weights: Path) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        shutil.copytree(weights, project / "cache" / "weights")
        params = params_mod.build({"paths": {"weights_dir": "cache/weights"}, "data": {"root": str(SOURCE)}}, "bench")
        patches, inside = Patches(), [0.0]
        if safe:
            patches.timed(parts_mod, "write", inside)
            patches.timed(parts_mod, "read", inside)
            patches.timed(parts_mod.Parts, "row", inside)
            patches.timed(table, "verify_features", inside)
            timed_lock = type("TimedLock", (features.FileLock,), {})
            patches.timed(timed_lock, "acquire", inside)
            patches.timed(timed_lock, "release", inside)
            patches.set(features, "FileLock", timed_lock)
        else:
            _in_memory_parts(patches)
        try:
            started = time.perf_counter()
            features.run(open_project(params, project))
            if safe:  # the checksum pass the next run makes over this cache
                table.verify_features(layout.cache_file(params, project))
            elapsed = time.perf_counter() - started
        finally:
            patches.restore()
        if safe:
            inside[0] += fletcher32_cost(layout.cache_file(params, project))
        return elapsed, inside[0]


def fletcher32_cost(path: Path) -> float:
    """Seconds the checksum filter adds to writing this cache: the same table written with and without."""
    rows = table.read_index(path)[0]
    data = table.read_table(path).features
    attrs = table.read_attrs(path)
    times = {}
    for checksum in (True, False):
        original = h5py.Group.create_dataset

        def create(self, *args, _checksum=checksum, **kwargs):
            if "fletcher32" in kwargs:
                kwargs["fletcher32"] = kwargs["fletcher32"] and _checksum
            return original(self, *args, **kwargs)

        h5py.Group.create_dataset = create
        try:
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                table.write_table(Path(tmp) / "t.h5", rows, lambda a, b: data[a:b], data.shape[1:], "float32", attrs)
                times[checksum] = time.perf_counter() - started
        finally:
            h5py.Group.create_dataset = original
    return max(0.0, times[True] - times[False])


def kill_test(point: str, weights: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        shutil.copytree(weights, project / "cache" / "weights")
        (project / "params.yaml").write_text(json.dumps({"paths": {"weights_dir": "cache/weights"}, "data": {"root": str(SOURCE)}}))
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "features"], cwd=project, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        folder = project / "cache" / "features"

        def reached():
            if point == "merge":
                return any(folder.glob(".*.h5.*.tmp"))
            return len(list(folder.glob("*.parts/part-*.h5"))) >= int(point.split()[1])

        while process.poll() is None and not reached():
            time.sleep(0.002)
        caught = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        kept = sum(len(h5py.File(p)["sha256"]) for p in folder.glob("*.parts/part-*.h5"))
        kept += sum(len(table.read_index(p)[0]) for p in folder.glob("*.h5"))
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "pipeline", "features"], cwd=project, env=env,
                             capture_output=True, text=True)
        seconds = time.perf_counter() - started
        line = [l for l in out.stderr.splitlines() if "to featurise" in l or "cache hit" in l]
        rows = len(table.read_index(next(folder.glob("*.h5")))[0])
        recomputed = int(line[0].split()[1]) if line and "to featurise" in line[0] else 0
        return {"kill": point, "caught": caught, "rows_kept": kept, "rows_recomputed": recomputed,
                "rows_after_rerun": rows, "rerun_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    require(SOURCE)
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp)
        features.run(open_project(params_mod.build({"paths": {"weights_dir": "cache/weights"}, "data": {"root": str(SOURCE)}}, "bench"), warm))  # converts once
        weights = warm / "cache" / "weights"
        one_run(True, weights)  # warm-up: file system cache
        on, off, inside = [], [], []
        for i in range(args.pairs):
            for safe in ((True, False) if i % 2 == 0 else (False, True)):  # alternate the order: no drift bias
                seconds, in_safety = one_run(safe, weights)
                if safe:
                    on.append(seconds), inside.append(in_safety)
                else:
                    off.append(seconds)
        kills = [kill_test(point, weights) for point in ("part 1", "part 3", "merge")]
    overhead = {"safe_seconds_median": statistics.median(on), "unsafe_seconds_median": statistics.median(off),
                "ratio": statistics.median(on) / statistics.median(off),
                "seconds_inside_safety_code_median": statistics.median(inside),
                "share_inside_safety_code": statistics.median(inside) / statistics.median(on),
                "runs_on": on, "runs_off": off, "inside": inside}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "safety.json").write_text(json.dumps({"overhead": overhead, "kills": kills},
                                                                       indent=2))
    print(f"features stage, 1,000 photos, median of {args.pairs}: safety on {overhead['safe_seconds_median']:.2f} s, "
          f"off {overhead['unsafe_seconds_median']:.2f} s, ratio {overhead['ratio']:.3f}; time inside the safety "
          f"code {overhead['seconds_inside_safety_code_median']:.3f} s "
          f"({100 * overhead['share_inside_safety_code']:.1f}% of the 'on' run)")
    print()
    print("| killed with SIGKILL | rows kept | rows recomputed by the next run | rows after it | next run, s |")
    print("|---|---|---|---|---|")
    for k in kills:
        note = "" if k["caught"] else " (finished first)"
        print(f"| after {k['kill']}{note} | {k['rows_kept']} | {k['rows_recomputed']} | {k['rows_after_rerun']} | "
              f"{k['rerun_seconds']:.1f} |")


if __name__ == "__main__":
    main()
