"""Stage `features`: run the frozen backbone once per distinct photo and cache its activations.

Two stages share this code:
- ``features``: the activations at ``features.layer`` (default: the pooled features), in
  ``cache/features/``; train-head's input;
- ``top-features``: the activations at ``train_top.cut_point`` (float16 spatial maps, gzip), in
  ``cache/top_features/``; train-top's input.

Incremental: rows are keyed by the sha256 of the photo's bytes, so a run featurises only photos
the cache lacks; removed photos drop out. Finished photos are committed every
``features.commit_every`` to a part file (``store.parts``), so an interrupted run loses at most
one part; the next run merges the parts into the cache file and finishes.
"""
from __future__ import annotations

import csv
import importlib.metadata
import io
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from pipeline import runtime
from pipeline.backbones.registry import BACKBONES
from pipeline.data import scan as scan_mod
from pipeline.data.decode import DECODE_METHODS
from pipeline.errors import PipelineError
from pipeline.fingerprint import RunRecord, atomic_write_text, os_reason, temp_path_for
from pipeline.params import FeaturesParams, Params, ParamsError, as_dict
from pipeline.quality import near_duplicates
from pipeline.store import layout, table
from pipeline.store import parts as parts_mod
from pipeline.store.table import CacheError
from pipeline.training.contract import check_class_names

STAGE = layout.STAGE
TOP_STAGE = "top-features"

log = logging.getLogger("pipeline.features")

# Skipped for a reason other than the file itself: not counted against data.max_bad_fraction.
_NOT_BAD = ("label conflict", "split conflict", "not listed", scan_mod.EXCLUDED)


class BadDataError(PipelineError, RuntimeError):
    """Too many photos could not be used (data.max_bad_fraction)."""


@dataclass(frozen=True)
class FeaturesResult:
    path: Path  # the cache file
    key: str
    n_rows: int
    n_new: int
    n_removed: int
    skipped: list  # list[scan.Skipped]


def run(params: Params, base: str | Path = ".") -> FeaturesResult:
    """Stage ``features``: bring the cache at ``features.layer`` up to date with ``data.root``."""
    return _run(params, Path(base), params.features, layout.FOLDER, STAGE, {"features": layout.key_params(params.features)})


def run_top(params: Params, base: str | Path = ".") -> FeaturesResult:
    """Stage ``top-features``: bring the cache at ``train_top.cut_point`` up to date with ``data.root``."""
    f = layout.top_settings(params)
    ingredients = {"train_top": {"cut_point": params.train_top.cut_point},
                   "features": {k: v for k, v in layout.key_params(f).items() if k not in ("layer", "dtype")}}
    try:
        return _run(params, Path(base), f, layout.TOP_FOLDER, TOP_STAGE, ingredients)
    except ParamsError as error:  # the cut point is this stage's setting: name it so
        if str(error).startswith("features.layer:"):
            raise ParamsError(str(error).replace("features.layer:", "train_top.cut_point:", 1)) from None
        raise


