"""Shared fixtures: tiny synthetic datasets and params that use the tiny backbone."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import params as params_mod

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"

# Each class is a colour; noise makes every image's bytes distinct.
CLASS_COLOURS = {"misty": (200, 60, 40), "tigger": (40, 80, 200), "neither": (60, 180, 60)}


def make_image(path: Path, colour, seed: int, size=(48, 40), fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    array = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None))
    return path


def make_dataset(root: Path, per_class: int = 12, classes=("misty", "tigger", "neither"), seed: int = 0) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"{name}_{i:02d}.png", CLASS_COLOURS[name], seed * 10_000 + c * 1000 + i)
    return root


def make_params(tmp: Path, **sections) -> params_mod.Params:
    """Params for a project in ``tmp`` with the tiny backbone; ``sections`` override keys."""
    raw = {
        "paths": {"cache_dir": "cache", "reports_dir": "reports"},
        "data": {"root": "photos", "train_fraction": 0.6, "val_fraction": 0.2, "test_fraction": 0.2},
        "features": {"backbone": "tiny", "batch_size": 8},
        "train_head": {"model": "logreg"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return params_mod.build(raw, "test params")


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder with ``photos/`` holding three classes of 12 images."""
    make_dataset(tmp_path / "photos")
    return tmp_path


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the shared photo datasets are not on this machine)")
    return path


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
