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
import dataclasses
import hashlib
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
from pipeline.backbones.keras_models import weights_fingerprint
from pipeline.backbones.registry import BACKBONES
from pipeline.data import scan as scan_mod
from pipeline.data.decode import DECODE_METHODS
from pipeline.fingerprint import RunRecord, atomic_write_text, os_reason, stage_key, temp_path_for
from pipeline.params import FeaturesParams, Params, as_dict, key_fields
from pipeline.store import parts as parts_mod
from pipeline.store import table
from pipeline.store.table import CacheError

STAGE = "features"
TOP_STAGE = "top-features"
FOLDER = "features"  # cache/features/: the cache at features.layer
TOP_FOLDER = "top_features"  # cache/top_features/: caches at train_top.cut_point
# Bump when the meaning of stored features changes (decoding, layout), so old caches are not reused.
VERSION = 1

log = logging.getLogger("pipeline.features")

# Skipped for a reason other than the file itself: not counted against data.max_bad_fraction.
_NOT_BAD = ("label conflict", "split conflict", "not listed")


class BadDataError(RuntimeError):
    """Too many photos could not be used (data.max_bad_fraction)."""


@dataclass(frozen=True)
class FeaturesResult:
    path: Path  # the cache file
    key: str
    n_rows: int
    n_new: int
    n_removed: int
    skipped: list  # list[scan.Skipped]


def key_params(f: FeaturesParams) -> dict:
    """Everything that changes the stored activations, and nothing else."""
    spec = BACKBONES[f.backbone]
    values = key_fields(f)
    values["weights"] = weights_fingerprint(spec, f.weights)
    values["image_size"] = runtime.input_size(f)
    values["preprocessing"] = spec.preprocessing
    values["decode"] = DECODE_METHODS[f.decode]
    return values


def top_settings(params: Params) -> FeaturesParams:
    """The features settings of train-top's input: activations at the cut point, stored as float16."""
    return dataclasses.replace(params.features, layer=params.train_top.cut_point, dtype="float16")


def cache_key(f: FeaturesParams) -> str:
    return stage_key(STAGE, VERSION, key_params(f))


def cache_file(params: Params, base: Path, f: FeaturesParams | None = None, folder: str = FOLDER) -> Path:
    """The cache file of features settings ``f`` (default: ``params.features``)."""
    f = f or params.features
    return base / params.paths.cache_dir / folder / f"{f.backbone}-{cache_key(f)[:16]}.h5"


def top_cache_file(params: Params, base: Path) -> Path:
    return cache_file(params, base, top_settings(params), TOP_FOLDER)


def skipped_csv(params: Params, base: Path) -> Path:
    return base / params.paths.reports_dir / "skipped.csv"


def file_index_path(params: Params, base: Path) -> Path:
    """Where the stat index of one data root lives (one per root: roots can be switched freely)."""
    root = str((base / params.data.root).resolve())
    return base / params.paths.cache_dir / "file_index" / f"{hashlib.sha256(root.encode()).hexdigest()[:16]}.json"


def run(params: Params, base: str | Path = ".") -> FeaturesResult:
    """Stage ``features``: bring the cache at ``features.layer`` up to date with ``data.root``."""
    return _run(params, Path(base), params.features, FOLDER, STAGE, {"features": key_params(params.features)})


def run_top(params: Params, base: str | Path = ".") -> FeaturesResult:
    """Stage ``top-features``: bring the cache at ``train_top.cut_point`` up to date with ``data.root``."""
    f = top_settings(params)
    ingredients = {"train_top": {"cut_point": params.train_top.cut_point},
                   "features": {k: v for k, v in key_params(f).items() if k not in ("layer", "dtype")}}
    try:
        return _run(params, Path(base), f, TOP_FOLDER, TOP_STAGE, ingredients)
    except ValueError as error:  # the cut point is this stage's setting: name it so
        if str(error).startswith("features.layer:"):
            raise ValueError(str(error).replace("features.layer:", "train_top.cut_point:", 1)) from None
        raise


