"""Photo sets the benchmarks make from ../shared/datasets (never committed; bench/.phone_images is git-ignored)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SOURCE = DATASETS / "dogs_vs_cats_1k"


def require(folder: Path) -> None:
    """Stop with one line where the shared photo datasets are absent."""
    if not folder.is_dir():
        raise SystemExit(f"no {folder}; this benchmark needs the shared photo datasets")


def make_phone_images(count: int) -> Path:
    """The first ``count`` dogs-vs-cats photos upscaled to 4032 x 3024 with mild noise (sigma 3, so they
    compress and decode like real photos rather than smooth upscales), JPEG quality 92."""
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