def _run(params: Params, base: Path, f: FeaturesParams, folder: str, stage: str, ingredients: dict):
    if f.engine == "ray":  # before anything is written: an unreachable cluster is an error with no trace
        from pipeline import ray_engine

        ray_engine.connect(f)
    data = scan_mod.scan(params.data, base, index_path=layout.file_index_path(params, base))
    check_class_names(list(data.classes), params.reject.label)
    key = layout.cache_key(f)
    out = layout.cache_file(params, base, f, folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = RunRecord(out.parent / "last.json")
    if not out.exists():
        log.info("%s: recomputing (%s)", stage, record.reason(ingredients, "no cache for these settings yet"))
    lock = FileLock(str(out) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CacheError(f"another '{stage}' run is writing {out}; wait for it to finish") from None
    try:
        result = _update(params, base, f, data, key, out, stage)
    finally:
        lock.release()
    record.save(ingredients)
    if stage == STAGE:  # one writer of reports/skipped.csv: top-features skips the same files
        _write_skipped(layout.skipped_csv(params, base), result.skipped)
    n_seen = sum(1 + len(r.duplicates) for r in data.records) + len(data.skipped)
    n_bad = sum(1 for s in result.skipped if not s.reason.startswith(_NOT_BAD))
    if n_seen and n_bad / n_seen > params.data.max_bad_fraction:
        raise BadDataError(
            f"{n_bad} of {n_seen} images under {data.root} are unusable (over data.max_bad_fraction="
            f"{params.data.max_bad_fraction}); see {params.paths.reports_dir}/skipped.csv"
        )
    return result


def _records(data, stage: str) -> list:
    """The photos a stage caches: the labelled ones, and for the features stage the unlabelled ones too
    (split ``unlabelled``, outside every key downstream), so that labelling one runs no backbone."""
    return data.records + data.unlabelled if stage == STAGE else data.records


def _update(params: Params, base: Path, f: FeaturesParams, data, key: str, out: Path, stage: str) -> FeaturesResult:
    parts_dir = out.with_suffix(".parts")
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        stale.unlink(missing_ok=True)  # temporary files of a run that was killed
    old_rows, old_bad, old_attrs = _read_existing(out, key, stage)
    parts = parts_mod.read(parts_dir, key)
    cached = set(old_rows) | parts.shas()
    known_bad = {**old_bad, **parts.bad}
    everything = _records(data, stage)
    todo = [r for r in everything if r.sha256 not in cached and r.sha256 not in known_bad]
    # views asked for that cached rows lack (features.views grew): only those views are computed
    old_views = set(table.stored_views(old_attrs)) if old_rows else set()
    missing_views = {view: [r for r in everything if r.sha256 in cached and not parts.has(r.sha256, table.view_dataset(view))
                            and (view not in old_views or r.sha256 not in old_rows)]
                     for view in f.views if view != "original"}
    jobs = [(todo, tuple(f.views))] + [(records, (view,)) for view, records in missing_views.items() if records]

    meta = {"weights_sha256": parts.meta.get("weights_sha256", old_attrs.get("weights_sha256", "")),
            "feature_shape": parts.meta.get("feature_shape", tuple(old_attrs.get("feature_shape", ())))}
    if todo:
        log.info("%s: %d new image(s) to featurise (%d cached)", stage, len(todo), len(cached))
    for records, views in jobs[1:]:
        log.info("%s: view %s of %d cached image(s) to featurise (features.views)", stage, views[0], len(records))
    if any(records for records, _ in jobs):
        meta = _featurise(jobs, params, base, f, data.root, parts_dir, key, stage)
        parts.close()
        parts = parts_mod.read(parts_dir, key)
        known_bad = {**old_bad, **parts.bad}
    try:
        return _commit(params, base, f, data, key, out, old_rows, old_bad, old_attrs, parts, known_bad, todo, meta,
                       stage)
    finally:
        parts.close()


def _commit(params, base, f, data, key, out, old_rows, old_bad, old_attrs, parts, known_bad, todo, meta,
            stage) -> FeaturesResult:
    """Merge the old rows and the parts into the cache file, unless nothing changed."""
    wanted = {r.sha256: r for r in _records(data, stage)}
    rows = sorted((r.sha256, r.path, r.label, r.split) for r in wanted.values() if r.sha256 not in known_bad)
    bad_here = sorted((sha, reason) for sha, reason in known_bad.items() if sha in wanted)
    skipped = list(data.skipped)
    for sha, reason in bad_here:
        for path in (wanted[sha].path, *wanted[sha].duplicates):
            skipped.append(scan_mod.Skipped(path, reason))
            log.warning("%s: skipped %s: %s", stage, path, reason)
    skipped.sort(key=lambda s: s.path)
    if not any(r[3] != scan_mod.UNLABELLED for r in rows):
        raise scan_mod.DatasetError(f"no usable images under {data.root}; see {params.paths.reports_dir}/skipped.csv")
    sources = _Sources(out, old_rows, parts, meta["feature_shape"])
    try:
        if stage == STAGE:
            calibration = _calibrated(params, base, f, data.root, out, key, rows, sources)
        if params.data.group_near_duplicates and data.split_mode == "hash":
            rows = (_grouped(rows, sources, calibration, stage) if stage == STAGE
                    else _splits_of_features_stage(params, base, rows, stage))
        removed = len([sha for sha in old_rows if sha not in wanted])
        unchanged = not todo and not parts.files and rows == sorted(old_rows.values()) and \
            bad_here == sorted(old_bad.items()) and table.stored_views(old_attrs) == list(f.views)
        if unchanged:
            log.info("%s: cache hit (%s images, 0 new)", stage, f"{len(rows):,}")
            return FeaturesResult(out, key, len(rows), 0, 0, skipped)
        attrs = _provenance(f, key, meta, data.classes, stage)
        _merge(out, rows, meta["feature_shape"], f.dtype, attrs, bad_here, sources)
    finally:
        sources.close()
    parts.remove()
    n_new = len(todo) - len([r for r in todo if r.sha256 in known_bad])
    if todo or removed:
        log.info("%s: %d new image(s), %d removed (%s cached)", stage, n_new, removed, f"{len(rows):,}")
    else:
        log.info("%s: cache hit (%s images, 0 new); views, labels, splits or parts updated", stage, f"{len(rows):,}")
    return FeaturesResult(out, key, len(rows), n_new, removed, skipped)


class _Sources:
    """The features of rows by sha256, from this run's part files or the old cache file."""

    def __init__(self, out: Path, old_rows: dict, parts, feature_shape):
        self.parts = parts
        self.shape = tuple(feature_shape)
        self.old = h5py.File(out, "r") if old_rows else None
        self.old_index = {sha: i for i, sha in enumerate(sorted(old_rows))}  # the old file's rows are sorted by sha

    def get(self, shas: list[str], dtype=np.float32, view: str = "original") -> np.ndarray:
        name = table.view_dataset(view)
        block = np.empty((len(shas), *self.shape), dtype=dtype)
        from_old = []
        for i, sha in enumerate(shas):
            if self.parts.has(sha, name):
                block[i] = self.parts.row(sha, name)
            else:
                from_old.append((self.old_index[sha], i))
        if from_old:
            from_old.sort()
            source, target = zip(*from_old)
            block[list(target)] = self.old[name][list(source)]
        return block

    def close(self) -> None:
        if self.old is not None and self.old.id.valid:
            self.old.close()


def _calibrated(params, base: Path, f, root: Path, out: Path, key: str, rows, sources) -> dict:
    """The near-duplicate threshold of these photos (``quality.near_duplicates.calibrate``), kept beside
    the cache; made again only when a photo of its sample is gone (adding photos keeps it)."""
    import json

    by_sha = sorted(rows)
    path = layout.calibration_file(out)
    try:
        stored = json.loads(path.read_text())
        present = {r[0] for r in rows}
        if stored.get("key") == key and stored.get("version") == near_duplicates.VERSION and \
                set(stored.get("sample", [None])) <= present:
            return stored
    except (OSError, ValueError):
        pass
    sample = by_sha[:near_duplicates.SAMPLE]
    record = {"key": key, "version": near_duplicates.VERSION, "sample": [r[0] for r in sample]}
    originals = near_duplicates.unit_vectors(sources.get([r[0] for r in sample]))
    distinct = near_duplicates.unit_vectors(sources.get([r[0] for r in by_sha[:near_duplicates.DISTINCT]]))
    runner = runtime.open_backbone(f, layout.weights_dir(params, base))
    result = {**record, **near_duplicates.calibrate(
        [(sha, root / p) for sha, p, _, _ in sample], originals, distinct,
        lambda paths: [(None if row is None else row[0], error)
                       for row, error in runtime.featurise_files(paths, runner, f)])}
    atomic_write_text(path, json.dumps(result, indent=2))
    if result["threshold"] is not None:
        log.info("features: near-duplicate threshold %.3f, calibrated on %d copies of %d of these photos "
                 "(catches %.0f%% of them; %.2f%% of distinct pairs above it)", result["threshold"],
                 result["copies"]["n"], len(sample), 100 * result["recall_on_copies"],
                 100 * result["distinct_pairs_above"])
    return result


def _grouped(rows, sources, calibration: dict, stage: str):
    """Rows with each near-duplicate group in one split: that of its member with the smallest sha256."""
    threshold = calibration.get("threshold")
    if threshold is None:
        return rows
    vectors = np.concatenate([near_duplicates.unit_vectors(sources.get([r[0] for r in rows[i:i + 1024]]))
                              for i in range(0, len(rows), 1024)])
    found = near_duplicates.pairs(vectors, threshold)
    group = near_duplicates.groups(len(rows), found)
    split_of_group = {}
    for g, row in zip(group, rows):  # rows are sorted by sha: the first labelled member of a group decides
        if row[3] != scan_mod.UNLABELLED:
            split_of_group.setdefault(g, row[3])
    grouped = [(sha, path, label, split if split == scan_mod.UNLABELLED else split_of_group[g])
               for g, (sha, path, label, split) in zip(group, rows)]
    moved = sum(a[3] != b[3] for a, b in zip(rows, grouped))
    members = int(np.sum(np.bincount(group)[group] > 1))
    log.info("%s: %d photo(s) in near-duplicate groups, %d moved to their group's split "
             "(data.group_near_duplicates)", stage, members, moved)
    return grouped


def _splits_of_features_stage(params, base: Path, rows, stage: str):
    """top-features takes its splits from the features stage's cache, where near-duplicates were grouped."""
    pooled = layout.cache_file(params, base)
    if not pooled.is_file():
        raise CacheError(f"{stage} with data.group_near_duplicates takes its splits from {pooled}; "
                         "run 'make features' first")
    index = {sha: split for sha, _, _, split in table.read_index(pooled)[0]}
    return [(sha, path, label, index.get(sha, split)) for sha, path, label, split in rows]


def _read_existing(out: Path, key: str, stage: str):
    """({sha: row}, {sha: bad reason}, attrs) of the current cache file, features left on disk.

    A damaged file, or one whose rows do not match their content hash, is set aside, not used."""
    if not out.exists():
        return {}, {}, {}
    try:
        rows, bad, attrs = table.read_index(out, key)
        table.verify_features(out)
    except CacheError as error:
        damaged = out.with_name(out.name + ".damaged")
        os.replace(out, damaged)
        log.warning("%s: %s; moved it to %s and rebuilding", stage, error, damaged.name)
        return {}, {}, {}
    return {row[0]: row for row in rows}, bad, attrs


class _PartWriter:
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


def _featurise(jobs, params: Params, base: Path, f: FeaturesParams, root: Path, parts_dir: Path, key: str,
               stage: str) -> dict:
    """Run the backbone over each job's records for the job's views, committing a part file every
    ``commit_every`` photos."""
    from tqdm import tqdm

    everything = [r for records, _ in jobs for r in records]
    runner = runtime.open_backbone(f, layout.weights_dir(params, base))
    meta = {"weights_sha256": runner.weights_sha256, "feature_shape": tuple(runner.feature_shape)}
    total = len(everything)
    progress = tqdm(total=total, unit="img", desc=stage, mininterval=1.0, disable=None)
    started = time.perf_counter()
    try:
        for records, views in jobs:
            if not records:
                continue
            writer = _PartWriter(parts_dir, key, meta, f.commit_every, np.dtype(f.dtype), views)
            for record, rows, error in _engine_rows(records, views, runner, f, root, layout.weights_dir(params, base)):
                writer.add(record.sha256, rows, error)
                progress.update(1)
            writer.commit()
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    log.info("%s: featurised %d image(s) in %.1f s (%.1f img/s)", stage, total, elapsed, total / max(elapsed, 1e-9))
    return meta


def _engine_rows(records, views, runner, f: FeaturesParams, root: Path, weights_dir: Path):
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
                                                              runtime.resizer(f, runner.input_size))
                                         for r in records[:8]) if image is not None]
        if sample:
            runner.predict(np.stack(sample))
    weights = next(iter(sorted(weights_dir.glob(f"{f.backbone}-*.weights.h5"))), None) \
        if f.ray_gpus_per_worker else None
    yield from ray_engine.featurise(records, root, f, views, runner.path, weights)


