"""How far the pipeline's decode and an app's decode move the features and the top-1 label.

    .venv/bin/python bench/parity.py [--phone-images 200]

An app decodes a photo whole, as README's snippet does (``Image.open(...).convert("RGB")``), and
hands it to the exported model. The features stage does the same with ``features.decode: full``
(checked here: the pixels are identical); with ``decode: draft`` it decodes a JPEG
much larger than the input at a reduced DCT scale (Pillow's ``draft``). Both then go through the
same ``FitToSize`` and backbone. For each set, every photo is decoded the draft way and the app's
way and featurised with the same LiteRT EfficientNet-Lite0; a logistic-regression head trained on
the pipeline's own train split answers for both. Reported per set: photos whose decoded pixels
differ, the relative L2 distance between the two feature vectors (median and max), and the photos
whose top-1 label differs between the two decodes.

Sets: ``dogs_vs_cats_1k`` and ``cat_breeds_web5`` as they are, and phone-sized photos (the first
--phone-images dogs-vs-cats photos upscaled to 4032 x 3024 with mild noise, JPEG quality 92; made
by bench/speed.py's recipe into bench/.phone_images), classified by the dogs-vs-cats head.
Results: Markdown on stdout and bench/results/parity.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from harness import DATASETS, ROOT, make_phone_images, require  # noqa: E402
from PIL import Image, ImageOps

from pipeline import params as params_mod  # noqa: E402
from pipeline import runtime
from pipeline.data.decode import decode_rgb  # noqa: E402
from pipeline.data.resize import fit_to_size  # noqa: E402
from pipeline.project import open_project
from pipeline.stages import features  # noqa: E402
from pipeline.store import table  # noqa: E402


def app_decode(path: Path) -> np.ndarray:
    """What README's snippet does: the whole photo, upright, RGB."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def featurise(runner, images) -> np.ndarray:
    return np.concatenate([runner.predict(fit_to_size(image, 224)[None]) for image in images])


def head_for(root: Path, work: Path):
    """Train a logistic regression on the pipeline's features of ``root``'s train split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    params = params_mod.build({"data": {"root": str(root)}, "paths": {"cache_dir": str(work / "cache")}}, "bench")
    result = features.run(open_project(params, work))
    rows = table.read_table(result.path)
    train = rows.splits == "train"
    head = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
    head.fit(rows.features[train], rows.labels[train])
    return params, head


def compare_decodes(runner, head, files: list[Path]) -> dict:
    differ, distances, flips, n, full_differ = 0, [], 0, 0, 0
    for start in range(0, len(files), 32):
        batch = files[start:start + 32]
        pipeline_pixels = [decode_rgb(f, 224) for f in batch]
        app_pixels = [app_decode(f) for f in batch]
        full_differ += sum(not np.array_equal(decode_rgb(f), a) for f, a in zip(batch, app_pixels))
        differ += sum(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(pipeline_pixels, app_pixels))
        a, b = featurise(runner, pipeline_pixels), featurise(runner, app_pixels)
        distances += (np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).tolist()
        flips += int(np.sum(head.predict(a) != head.predict(b)))
        n += len(batch)
    return {"photos": n, "pixels_differ": differ, "full_decode_pixels_differ": full_differ, "feature_distance_median": float(np.median(distances)),
            "feature_distance_max": float(np.max(distances)), "top1_changes": flips, "top1_change_share": flips / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phone-images", type=int, default=200)
    args = parser.parse_args()
    require(DATASETS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        heads = {}
        for name in ("dogs_vs_cats_1k", "cat_breeds_web5"):
            params, heads[name] = head_for(DATASETS / name, work)
        runner = runtime.open_backbone(params.features, work / "cache")
        for name in ("dogs_vs_cats_1k", "cat_breeds_web5"):
            files = sorted(p for p in (DATASETS / name).rglob("*") if p.is_file())
            results[name] = compare_decodes(runner, heads[name], files)
        phone = make_phone_images(args.phone_images)
        results[f"phone-sized (4032x3024, made here), {args.phone_images}"] = compare_decodes(
            runner, heads["dogs_vs_cats_1k"], sorted(p for p in phone.rglob("*.jpg")))
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "parity.json").write_text(json.dumps(results, indent=2))
    print("| set | photos | decode: full, pixels differ from the app's | decode: draft, pixels differ "
          "| draft, feature distance median / max (relative L2) | draft, top-1 label changes |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['photos']} | {r['full_decode_pixels_differ']} | {r['pixels_differ']} | "
              f"{r['feature_distance_median']:.4f} / {r['feature_distance_max']:.4f} | "
              f"{r['top1_changes']} ({100 * r['top1_change_share']:.2f}%) |")


if __name__ == "__main__":
    main()
