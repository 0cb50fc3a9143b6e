"""Feature extraction speed against the way a Keras user would do it, the machine's ceiling, and memory.

    .venv/bin/python bench/speed.py [--repeats 3] [--phone-images 200]

Every method is a whole process, timed from start to exit: imports, loading the backbone,
listing and hashing, decoding, the backbone, writing, on an empty feature cache (a new dataset).
Each is timed two ways:
- *new dataset*: the machine has converted the backbone before (a weights folder holding the
  Keras weights converted from the .pth, which the naive way loads too, the checked LiteRT files,
  the int8 one): what every dataset after the first gets;
- *first on the machine*: an empty weights folder, so the run makes those conversions itself
  (for int8: the calibration on generic photos and the int8 conversion; for naive: the .pth).
Peak memory is the process's own (new dataset).

Methods, per image set, in alternating order, --repeats times, medians:
- naive: ``keras.utils.image_dataset_from_directory`` + ``model.predict`` (bench/_naive.py);
- pipeline, the default: ``python -m pipeline features`` (LiteRT, ``decode: reduced``);
- pipeline, ``decode: full`` and (phone-sized set) ``decode: draft``;
- pipeline, ``precision: int8``;
- pipeline, ``runtime: keras``.
Image sets: the 1,000 dogs-vs-cats JPEGs (~500 x 375); phone-sized: the first --phone-images
upscaled to 4032 x 3024 with mild noise, JPEG quality 92 (bench/harness.py).

Also: the ceiling, the LiteRT backbone alone (random inputs made beforehand, 1 and 2 threads,
batch 1 and 32; float32 and int8) and the stage's in-stage rate as a share of the best of it; an incremental run adding 10
photos to the cached 1,000; peak memory at 1,000 and 4,000 photos (3,000 flipped re-encodes).
Results: Markdown on stdout and bench/results/speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import ROOT, SOURCE, cli, make_phone_images, measured, require  # noqa: E402
from PIL import Image, ImageOps


def measure_naive(root: Path, cache: Path) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = measured([sys.executable, str(ROOT / "bench" / "_naive.py"), str(root), str(cache)], env=env)
    if result["returncode"]:
        raise SystemExit(f"naive failed:\n{result['stderr'][-3000:]}")
    return {"seconds": result["seconds"], "peak_mb": result["peak_mb"],
            "images": json.loads(result["stdout"].strip().splitlines()[-1])["images"]}


def project_for(root: Path, work: Path, warm: Path | None, **features) -> Path:
    """A fresh project on ``root`` whose cache holds only the machine's converted weights (none: ``warm``
    None)."""
    project = Path(tempfile.mkdtemp(dir=work))
    (project / "cache").mkdir()
    if warm is not None:
        shutil.copytree(warm, project / "cache" / "weights")
    (project / "params.yaml").write_text(json.dumps({"paths": {"weights_dir": "cache/weights"}, "data": {"root": str(root)}, "features": features}))
    return project


def measure_pipeline(root: Path, work: Path, warm: Path | None, **features) -> dict:
    project = project_for(root, work, warm, **features)
    result = cli(project, "features")
    stage = re.search(r"featurised (\d+) image\(s\) in ([\d.]+) s", result["stderr"])
    shutil.rmtree(project)
    return {"seconds": result["seconds"], "peak_mb": result["peak_mb"], "images": int(stage.group(1)),
            "in_stage_images_per_second": int(stage.group(1)) / float(stage.group(2))}


def warm_weights(work: Path) -> Path:
    """Convert once (the .pth to Keras weights; Keras to a verified LiteRT file) into one folder."""
    project = Path(tempfile.mkdtemp(dir=work))
    small = project / "photos"
    for label in ("cats", "dogs"):
        (small / label).mkdir(parents=True)
        for path in sorted((SOURCE / label).iterdir())[:8]:
            shutil.copy(path, small / label / path.name)
    (project / "params.yaml").write_text(json.dumps({"paths": {"weights_dir": "cache/weights"}, "data": {"root": "photos"}}))
    cli(project, "features")
    cli(project, "features", "--set", "features.runtime=keras")
    cli(project, "features", "--set", "features.precision=int8")  # calibrated on generic photos
    return project / "cache" / "weights"


def ceiling(tflite: Path, seconds: float = 8.0) -> dict:
    """Images per second of the LiteRT backbone alone, on inputs made beforehand."""
    from ai_edge_litert.interpreter import Interpreter

    out = {}
    rng = np.random.default_rng(0)
    for threads in (1, 2):
        for batch in (1, 32):
            interpreter = Interpreter(model_path=str(tflite), num_threads=threads)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, (batch, 224, 224, 3))
            interpreter.allocate_tensors()
            x = rng.uniform(0, 255, (batch, 224, 224, 3)).astype(np.float32)
            interpreter.set_tensor(index, x)
            interpreter.invoke()  # warm up
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                interpreter.set_tensor(index, x)
                interpreter.invoke()
                done += batch
            out[f"{threads} thread(s), batch {batch}"] = done / (time.perf_counter() - started)
    return out


def link_tree(target: Path, sources: list[tuple[str, Path]]) -> Path:
    for label, path in sources:
        (target / label).mkdir(parents=True, exist_ok=True)
        os.symlink(path, target / label / path.name)
    return target


def variants(target: Path, copies: int) -> Path:
    """The 1,000 photos plus `copies - 1` re-encoded variants of each (new bytes, same photo)."""
    for label in ("cats", "dogs"):
        (target / label).mkdir(parents=True)
        for path in sorted((SOURCE / label).iterdir()):
            os.symlink(path, target / label / path.name)
            with Image.open(path) as image:
                image = image.convert("RGB")
            for k in range(1, copies):
                variant = ImageOps.mirror(image) if k % 2 else image
                variant.save(target / label / f"{path.stem}_v{k}.jpg", quality=80 + k)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phone-images", type=int, default=200)
    args = parser.parse_args()
    require(SOURCE)
    results: dict = {"sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        warm = warm_weights(work)
        results["ceiling"] = ceiling(next(p for p in warm.glob("*-pooled-224.tflite")))
        results["ceiling_int8"] = ceiling(next(p for p in warm.glob("*-pooled-224-int8-*.tflite")))
        sets = {"ordinary JPEGs (~500x375), 1,000": (SOURCE, False),
                f"phone-sized JPEGs (4032x3024, made here), {args.phone_images}":
                    (make_phone_images(args.phone_images), True)}
        for name, (root, phone) in sets.items():
            methods = {"naive": lambda r, w: measure_naive(r, warm_copy(work, w)),
                       "pipeline, the default (litert, decode: reduced)": lambda r, w: measure_pipeline(r, work, w),
                       "pipeline, decode: full": lambda r, w: measure_pipeline(r, work, w, decode="full"),
                       "pipeline, precision: int8": lambda r, w: measure_pipeline(r, work, w, precision="int8"),
                       "pipeline, runtime: keras": lambda r, w: measure_pipeline(r, work, w, runtime="keras")}
            if phone:
                methods["pipeline, decode: draft"] = lambda r, w: measure_pipeline(r, work, w, decode="draft")
            runs: dict = {how: {"new": [], "first": []} for how in methods}
            for repeat in range(args.repeats):
                order = list(methods) if repeat % 2 == 0 else list(reversed(methods))
                for how in order:
                    runs[how]["new"].append(methods[how](root, warm))
                    runs[how]["first"].append(methods[how](root, None))
                print(name, "repeat", repeat, {how: round(r["new"][-1]["seconds"], 1) for how, r in runs.items()},
                      flush=True)
            summary = {}
            for how, both in runs.items():
                values, first = both["new"], both["first"]
                seconds = statistics.median(v["seconds"] for v in values)
                first_seconds = statistics.median(v["seconds"] for v in first)
                summary[how] = {"images": values[0]["images"], "seconds_median": seconds,
                                "images_per_second": values[0]["images"] / seconds,
                                "first_seconds_median": first_seconds,
                                "first_images_per_second": values[0]["images"] / first_seconds,
                                "peak_mb_median": statistics.median(v["peak_mb"] for v in values),
                                "runs_seconds": [v["seconds"] for v in values],
                                "first_runs_seconds": [v["seconds"] for v in first]}
                if "in_stage_images_per_second" in values[0]:
                    summary[how]["in_stage_images_per_second"] = statistics.median(
                        v["in_stage_images_per_second"] for v in values)
            for how in summary:
                summary[how]["ratio_to_naive"] = summary[how]["images_per_second"] / summary["naive"]["images_per_second"]
                summary[how]["first_ratio_to_naive"] = (summary[how]["first_images_per_second"] /
                                                        summary["naive"]["first_images_per_second"])
            results["sets"][name] = summary

        # Incremental: 10 new photos on top of a cached 1,000.
        root = link_tree(work / "incremental", [(l, p) for l in ("cats", "dogs") for p in sorted((SOURCE / l).iterdir())])
        project = project_for(root, work, warm)
        full = cli(project, "features")
        for i, path in enumerate(sorted((SOURCE / "cats").iterdir())[:10]):
            with Image.open(path) as image:
                ImageOps.flip(image.convert("RGB")).save(root / "cats" / f"new_{i}.jpg", quality=90)
        added = cli(project, "features")
        hit = cli(project, "features")
        results["incremental"] = {"full_seconds": full["seconds"], "add_10_seconds": added["seconds"],
                                  "ratio": added["seconds"] / full["seconds"], "nothing_changed_seconds": hit["seconds"]}

        # Memory at 1,000 and 4,000 photos.
        memory = {}
        for copies in (1, 4):
            root = variants(work / f"mem-{copies}", copies)
            run = measure_pipeline(root, work, warm)
            memory[run["images"]] = {"peak_mb": run["peak_mb"], "seconds": run["seconds"]}
        results["memory"] = memory
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "speed.json").write_text(json.dumps(results, indent=2))

    print("LiteRT backbone alone (EfficientNet-Lite0, 224 px, inputs made beforehand), images/s: float32 " +
          ", ".join(f"{k} {v:.0f}" for k, v in results["ceiling"].items()) + "; int8 " +
          ", ".join(f"{k} {v:.0f}" for k, v in results["ceiling_int8"].items()))
    print()
    print("| image set | method | new dataset: img/s, whole process | ratio to naive | first on the machine: "
          "img/s | ratio to naive | in stage img/s | share of the ceiling | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, summary in results["sets"].items():
        for how, s in summary.items():
            stage = s.get("in_stage_images_per_second")
            best = max(results["ceiling_int8" if "int8" in how else "ceiling"].values())
            cells = (f"{stage:.1f} | {100 * stage / best:.0f}%" if stage else "- | -")
            print(f"| {name} | {how} | {s['images_per_second']:.1f} | {s['ratio_to_naive']:.2f}x | "
                  f"{s['first_images_per_second']:.1f} | {s['first_ratio_to_naive']:.2f}x | {cells} | "
                  f"{s['peak_mb_median']:.0f} |")
    inc = results["incremental"]
    print(f"\nincremental: full run over 1,000 photos {inc['full_seconds']:.1f} s; adding 10 "
          f"{inc['add_10_seconds']:.2f} s ({100 * inc['ratio']:.1f}% of the full run); nothing changed "
          f"{inc['nothing_changed_seconds']:.2f} s (whole processes)")
    sizes = sorted(results["memory"])
    print("peak memory: " + ", ".join(f"{n:,} photos {results['memory'][n]['peak_mb']:.0f} MB" for n in sizes)
          + f" (ratio {results['memory'][sizes[-1]]['peak_mb'] / results['memory'][sizes[0]]['peak_mb']:.3f})")


def warm_copy(work: Path, warm: Path | None) -> Path:
    """A cache folder holding the machine's converted weights (none: ``warm`` None), for the naive way."""
    cache = Path(tempfile.mkdtemp(dir=work))
    if warm is not None:
        shutil.copytree(warm, cache / "weights")
    return cache


if __name__ == "__main__":
    main()