def _merge(out: Path, rows, feature_shape, dtype, attrs, bad, sources: _Sources) -> None:
    """Write the new cache file from the old file and the parts, one chunk at a time."""
    tmp = temp_path_for(out)
    try:
        table.write_table(tmp, rows, lambda start, stop, view="original": sources.get(
            [r[0] for r in rows[start:stop]], dtype, view), feature_shape, dtype, attrs, bad)
        sources.close()
        os.replace(tmp, out)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"could not write {out} ({os_reason(error)}); is the disk full? The cache is as it was and "
                         f"the new rows are kept in {out.with_suffix('.parts').name}: free some space and run "
                         "again") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _provenance(f: FeaturesParams, key: str, meta: dict, classes, stage: str) -> dict:
    spec = BACKBONES[f.backbone]
    return {
        "key": key,
        "stage": stage,
        "stage_version": layout.VERSION,
        "params": as_dict(f),
        "key_params": layout.key_params(f),
        "backbone": f.backbone,
        "weights": f.weights,
        "weights_sha256": meta["weights_sha256"],
        "layer": f.layer,
        "input_size": runtime.input_size(f),
        "resize": f.resize,
        "decode": DECODE_METHODS[f.decode],
        "preprocessing": spec.preprocessing,
        "dtype": f.dtype,
        "feature_shape": list(meta["feature_shape"]),
        "views": list(f.views),
        "precision": f.precision,
        "classes": list(classes),
        "library_versions": {name: _version(name) for name in ("tensorflow-cpu", "keras", "h5py", "numpy", "pillow",
                                                               "ai-edge-litert")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _write_skipped(path: Path, skipped) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "reason"])
    writer.writerows((s.path, s.reason) for s in skipped)
    atomic_write_text(path, buffer.getvalue())
