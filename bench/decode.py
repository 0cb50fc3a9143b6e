"""Phone photos: which JPEG decoder at which scale, and what the reduced decode costs in accuracy.

    .venv/bin/python bench/decode.py [--work DIR] [--seeds 5] [--skip-decoders]

Every phone-sized photo here is made by the benchmark (bench/harness.py): a shared-dataset photo
upscaled to 4032 x 3024 with mild noise and re-encoded as JPEG quality 92.

1. Decoders, on 40 phone-sized photos: per photo, ms of one core to decode, to decode and resize to
   224 x 224 (``FitToSize``), and ms per photo with 2 threads (does the GIL limit the threads?).
   Pillow whole and ``draft``, OpenCV whole and ``IMREAD_REDUCED_*``, simplejpeg and libvips
   shrink-on-load where they are installed (``pip install simplejpeg pyvips pyvips-binary``).
2. Accuracy: all 2,000 photos of both shared sets made phone-sized (7 classes: the 5 breeds, cats,
   dogs), featurised by the features stage with ``decode: full``, ``reduced`` and ``draft``. For each
   seed, a stratified split 40/10/50 (train/val/test, 1,000 test photos): the default head
   (``C: auto``) trained on each decode's train and val features, tested on the test photos decoded
   whole, as an app decodes them. Reported: the difference to the head trained on whole decodes, and
   the same with C fixed at the value the whole decodes' head chose (the decode's effect alone: C
   chosen on 200 val photos moves accuracy by itself).
3. What an app gets: a project with the default params on the same photos (``test_fraction: 0.5``):
   features, train-head, export; then README's TensorFlow snippet (the SavedModel on the whole
   photo) against ``python -m pipeline predict --format json`` on every test photo.
Raw numbers: bench/results/decode.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from harness import DATASETS, ROOT, make_phone_dataset, make_phone_images, require, seeded_split  # noqa: E402

from pipeline import params as params_mod  # noqa: E402
from pipeline.project import open_project
from pipeline.stages import features  # noqa: E402
from pipeline.store import table as feature_store  # noqa: E402
from pipeline.training.heads import LogRegHead  # noqa: E402


def decoders() -> dict:
    import cv2
    from PIL import Image

    from pipeline.backbones.litert import keep_freed_memory
    from pipeline.data.resize import fit_to_size

    keep_freed_memory()  # as the features stage does: large arrays from the heap, not fresh mmaps

    def pil(data, draft=0):
        with Image.open(io.BytesIO(data)) as image:
            if draft:
                image.draft("RGB", (draft, draft))
            return np.asarray(image.convert("RGB"))

    def opencv(flag):
        return lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), flag)

    methods = {"Pillow, whole": pil, "Pillow draft, >= 2x input (1/4)": lambda d: pil(d, 448),
               "Pillow draft, >= input (1/8)": lambda d: pil(d, 224),
               "OpenCV, whole": opencv(cv2.IMREAD_COLOR_RGB),
               "OpenCV IMREAD_REDUCED_COLOR_4": opencv(cv2.IMREAD_REDUCED_COLOR_4),
               "OpenCV IMREAD_REDUCED_COLOR_8": opencv(cv2.IMREAD_REDUCED_COLOR_8)}
    try:
        import simplejpeg

        methods.update({"simplejpeg, whole": simplejpeg.decode_jpeg,
                        "simplejpeg, >= 2x input (1/4)": lambda d: simplejpeg.decode_jpeg(d, min_height=448,
                                                                                          min_width=448),
                        "simplejpeg, >= input (1/8)": lambda d: simplejpeg.decode_jpeg(d, min_height=224,
                                                                                       min_width=224)})
    except ImportError:
        print("simplejpeg not installed: skipped", flush=True)
    try:
        import pyvips

        for shrink in (4, 8):
            methods[f"libvips shrink-on-load {shrink}"] = (
                lambda d, s=shrink: pyvips.Image.new_from_buffer(d, "", shrink=s).numpy())
    except (ImportError, OSError):
        print("pyvips not installed: skipped", flush=True)
    cv2.setNumThreads(1)
    files = sorted(make_phone_images(200).rglob("*.jpg"))[:40]
    datas = [f.read_bytes() for f in files]

    def timed(fn, threads):
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, datas))
        return (time.perf_counter() - started) / len(datas) * 1000

    out = {}
    for name, decode in methods.items():
        shape = decode(datas[0]).shape
        with_resize = lambda d, decode=decode: fit_to_size(decode(d), 224)  # noqa: E731
        runs = [[timed(decode, 1), timed(with_resize, 1), timed(with_resize, 2)] for _ in range(3)]
        decode_ms, resize_ms, two_ms = (statistics.median(r[i] for r in runs) for i in range(3))
        out[name] = {"decoded_shape": list(shape), "decode_ms": decode_ms, "decode_resize_ms": resize_ms,
                     "two_threads_ms_per_photo": two_ms, "thread_speedup": resize_ms / two_ms}
        print(name, json.dumps(out[name]), flush=True)
    return out


def phone_root(work: Path) -> Path:
    """The 7-class phone-sized set: one folder per class, links to the photos made by the benchmark."""
    root = work / "phone7"
    root.mkdir(parents=True, exist_ok=True)
    for dataset in ("dogs_vs_cats_1k", "cat_breeds_web5"):
        for folder in sorted(make_phone_dataset(dataset).iterdir()):
            if not (root / folder.name).exists():
                os.symlink(folder, root / folder.name)
    return root


def featurise(root: Path, work: Path, decode: str):
    raw = {"data": {"root": str(root)}, "features": {"decode": decode},
           "paths": {"cache_dir": str(work / "cache"), "reports_dir": str(work / "reports")}}
    params = params_mod.build(raw, "bench")
    started = time.perf_counter()
    result = features.run(open_project(params, work))
    table = feature_store.read_table(result.path)
    order = np.argsort(table.sha256)
    return table.features[order], table.labels[order], time.perf_counter() - started


def accuracy(tables: dict, seeds: int) -> dict:
    whole, labels = tables["full"][0], tables["full"][1]
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    per_seed = {decode: [] for decode in tables}
    fixed = {decode: [] for decode in tables}
    for seed in range(seeds):
        train, val, test = seeded_split(y, seed)
        chosen = None
        for decode, (x, _, _) in tables.items():  # "full" first: its C is the fixed one
            head = LogRegHead(C="auto").fit(x[train], y[train], X_val=x[val], y_val=y[val])
            chosen = chosen or head.history_["chosen_C"]
            per_seed[decode].append(float(np.mean(head.predict(whole[test]) == y[test])))
            head = LogRegHead(C=chosen).fit(x[train], y[train])
            fixed[decode].append(float(np.mean(head.predict(whole[test]) == y[test])))
        print("seed", seed, {d: round(v[-1], 4) for d, v in per_seed.items()}, flush=True)
    out = {"test_photos": int(len(test)), "train_photos": int(len(train)), "val_photos": int(len(val)),
           "seeds": seeds}
    for decode, values in per_seed.items():
        delta = np.array(values) - np.array(per_seed["full"])
        delta_fixed = np.array(fixed[decode]) - np.array(fixed["full"])
        out[decode] = {"accuracy": values, "mean": float(np.mean(values)),
                       "delta_points": (100 * delta).tolist(), "delta_mean_points": float(100 * delta.mean()),
                       "delta_sd_points": float(100 * delta.std(ddof=1)) if seeds > 1 else 0.0,
                       "fixed_C_delta_mean_points": float(100 * delta_fixed.mean()),
                       "fixed_C_delta_sd_points": float(100 * delta_fixed.std(ddof=1)) if seeds > 1 else 0.0}
    return out


def app_agreement(root: Path, work: Path) -> dict:
    """Default params, test_fraction 0.5: predict's answers against README's SavedModel snippet."""
    project = work / "app"
    project.mkdir(exist_ok=True)
    (project / "params.yaml").write_text(json.dumps({
        "data": {"root": str(root), "train_fraction": 0.4, "val_fraction": 0.1, "test_fraction": 0.5},
        "paths": {"cache_dir": str(work / "cache")}}))
    run = lambda *args: subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=project, check=True,  # noqa: E731
                                       capture_output=True, text=True)
    for stage in ("features", "train-head", "export"):
        run(stage)
    import h5py

    cache = next((work / "cache" / "features").glob("*.h5"))
    labelling = next(cache.with_suffix(".labels").glob("*.h5"))  # the one setting of the data params run here
    with h5py.File(labelling, "r") as f:
        paths = f["path"].asstr()[...][f["split"].asstr()[...] == "test"]
    listing = project / "test_photos"
    listing.mkdir(exist_ok=True)
    for i, path in enumerate(paths):  # predict takes folders: the test photos, linked under unique names
        link = listing / f"{i:05d}.jpg"
        if not link.exists():
            os.symlink(root / path, link)
    started = time.perf_counter()
    predicted = json.loads(run("predict", str(listing), "--format", "json").stdout)
    predict_seconds = time.perf_counter() - started
    app = subprocess.run([sys.executable, "-c", APP, str(project / "models"), str(listing)], check=True,
                         capture_output=True, text=True)
    answers = json.loads(app.stdout)
    same_answer = same_top1 = 0
    worst = 0.0
    for p in predicted:
        mine = answers[Path(p["path"]).name]
        same_answer += mine["answer"] == p["answer"]
        same_top1 += mine["top1"] == p["predictions"][0]["label"]
        worst = max(worst, abs(mine["p"] - p["predictions"][0]["probability"]))
    n = len(predicted)
    return {"test_photos": n, "same_answer": same_answer, "same_answer_share": same_answer / n,
            "same_top1": same_top1, "same_top1_share": same_top1 / n, "max_top1_probability_difference": worst,
            "predict_seconds": predict_seconds}


# README's TensorFlow snippet, on every photo of a folder: {name: {answer, top1, p}} as JSON.
APP = """
import json, sys, numpy as np, tensorflow as tf
from pathlib import Path
from PIL import Image, ImageOps
models, folder = Path(sys.argv[1]), Path(sys.argv[2])
serve = tf.saved_model.load(str(models / "saved_model")).signatures["serve"]
meta = json.load(open(models / "model.json"))
labels = open(models / "labels.txt").read().split()
out = {}
for path in sorted(folder.iterdir()):
    image = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))[None]
    outputs = [v.numpy() for v in serve(tf.constant(image)).values()]
    probabilities = next(o for o in outputs if o.ndim == 2)[0]
    score = next(o for o in outputs if o.ndim == 1)[0]
    top1 = labels[int(probabilities.argmax())]
    answer = meta["rejection"]["label"] if score > meta["rejection"]["threshold"] else top1
    out[path.name] = {"answer": answer, "top1": top1, "p": float(probabilities.max())}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="keep the photos' caches in this folder (default: temporary)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--skip-app", action="store_true", help="keep the app figures of the last run")
    parser.add_argument("--skip-decoders", action="store_true")
    parser.add_argument("--only-decoders", action="store_true")
    args = parser.parse_args()
    require(DATASETS)
    out = ROOT / "bench" / "results" / "decode.json"
    results = json.loads(out.read_text()) if out.is_file() else {}  # what this run skips stays as last measured
    results["command"] = "bench/decode.py"
    if not args.skip_decoders:
        results["decoders"] = decoders()
    if args.only_decoders:
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        root = phone_root(work)
        tables = {decode: featurise(root, work / decode, decode) for decode in ("full", "reduced", "draft")}
        results["features_seconds"] = {decode: t[2] for decode, t in tables.items()}
        results["accuracy"] = accuracy(tables, args.seeds)
        if not args.skip_app:
            results["app"] = app_agreement(root, work / "reduced")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if "decoders" in results:
        print("| decoder | decoded size | decode ms | decode + resize ms | 2 threads, ms per photo | speed-up |")
        print("|---|---|---|---|---|---|")
        for name, r in results["decoders"].items():
            h, w = r["decoded_shape"][:2]
            print(f"| {name} | {w} x {h} | {r['decode_ms']:.1f} | {r['decode_resize_ms']:.1f} | "
                  f"{r['two_threads_ms_per_photo']:.1f} | {r['thread_speedup']:.2f}x |")
    a = results["accuracy"]
    print(f"\naccuracy on {a['test_photos']} test photos decoded whole, {args.seeds} seeds:")
    print("| head trained on | top-1, mean | difference to whole decodes, points: mean ± sd (se) "
          "| the same, C fixed | per seed |")
    print("|---|---|---|---|---|")
    for decode in ("full", "reduced", "draft"):
        r = a[decode]
        se = r["delta_sd_points"] / np.sqrt(a["seeds"])
        print(f"| decode: {decode} | {r['mean']:.4f} | {r['delta_mean_points']:+.2f} ± {r['delta_sd_points']:.2f} "
              f"({se:.2f}) | {r['fixed_C_delta_mean_points']:+.2f} ± {r['fixed_C_delta_sd_points']:.2f} | "
              f"{', '.join(f'{d:+.1f}' for d in r['delta_points'])} |")
    r = results["app"]
    print(f"\napp (SavedModel on whole decodes) vs predict, {r['test_photos']} test photos: same answer "
          f"{100 * r['same_answer_share']:.2f}%, same top-1 {100 * r['same_top1_share']:.2f}%, "
          f"max top-1 probability difference {r['max_top1_probability_difference']:.2g}")


if __name__ == "__main__":
    main()
