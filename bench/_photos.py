"""Photo sets the benchmarks make from ../shared/datasets (never committed; bench/.phone_images and bench/.phone_sets are git-ignored)."""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SOURCE = DATASETS / "dogs_vs_cats_1k"


def seeded_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row numbers of a stratified 40/10/50 train/val/test split of labels ``y`` for ``seed``: many test
    photos, so that a head's accuracy moves by well under a point per photo."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    train, test = train_test_split(index, test_size=0.5, stratify=y, random_state=seed)
    train, val = train_test_split(train, test_size=0.2, stratify=y[train], random_state=seed)
    return train, val, test


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
            _phone_sized(path, folder / label / path.name, rng)
    marker.touch()
    return folder


def _phone_sized(source: Path, target: Path, rng: np.random.Generator) -> None:
    with Image.open(source) as image:
        image = ImageOps.exif_transpose(image).convert("RGB").resize((4032, 3024), Image.BICUBIC)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 3, (3024, 4032, 3)).astype(np.float32)
    partial = target.with_name(target.name + ".partial")
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(partial, format="JPEG", quality=92)
    partial.replace(target)


def _phone_sized_job(job: tuple[Path, Path, int]) -> None:
    source, target, seed = job
    _phone_sized(source, target, np.random.default_rng(seed))


def make_phone_dataset(dataset: str) -> Path:
    """Every photo of a shared dataset made phone-sized as ``make_phone_images`` does, in
    bench/.phone_sets/<dataset>/<class>/<name>.jpg, on every core; resumes where it stopped."""
    source = DATASETS / dataset
    require(source)
    folder = ROOT / "bench" / ".phone_sets" / dataset
    jobs = []
    for label in sorted(p.name for p in source.iterdir() if p.is_dir()):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(sorted((source / label).iterdir())):
            target = folder / label / f"{path.name}.jpg"
            if not target.exists():
                jobs.append((path, target, i))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_phone_sized_job, jobs, chunksize=4))
    return folder