def _run(params: Params, base: Path, f: FeaturesParams, folder: str, stage: str, ingredients: dict):
    data = scan_mod.scan(params.data, base, index_path=file_index_path(params, base))
    key = cache_key(f)
    out = cache_file(params, base, f, folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = RunRecord(out.parent / "last.json")
    if not out.exists():
        log.info("%s: recomputing (%s)", stage, record.reason(ingredients, "no cache for these settings yet"))
    lock = FileLock(str(out) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"another '{stage}' run is writing {out}; wait for it to finish") from None
    try:
        result = _update(params, base, f, data, key, out, stage)
    finally:
        lock.release()
    record.save(ingredients)
    if stage == STAGE:  # one writer of reports/skipped.csv: top-features skips the same files
        _write_skipped(skipped_csv(params, base), result.skipped)
    n_seen = sum(1 + len(r.duplicates) for r in data.records) + len(data.skipped)
    n_bad = sum(1 for s in result.skipped if not s.reason.startswith(_NOT_BAD))
    if n_seen and n_bad / n_seen > params.data.max_bad_fraction:
        raise BadDataError(
            f"{n_bad} of {n_seen} images under {data.root} are unusable (over data.max_bad_fraction="
            f"{params.data.max_bad_fraction}); see {params.paths.reports_dir}/skipped.csv"
        )
    return result


def _update(params: Params, base: Path, f: FeaturesParams, data, key: str, out: Path, stage: str) -> FeaturesResult:
    parts_dir = out.with_suffix(".parts")
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        stale.unlink(missing_ok=True)  # temporary files of a run that was killed
    old_rows, old_bad, old_attrs = _read_existing(out, key, stage)
    parts = parts_mod.read(parts_dir, key)
    cached = set(old_rows) | set(parts.rows)
    known_bad = {**old_bad, **parts.bad}
    todo = [r for r in data.records if r.sha256 not in cached and r.sha256 not in known_bad]

    meta = {"weights_sha256": parts.meta.get("weights_sha256", old_attrs.get("weights_sha256", "")),
            "feature_shape": parts.meta.get("feature_shape", tuple(old_attrs.get("feature_shape", ())))}
    if todo:
        log.info("%s: %d new image(s) to featurise (%d cached)", stage, len(todo), len(cached))
        meta = _featurise(todo, params, base, f, data.root, parts_dir, key, stage)
        parts.close()
        parts = parts_mod.read(parts_dir, key)
        known_bad = {**old_bad, **parts.bad}
    try:
        return _commit(params, f, data, key, out, old_rows, old_bad, parts, known_bad, todo, meta, stage)
    finally:
        parts.close()


def _commit(params, f, data, key, out, old_rows, old_bad, parts, known_bad, todo, meta, stage) -> FeaturesResult:
    """Merge the old rows and the parts into the cache file, unless nothing changed."""
    wanted = {r.sha256: r for r in data.records}
    rows = sorted((r.sha256, r.path, r.label, r.split) for r in data.records if r.sha256 not in known_bad)
    bad_here = sorted((sha, reason) for sha, reason in known_bad.items() if sha in wanted)
    skipped = list(data.skipped)
    for sha, reason in bad_here:
        for path in (wanted[sha].path, *wanted[sha].duplicates):
            skipped.append(scan_mod.Skipped(path, reason))
            log.warning("%s: skipped %s: %s", stage, path, reason)
    skipped.sort(key=lambda s: s.path)
    removed = len([sha for sha in old_rows if sha not in wanted])
    unchanged = not todo and not parts.files and rows == sorted(old_rows.values()) and \
        bad_here == sorted(old_bad.items())
    if unchanged:
        log.info("%s: cache hit (%s images, 0 new)", stage, f"{len(rows):,}")
        return FeaturesResult(out, key, len(rows), 0, 0, skipped)
    if not rows:
        raise scan_mod.DatasetError(f"no usable images under {data.root}; see {params.paths.reports_dir}/skipped.csv")

    attrs = _provenance(f, key, meta, data.classes, stage)
    _merge(out, rows, meta["feature_shape"], f.dtype, attrs, bad_here, old_rows, parts)
    parts.remove()
    n_new = len(todo) - len([r for r in todo if r.sha256 in known_bad])
    if todo or removed:
        log.info("%s: %d new image(s), %d removed (%s cached)", stage, n_new, removed, f"{len(rows):,}")
    else:
        log.info("%s: cache hit (%s images, 0 new); labels, splits or parts updated", stage, f"{len(rows):,}")
    return FeaturesResult(out, key, len(rows), n_new, removed, skipped)


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
    """Collects finished rows and commits a part every ``commit_every`` photos."""

    def __init__(self, folder: Path, key: str, meta: dict, commit_every: int, dtype):
        self.folder, self.key, self.meta, self.commit_every, self.dtype = folder, key, meta, commit_every, dtype
        self.shas: list = []
        self.features: list = []
        self.bad: list = []

    def add(self, sha256: str, row, error: str | None) -> None:
        if row is None:
            self.bad.append((sha256, error))
        else:
            self.shas.append(sha256)
            self.features.append(np.asarray(row).astype(self.dtype))
        if len(self.shas) + len(self.bad) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        if self.shas or self.bad:
            parts_mod.write(self.folder, self.key, self.meta, self.shas, {"features": self.features}, self.bad)
        self.shas, self.features, self.bad = [], [], []


def _featurise(todo, params: Params, base: Path, f: FeaturesParams, root: Path, parts_dir: Path, key: str,
               stage: str) -> dict:
    """Run the backbone over ``todo``, committing a part file every ``commit_every`` photos."""
    from tqdm import tqdm

    runner = runtime.open_backbone(f, base / params.paths.cache_dir)
    meta = {"weights_sha256": runner.weights_sha256, "feature_shape": tuple(runner.feature_shape)}
    writer = _PartWriter(parts_dir, key, meta, f.commit_every, np.dtype(f.dtype))
    progress = tqdm(total=len(todo), unit="img", desc=stage, mininterval=1.0, disable=None)
    started = time.perf_counter()
    results = runtime.featurise_files([root / r.path for r in todo], runner, f)
    try:
        for record, (row, error) in zip(todo, results):
            writer.add(record.sha256, row, error)
            progress.update(1)
        writer.commit()
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    log.info("%s: featurised %d image(s) in %.1f s (%.1f img/s)", stage, len(todo), elapsed,
             len(todo) / max(elapsed, 1e-9))
    return {"weights_sha256": runner.weights_sha256, "feature_shape": tuple(runner.feature_shape)}


def _merge(out: Path, rows, feature_shape, dtype, attrs, bad, old_rows, parts) -> None:
    """Write the new cache file from the old file and the parts, one chunk at a time."""
    old = h5py.File(out, "r") if old_rows else None
    old_index = {sha: i for i, sha in enumerate(sorted(old_rows))}  # the old file's rows are sorted by sha

    def row_features(start, stop):
        block = np.empty((stop - start, *feature_shape), dtype=dtype)
        from_old = []
        for i, (sha, *_rest) in enumerate(rows[start:stop]):
            if sha in parts.rows:
                block[i] = parts.row(sha)
            else:
                from_old.append((old_index[sha], i))
        if from_old:
            source, target = zip(*from_old)  # both increasing: rows and old file share sha order
            block[list(target)] = old["features"][list(source)]
        return block

    tmp = temp_path_for(out)
    try:
        table.write_table(tmp, rows, row_features, feature_shape, dtype, attrs, bad)
        if old is not None:
            old.close()
        os.replace(tmp, out)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"could not write {out} ({os_reason(error)}); is the disk full? The cache is as it was and the new "
                         f"rows are kept in {out.with_suffix('.parts').name}: free some space and run again") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if old is not None and old.id.valid:
            old.close()


def _provenance(f: FeaturesParams, key: str, meta: dict, classes, stage: str) -> dict:
    spec = BACKBONES[f.backbone]
    return {
        "key": key,
        "stage": stage,
        "stage_version": VERSION,
        "params": as_dict(f),
        "key_params": key_params(f),
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
