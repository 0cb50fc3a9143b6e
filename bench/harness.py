"""What every benchmark shares: where things are, running the pipeline as a user does (wall seconds and
the command's own peak memory), medians, the photo sets made from ../shared/datasets, and Markdown tables.

A benchmark is ``python bench/NAME.py``; this module is beside it, so ``import harness`` needs no set-up,
and importing it makes the package importable too.

Peak memory is the process's maximum resident set (``ru_maxrss``). Linux keeps that maximum across
``exec``, so a process forked from a large parent (a benchmark that has loaded models) would report at
least the parent's size. A command is therefore started by a small wrapper process (``bench/_peak.py``,
a fresh interpreter of a few MB), which starts it, waits for it, and reports its own child's peak.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"  # never committed
SOURCE = DATASETS / "dogs_vs_cats_1k"
PEAK = Path(__file__).resolve().parent / "_peak.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def require(folder: Path) -> None:
    """Stop with one line where the shared photo datasets are absent."""
    if not folder.is_dir():
        raise SystemExit(f"no {folder}; this benchmark needs the shared photo datasets")


def pipeline_env(extra: dict | None = None) -> dict:
    """The environment a benchmark runs the package in: this checkout, no progress bars, quiet TensorFlow."""
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
            **(extra or {})}


def measured(command: list[str], cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run ``command``: seconds, peak RSS in MB (its own), stdout, stderr, return code."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak.json"
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-S", str(PEAK), str(report), *command], cwd=cwd, env=env,
                             capture_output=True, text=True)
        seconds = time.perf_counter() - started
        peak = json.loads(report.read_text()) if report.is_file() else {"peak_mb": float("nan")}
    return {"seconds": seconds, "peak_mb": peak["peak_mb"], "stdout": out.stdout, "stderr": out.stderr,
            "returncode": out.returncode}


def cli(project: Path, *args: str, check: bool = True, env: dict | None = None) -> dict:
    """``python -m pipeline ARGS --params project/params.yaml`` in ``project``, measured; ``env``: variables to
    add. Stops the benchmark with the command's stderr when it fails (unless ``check`` is false)."""
    result = measured([sys.executable, "-m", "pipeline", *args, "--params", str(project / "params.yaml")],
                      cwd=project, env=pipeline_env(env))
    if check and result["returncode"]:
        raise SystemExit(f"{' '.join(args)} failed:\n{result['stderr'][-3000:]}")
    return result


def median_seconds(runs: Iterable[dict]) -> float:
    return statistics.median(r["seconds"] for r in runs)


def table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A Markdown table; cells as given (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def seeded_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row numbers of a stratified 40/10/50 train/val/test split of labels ``y`` for ``seed``: many test
    photos, so that a head's accuracy moves by well under a point per photo."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    train, test = train_test_split(index, test_size=0.5, stratify=y, random_state=seed)
    train, val = train_test_split(train, test_size=0.2, stratify=y[train], random_state=seed)
    return train, val, test


def make_phone_images(count: int) -> Path:
    """The first ``count`` dogs-vs-cats photos upscaled to 4032 x 3024 with mild noise (sigma 3, so they
    compress and decode like real photos rather than smooth upscales), JPEG quality 92, in
    bench/.phone_images (git-ignored)."""
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
    from PIL import Image, ImageOps

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
    bench/.phone_sets/<dataset>/<class>/<name>.jpg (git-ignored), on every core; resumes where it stopped."""
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
