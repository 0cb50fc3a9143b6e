"""Shared fixtures: tiny synthetic datasets and params that use the tiny backbone."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

from pipeline import params as params_mod

# Randomised tests are reproducible where it matters: in CI (CI=true) every run draws the same
# examples, so a failure there is a bug that the next run shows again, never bad luck. Locally
# they explore new examples each run; a failure found so is added as an @example.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

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
        "export": {"web": False},  # the browser bundle has its own tests (test_web_bundle.py)
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return params_mod.build(raw, "test params")


def table_of(result):
    """The labelled rows of a features run (``FeaturesResult``) with their features, read back."""
    from pipeline.store import labels

    return labels.read_table(result.path, result.labels)


def cached_table(params: params_mod.Params, base: Path):
    """The labelled rows of the pooled cache under ``params`` (its labelling for these params)."""
    from pipeline.project import open_project
    from pipeline.store import labels

    project = open_project(params, base)
    return labels.read_table(project.features_file(), project.labels_file())


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder with ``photos/`` holding three classes of 12 images."""
    make_dataset(tmp_path / "photos")
    return tmp_path


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


class CountingBackbone:
    """Wraps ``runtime.open_backbone``: counts the backbones set up and the photos they were asked to run
    (the near-duplicate calibration's copies apart: ``calibration_images``)."""

    def __init__(self, monkeypatch):
        from pipeline import runtime
        from pipeline.featurise import update

        self.builds = 0
        self.images = 0
        self.calibration_images = 0
        self.calibrating = False
        real = runtime.open_backbone

        def open_backbone(*args, **kwargs):
            calibrating = self.calibrating
            self.builds += not calibrating
            runner = real(*args, **kwargs)
            original = runner.predict

            def counting_predict(x):
                if calibrating:
                    self.calibration_images += len(x)
                else:
                    self.images += len(x)
                return original(x)

            object.__setattr__(runner, "predict", counting_predict)
            return runner

        real_calibrated = update.grouping.calibrated

        def calibrated(*args, **kwargs):
            self.calibrating = True
            try:
                return real_calibrated(*args, **kwargs)
            finally:
                self.calibrating = False

        monkeypatch.setattr(runtime, "open_backbone", open_backbone)
        monkeypatch.setattr(update.grouping, "calibrated", calibrated)


def cli(cwd, *args, timeout=300, env=None):
    """``python -m pipeline ARGS`` in ``cwd`` as a user runs it."""
    import subprocess
    import sys

    environment = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
                   "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"], **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          env=environment, timeout=timeout)


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the shared photo datasets are not on this machine)")
    return path


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The machine's cache of converted backbones (layout.weights_dir), for this test session alone:
# shared by the tests, as by a user's projects, and never the user's own.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="photohead-tests-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)
