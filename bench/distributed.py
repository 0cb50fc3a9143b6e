"""The Ray engine against the local one, the driver's merge at scale, and what scanning costs.

    .venv/bin/python bench/distributed.py [--repeats 3] [--rows 100000 1000000]

(needs the Ray extra: make setup-ray)
1. The local and Ray engines on the same photos (dogs_vs_cats_1k, EfficientNet-Lite0, default
   params), each ``python -m pipeline features`` as a whole process on an empty feature cache,
   warm alike (weights converted beforehand), alternating, medians; the Ray runs start their own
   local Ray of this machine's 2 CPUs (``features.ray_address: null``), so its start-up is counted.
   The overhead is the Ray run's extra time over the local one, in %.
2. The driver's merge: N synthetic rows (1280 float32 each, random sha256s) committed as part
   files of 256 rows, then merged into the cache file exactly as the features stage does; in a
   process of its own: seconds, peak memory, file size.
3. Scanning: ``scan`` of 10k files (the shared photos, copied with other trailing bytes), first
   with every file read and hashed, then again with the stat index (unchanged files are not read).
4. CPU-seconds per photo on one core: decoding and resizing (the dogs-vs-cats JPEGs, ~500 x 375,
   and phone-sized 4032 x 3024 ones, whole and draft), and the LiteRT backbone alone with one
   thread (float32 and int8), medians; the inputs of docs/scale.md's plan.
Results: Markdown on stdout and bench/results/distributed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import DATASETS, ROOT, cli, measured, require  # noqa: E402

MERGE = r"""
import json, sys, time, hashlib, os
from pathlib import Path
import numpy as np
from pipeline.featurise import merge
from pipeline.store import parts as parts_mod
n, folder = int(sys.argv[1]), Path(sys.argv[2])
rng = np.random.default_rng(0)
parts_dir = folder / "cache.parts"
meta = {"weights_sha256": "w", "feature_shape": (1280,)}
shas = sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(n))
started = time.perf_counter()
for start in range(0, n, 256):
    chunk = shas[start:start + 256]
    parts_mod.write(parts_dir, "k", meta, chunk, {"features": list(rng.standard_normal((len(chunk), 1280), np.float32))}, [])
committed = time.perf_counter() - started
import resource
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
parts = parts_mod.read(parts_dir, "k")
sources = merge.Sources(folder / "cache.h5", merge.Existing(), parts, (1280,))
attrs = {"key": "k", "views": ["original"]}
merge.merge(folder / "cache.h5", shas, (1280,), "float32", attrs, [], sources)
parts.remove()
merged = time.perf_counter() - started
print(json.dumps({"rows": n, "commit_seconds": committed, "merge_seconds": merged,
                  "file_gb": (folder / "cache.h5").stat().st_size / 1e9, "peak_mb_before_merge": before}))
