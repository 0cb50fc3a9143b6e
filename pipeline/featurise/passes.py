"""The backbone over the photos a features cache lacks: here (``runtime``) or on a Ray cluster
(``ray_engine``), a part file committed every ``features.commit_every`` photos."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pipeline import progress as listeners
from pipeline import runtime
from pipeline.params import FeaturesParams
from pipeline.store import parts as parts_mod
from pipeline.store import table

log = logging.getLogger("pipeline.features")


class PartWriter:
    """Collects finished rows (one activation per view) and commits a part every ``commit_every`` photos."""

    def __init__(self, folder: Path, key: str, meta: dict, commit_every: int, dtype, views: tuple[str, ...]):
        self.folder, self.key, self.meta, self.commit_every, self.dtype = folder, key, meta, commit_every, dtype
        self.views = views
        self.shas: list = []
        self.columns: dict = {table.view_dataset(v): [] for v in views}
        self.bad: list = []

    def add(self, sha256: str, rows, error: str | None) -> None:
        """``rows``: (len(views), *feature_shape), or None with the reason."""
        if rows is None:
            self.bad.append((sha256, error))
        else:
            self.shas.append(sha256)
            for view, row in zip(self.views, rows):
                self.columns[table.view_dataset(view)].append(np.asarray(row).astype(self.dtype))
        if len(self.shas) + len(self.bad) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        if self.shas or self.bad:
            parts_mod.write(self.folder, self.key, self.meta, self.shas, self.columns, self.bad)
        self.shas, self.bad = [], []
        self.columns = {name: [] for name in self.columns}


def featurise(jobs, f: FeaturesParams, weights_dir: Path, root: Path, parts_dir: Path, key: str, stage: str) -> dict:
    """Run the backbone over each job's (records, views), committing a part file every ``commit_every``
    photos; returns the run's meta (weights_sha256, feature_shape)."""
    from tqdm import tqdm

    total = sum(len(records) for records, _ in jobs)
    runner = runtime.open_backbone(f, weights_dir)
    meta = {"weights_sha256": runner.weights_sha256, "feature_shape": tuple(runner.feature_shape)}
    progress = tqdm(total=total, unit="img", desc=stage, mininterval=1.0, disable=None)
    started = time.perf_counter()
    done = 0
    try:
        for records, views in jobs:
            if not records:
                continue
            writer = PartWriter(parts_dir, key, meta, f.commit_every, np.dtype(f.dtype), views)
            for record, rows, error in engine_rows(records, views, runner, f, root, weights_dir):
                writer.add(record.sha256, rows, error)
                progress.update(1)
                done += 1
                listeners.report(stage, done, total)
            writer.commit()
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    log.info("%s: featurised %d image(s) in %.1f s (%.1f img/s)", stage, total, elapsed, total / max(elapsed, 1e-9))
    return meta


def engine_rows(records, views, runner, f: FeaturesParams, root: Path, weights_dir: Path):
    """``(record, (len(views), *shape) or None, error)`` for every record: here (``runtime``), or on a
    Ray cluster (``ray_engine``: the same model file, checked here first), in any order."""
    if f.engine != "ray":
        results = runtime.featurise_files([root / r.path for r in records], runner, f, views)
        for record, (rows, error) in zip(records, results):
            yield record, rows, error
        return
    from pipeline import ray_engine

    if getattr(runner, "keras", None) is not None:  # not checked yet: check on these photos before shipping it
        sample = [image for image, _ in (runtime.decode_file(root / r.path, runtime.draft_size(f),
                                                              runtime.resizer(f, runner.input_size), f.max_pixels)
                                         for r in records[:8]) if image is not None]
        if sample:
            runner.predict(np.stack(sample))
    weights = next(iter(sorted(weights_dir.glob(f"{f.backbone}-*.weights.h5"))), None) \
        if f.ray_gpus_per_worker else None
    yield from ray_engine.featurise(records, root, f, views, runner.path, weights)
