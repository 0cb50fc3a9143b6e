"""Feature extraction speed against the way a Keras user would do it, and memory as data grows.

    .venv/bin/python bench/speed.py [--repeats 3] [--phone-images 200]

Image sets, all under ../shared/datasets/dogs_vs_cats_1k:
- ordinary: the 1,000 JPEGs as they are (about 500 x 375);
- phone: the first --phone-images of them upscaled to 4032 x 3024 with mild noise (sigma 3, so
  they compress and decode like real photos rather than smooth upscales) and re-encoded as JPEG
  quality 92; made by this benchmark into bench/.phone_images (git-ignored).
Per set and repeat, in separate processes and in alternating order:
- naive: keras.utils.image_dataset_from_directory + model.predict on the same Keras backbone;
- pipeline (keras): `features.run` on an empty cache, files on disk to HDF5;
- pipeline (litert): the same with features.runtime=litert.
Every process builds the backbone from the same converted weights, and the times exclude only
interpreter start and imports. Then: an incremental run adding 10 images to the 1,000 (vs the full
run), and peak memory of the features stage at 1,000 and 4,000 images (3,000 made by flipping and
re-encoding). Medians; Markdown on stdout, JSON in bench/results/speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "datasets" / "dogs_vs_cats_1k"
ONCE = ROOT / "bench" / "_features_once.py"


def measure(*args: str) -> dict:
    """Run _features_once.py; its JSON plus the process's peak RSS in MB."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, str(ONCE), *args], stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{args} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024
    return result


def warm_cache(cache: Path) -> None:
    """Converted weights (and LiteRT files) made once, copied into every fresh cache."""
    measure("pipeline", str(SOURCE), str(cache), "features.runtime=litert")
    measure("pipeline", str(SOURCE), str(cache / "k"), "features.runtime=keras")
    shutil.rmtree(cache / "features"), shutil.rmtree(cache / "k")


def fresh_cache(warm: Path, into: Path) -> Path:
    shutil.copytree(warm / "weights", into / "weights")
    return into


def make_phone_images(count: int) -> Path:
    folder = ROOT / "bench" / ".phone_images"
    marker = folder / f".complete-{count}"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (folder / label).mkdir(parents=True)
        for path in sorted((SOURCE / label).iterdir())[: count // 2]:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image).convert("RGB").resize((4032, 3024), Image.BICUBIC)
            pixels = np.asarray(image, np.float32) + rng.normal(0, 3, (3024, 4032, 3)).astype(np.float32)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / label / path.name, quality=92)
    marker.touch()
    return folder


def link_tree(target: Path, sources: list[tuple[str, Path]]) -> Path:
    for label, path in sources:
        (target / label).mkdir(parents=True, exist_ok=True)
        os.symlink(path, target / label / path.name)
    return target


def variants(target: Path, copies: int) -> Path:
    """The 1,000 images plus `copies - 1` re-encoded variants of each (new bytes, same photo)."""
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
    if not SOURCE.is_dir():
        raise SystemExit(f"no {SOURCE}; this benchmark needs the shared photo datasets")
    results: dict = {"sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm = tmp / "warm"
        warm_cache(warm)
        sets = {"ordinary JPEGs (~500x375), 1,000": SOURCE,
                f"phone-sized JPEGs (4032x3024, made here), {args.phone_images}": make_phone_images(args.phone_images)}
        for name, root in sets.items():
            runs: dict = {"naive": [], "pipeline (keras)": [], "pipeline (litert)": []}
            for repeat in range(args.repeats):
                order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
                for how in order:
                    cache = fresh_cache(warm, tmp / f"c-{len(os.listdir(tmp))}")
                    if how == "naive":
                        runs[how].append(measure("naive", str(root), str(cache)))
                    else:
                        runtime = "litert" if "litert" in how else "keras"
                        runs[how].append(measure("pipeline", str(root), str(cache), f"features.runtime={runtime}"))
                    shutil.rmtree(cache)
            summary = {}
            for how, values in runs.items():
                seconds = statistics.median(v["seconds"] for v in values)
                summary[how] = {"images": values[0]["images"], "seconds_median": seconds,
                                "images_per_second": values[0]["images"] / seconds,
                                "peak_mb_median": statistics.median(v["peak_mb"] for v in values),
                                "runs_seconds": [v["seconds"] for v in values]}
            for how in ("pipeline (keras)", "pipeline (litert)"):
                summary[how]["ratio_to_naive"] = summary[how]["images_per_second"] / summary["naive"]["images_per_second"]
            results["sets"][name] = summary

        # Incremental: 10 new images on top of a cached 1,000.
        runtime = "features.runtime=" + os.environ.get("BENCH_RUNTIME", "litert")
        root = link_tree(tmp / "incremental", [(l, p) for l in ("cats", "dogs") for p in sorted((SOURCE / l).iterdir())])
        cache = fresh_cache(warm, tmp / "incremental-cache")
        full = measure("pipeline", str(root), str(cache), runtime)
        for i, path in enumerate(sorted((SOURCE / "cats").iterdir())[:10]):
            with Image.open(path) as image:
                ImageOps.flip(image.convert("RGB")).save(root / "cats" / f"new_{i}.jpg", quality=90)
        added = measure("pipeline", str(root), str(cache), runtime)
        hit = measure("pipeline", str(root), str(cache), runtime)
        results["incremental"] = {"full_seconds": full["seconds"], "add_10_seconds": added["seconds"],
                                  "new": added["new"], "ratio": added["seconds"] / full["seconds"],
                                  "nothing_changed_seconds": hit["seconds"]}

        # Memory at 1,000 and 4,000 images.
        memory = {}
        for copies in (1, 4):
            root = variants(tmp / f"mem-{copies}", copies)
            cache = fresh_cache(warm, tmp / f"mem-cache-{copies}")
            run = measure("pipeline", str(root), str(cache), runtime)
            memory[run["images"]] = {"peak_mb": run["peak_mb"], "seconds": run["seconds"]}
        results["memory"] = memory
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "speed.json").write_text(json.dumps(results, indent=2))

    print("| image set | method | images/s (median) | ratio to naive | peak MB |")
    print("|---|---|---|---|---|")
    for name, summary in results["sets"].items():
        for how, s in summary.items():
            ratio = f"{s['ratio_to_naive']:.2f}x" if "ratio_to_naive" in s else "1.00x"
            print(f"| {name} | {how} | {s['images_per_second']:.1f} | {ratio} | {s['peak_mb_median']:.0f} |")
    inc = results["incremental"]
    print(f"\nincremental ({runtime}): full run over 1,000 images {inc['full_seconds']:.1f} s; adding 10 "
          f"{inc['add_10_seconds']:.2f} s ({100 * inc['ratio']:.1f}% of the full run); nothing changed "
          f"{inc['nothing_changed_seconds']:.2f} s")
    sizes = sorted(results["memory"])
    print(f"peak memory ({runtime}): " + ", ".join(f"{n:,} images {results['memory'][n]['peak_mb']:.0f} MB"
                                                 for n in sizes)
          + f" (ratio {results['memory'][sizes[-1]]['peak_mb'] / results['memory'][sizes[0]]['peak_mb']:.3f})")


if __name__ == "__main__":
    main()