"""


def merge_at(n: int, work: Path) -> dict:
    folder = work / f"merge-{n}"
    folder.mkdir()
    run = measured([sys.executable, "-c", MERGE, str(n), str(folder)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    shutil.rmtree(folder)
    return {**json.loads(run["stdout"].strip().splitlines()[-1]), "peak_mb": run["peak_mb"]}


def scan_cost(work: Path, n: int = 10_000) -> dict:
    from scale import make_photos

    from pipeline import params as params_mod
    from pipeline import scan

    root = make_photos(work / "scan" / "photos", n)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    data = params_mod.build({"data": {"root": str(root)}}, "bench").data
    index = work / "scan" / "index.json"
    started = time.perf_counter()
    first = scan.scan(data, work, index_path=index)
    hashed = time.perf_counter() - started
    started = time.perf_counter()
    again = scan.scan(data, work, index_path=index)
    indexed = time.perf_counter() - started
    assert first.files_read == n and again.files_read == 0
    return {"files": n, "mb": size / 1e6, "hash_seconds": hashed, "indexed_seconds": indexed,
            "mb_per_second": size / 1e6 / hashed}


def cpu_seconds(work: Path) -> dict:
    """Seconds of one core per photo: decode + resize, and the backbone alone."""
    from harness import SOURCE, make_phone_images

    from pipeline.backbones.litert import LiteRTBackbone
    from pipeline.data.decode import decode_rgb
    from pipeline.data.resize import fit_to_size

    out = {}
    ordinary = sorted(SOURCE.rglob("*.jpg"))[:200]
    phone = sorted(make_phone_images(200).rglob("*.jpg"))[:20]
    for label, files, draft in (("decode+resize, ~500x375 JPEG", ordinary, 0),
                                ("decode+resize, 4032x3024 JPEG, whole", phone, 0),
                                ("decode+resize, 4032x3024 JPEG, draft", phone, 224)):
        times = []
        for file in files:
            started = time.perf_counter()
            fit_to_size(decode_rgb(file, draft), 224)
            times.append(time.perf_counter() - started)
        out[label] = statistics.median(times)
    project = work / "cpu"
    project.mkdir()
    (project / "params.yaml").write_text(json.dumps({"paths": {"weights_dir": "cache/weights"}, "data": {"root": str(SOURCE)}}))
    cli(project, "features", "--set", "features.precision=int8")
    cli(project, "features")
    import numpy as np

    x = np.random.default_rng(0).uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
    for label, pattern in (("backbone, float32, 1 thread", "*-pooled-224.tflite"),
                           ("backbone, int8, 1 thread", "*-pooled-224-int8.tflite")):
        backbone = LiteRTBackbone(next((project / "cache" / "weights").glob(pattern)), threads=1)
        backbone.predict(x)
        times = []
        for _ in range(200):
            started = time.perf_counter()
            backbone.predict(x)
            times.append(time.perf_counter() - started)
        out[label] = statistics.median(times)
    return out


def engines(work: Path, repeats: int) -> dict:
    warm = work / "warm"
    warm.mkdir()
    (warm / "params.yaml").write_text(json.dumps({"paths": {"weights_dir": "cache/weights"}, "data": {"root": str(DATASETS / "dogs_vs_cats_1k")}}))
    cli(warm, "features")
    runs: dict = {"local": [], "ray": []}
    for repeat in range(repeats):
        for engine in (("local", "ray") if repeat % 2 == 0 else ("ray", "local")):
            project = Path(tempfile.mkdtemp(dir=work))
            (project / "cache").mkdir()
            shutil.copytree(warm / "cache" / "weights", project / "cache" / "weights")
            (project / "params.yaml").write_text(json.dumps({"paths": {"weights_dir": "cache/weights"}, "data": {"root": str(DATASETS / "dogs_vs_cats_1k")},
                                                             "features": {"engine": engine}}))
            result = cli(project, "features")
            runs[engine].append(result["seconds"])
            shutil.rmtree(project)
    local, distributed = statistics.median(runs["local"]), statistics.median(runs["ray"])
    return {"local_seconds": local, "ray_seconds": distributed, "overhead_percent": 100 * (distributed / local - 1),
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    require(DATASETS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"engines": engines(work, args.repeats), "merge": [merge_at(n, work) for n in args.rows],
                   "scan": scan_cost(work), "cpu_seconds_per_photo": cpu_seconds(work)}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "distributed.json").write_text(json.dumps(results, indent=2))
    e = results["engines"]
    print(f"features, dogs_vs_cats_1k (1,000 photos), whole processes, median of {args.repeats}: local "
          f"{e['local_seconds']:.1f} s, Ray {e['ray_seconds']:.1f} s (overhead {e['overhead_percent']:+.0f}%)")
    print()
    print("| rows merged by the driver | committing the parts, s | merge, s | peak MB | cache file GB |")
    print("|---|---|---|---|---|")
    for m in results["merge"]:
        print(f"| {m['rows']:,} | {m['commit_seconds']:.1f} | {m['merge_seconds']:.1f} | {m['peak_mb']:.0f} | "
              f"{m['file_gb']:.2f} |")
    s = results["scan"]
    print(f"\nscan of {s['files']:,} files ({s['mb']:.0f} MB): {s['hash_seconds']:.1f} s read and hashed "
          f"({s['mb_per_second']:.0f} MB/s), {s['indexed_seconds']:.2f} s again with the stat index")
    print("\n| one core, per photo | milliseconds (median) |\n|---|---|")
    for label, seconds in results["cpu_seconds_per_photo"].items():
        print(f"| {label} | {1000 * seconds:.1f} |")


if __name__ == "__main__":
    main()
