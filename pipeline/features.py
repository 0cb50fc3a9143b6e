"""Stage `features`: run the frozen backbone once per distinct image and cache its activations.

Incremental: rows are keyed by the sha256 of the image bytes, so a run featurises only images the
cache lacks; removed images drop out. Work in progress is committed every ``features.commit_every`` images to
a part file (temporary name, then ``os.replace``), so an interrupted run loses at most one part;
the next run merges the parts into the cache file and finishes.
"""
from __future__ import annotations

import collections
import csv
import hashlib
import importlib.metadata
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from pipeline import dataset as dataset_mod
from pipeline import feature_store
from pipeline.backbones import weights_fingerprint
from pipeline.backbones_registry import BACKBONES
from pipeline.feature_store import CacheError
from pipeline.fingerprint import atomic_write_text, stage_key, temp_path_for
from pipeline.images import DECODE_METHOD, ImageError, decode_rgb
from pipeline.params import FeaturesParams, Params, as_dict, key_fields

STAGE = "features"
# Bump when the meaning of stored features changes (decoding, layout), so old caches are not reused.
VERSION = 1

log = logging.getLogger("pipeline.features")


# Skipped for a reason other than the file itself: not counted against data.max_bad_fraction.
_NOT_BAD = ("label conflict", "split conflict", "not listed")


class BadDataError(RuntimeError):
    """Too many images could not be used (data.max_bad_fraction)."""


@dataclass(frozen=True)
class FeaturesResult:
    path: Path  # the cache file
    key: str
    n_rows: int
    n_new: int
    n_removed: int
    skipped: list  # list[dataset.Skipped]


def key_params(params: Params) -> dict:
    """Everything that changes the stored activations, and nothing else."""
    f = params.features
    spec = BACKBONES[f.backbone]
    values = key_fields(f)
    values["weights"] = weights_fingerprint(spec, f.weights)
    values["image_size"] = f.image_size or spec.input_size
    values["preprocessing"] = spec.preprocessing
    values["decode"] = DECODE_METHOD
    return values


def cache_key(params: Params) -> str:
    return stage_key(STAGE, VERSION, key_params(params))


def cache_file(params: Params, base: Path, key: str | None = None) -> Path:
    key = key or cache_key(params)
    return base / params.paths.cache_dir / "features" / f"{params.features.backbone}-{key[:16]}.h5"


def file_index_path(params: Params, base: Path) -> Path:
    """Where the stat index of one data root lives (one per root: roots can be switched freely)."""
    root = str((base / params.data.root).resolve())
    return base / params.paths.cache_dir / "file_index" / f"{hashlib.sha256(root.encode()).hexdigest()[:16]}.json"


def run(params: Params, base: str | Path = ".") -> FeaturesResult:
    """Bring the feature cache up to date with ``data.root``; returns what it holds and did."""
    base = Path(base)
    data = dataset_mod.scan(params.data, base, index_path=file_index_path(params, base))
    key = cache_key(params)
    out = cache_file(params, base, key)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"another 'features' run is writing {out}; wait for it to finish") from None
    try:
        result = _update(params, base, data, key, out)
    finally:
        lock.release()
    _write_skipped(base / params.paths.reports_dir / "skipped.csv", result.skipped)
    n_seen = sum(1 + len(r.duplicates) for r in data.records) + len(data.skipped)
    n_bad = sum(1 for s in result.skipped if not s.reason.startswith(_NOT_BAD))
    if n_seen and n_bad / n_seen > params.data.max_bad_fraction:
        raise BadDataError(
            f"{n_bad} of {n_seen} images under {data.root} are unusable (over data.max_bad_fraction="
            f"{params.data.max_bad_fraction}); see {params.paths.reports_dir}/skipped.csv"
        )
    return result


def _update(params: Params, base: Path, data, key: str, out: Path) -> FeaturesResult:
    parts_dir = out.with_suffix(".parts")
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        stale.unlink(missing_ok=True)  # temporary files of a run that was killed
    old_rows, old_bad, old_attrs = _read_existing(out, key)
    parts = _read_parts(parts_dir, key)
    cached = set(old_rows) | set(parts.rows)
    known_bad = {**old_bad, **parts.bad}
    todo = [r for r in data.records if r.sha256 not in cached and r.sha256 not in known_bad]
    skipped = list(data.skipped)

    weights_sha256 = parts.meta.get("weights_sha256", old_attrs.get("weights_sha256", ""))
    feature_shape = parts.meta.get("feature_shape", tuple(old_attrs.get("feature_shape", ())))
    if todo:
        log.info("features: %d new image(s) to featurise (%d cached)", len(todo), len(cached))
        weights_sha256, feature_shape = _featurise(todo, params, base, data.root, parts_dir, key)
        parts.close()
        parts = _read_parts(parts_dir, key)
        known_bad = {**old_bad, **parts.bad}

    try:
        return _commit(params, data, key, out, parts_dir, old_rows, old_bad, parts, known_bad, todo, skipped,
                       weights_sha256, feature_shape)
    finally:
        parts.close()


def _commit(params, data, key, out, parts_dir, old_rows, old_bad, parts, known_bad, todo, skipped,
            weights_sha256, feature_shape) -> FeaturesResult:
    """Merge the old rows and the parts into the cache file, unless nothing changed."""
    wanted = {r.sha256: r for r in data.records}
    rows = sorted((r.sha256, r.path, r.label, r.split) for r in data.records if r.sha256 not in known_bad)
    bad_here = sorted((sha, reason) for sha, reason in known_bad.items() if sha in wanted)
    for sha, reason in bad_here:
        for path in (wanted[sha].path, *wanted[sha].duplicates):
            skipped.append(dataset_mod.Skipped(path, reason))
            log.warning("features: skipped %s: %s", path, reason)
    skipped.sort(key=lambda s: s.path)
    removed = len([sha for sha in old_rows if sha not in wanted])
    unchanged = not todo and not parts.files and rows == sorted(old_rows.values()) and \
        bad_here == sorted(old_bad.items())
    if unchanged:
        log.info("features: cache hit (%s images, 0 new)", f"{len(rows):,}")
        return FeaturesResult(out, key, len(rows), 0, 0, skipped)
    if not rows:
        raise dataset_mod.DatasetError(f"no usable images under {data.root}; see {params.paths.reports_dir}/skipped.csv")

    attrs = _provenance(params, key, weights_sha256, feature_shape, data.classes)
    _merge(out, rows, feature_shape, params.features.dtype, attrs, bad_here, old_rows, parts)
    parts.close()
    for part in parts.files:
        part.unlink(missing_ok=True)
    if parts_dir.is_dir() and not any(parts_dir.iterdir()):
        parts_dir.rmdir()
    n_new = len(todo) - len([r for r in todo if r.sha256 in known_bad])
    if todo or removed:
        log.info("features: %d new image(s), %d removed (%s cached)", n_new, removed, f"{len(rows):,}")
    else:
        log.info("features: cache hit (%s images, 0 new); labels, splits or parts updated", f"{len(rows):,}")
    return FeaturesResult(out, key, len(rows), n_new, removed, skipped)


def _read_existing(out: Path, key: str):
    """({sha: row}, {sha: bad reason}, attrs) of the current cache file, features left on disk.

    A damaged file, or one whose rows do not match their content hash, is set aside, not used."""
    if not out.exists():
        return {}, {}, {}
    try:
        rows, bad, attrs = feature_store.read_index(out, key)
        feature_store.verify_features(out)
    except CacheError as error:
        damaged = out.with_name(out.name + ".damaged")
        os.replace(out, damaged)
        log.warning("features: %s; moved it to %s and rebuilding", error, damaged.name)
        return {}, {}, {}
    return {row[0]: row for row in rows}, bad, attrs


@dataclass
class _Parts:
    """Part files of an unfinished run, kept open so their features are read only when merged."""

    files: list
    rows: dict  # sha -> (part index, row index)
    bad: dict  # sha -> reason
    features: list  # per part: h5py dataset (rows, *feature_shape)
    handles: list
    meta: dict  # weights_sha256 and feature_shape of the run that wrote them

    def close(self):
        for handle in self.handles:
            handle.close()
        self.handles.clear()


def _read_parts(parts_dir: Path, key: str) -> _Parts:
    parts = _Parts([], {}, {}, [], [], {})
    if not parts_dir.is_dir():
        return parts
    for file in sorted(parts_dir.glob("part-*.h5")):
        f = None
        try:
            f = h5py.File(file, "r")
            if f.attrs["key"] != key:
                raise ValueError("made with another key")
            shas = f["sha256"].asstr()[...].tolist()
            features = f["features"]
            bad = dict(zip(f["bad_sha256"].asstr()[...].tolist(), f["bad_reason"].asstr()[...].tolist()))
        except (OSError, KeyError, ValueError) as error:
            if f is not None:
                f.close()
            log.warning("features: ignoring unreadable part %s (%s)", file.name, error)
            file.unlink(missing_ok=True)
            continue
        parts.handles.append(f)
        parts.meta = {"weights_sha256": str(f.attrs["weights_sha256"]),
                      "feature_shape": tuple(int(d) for d in f.attrs["feature_shape"])}
        index = len(parts.features)
        parts.files.append(file)
        parts.features.append(features)
        parts.rows.update({sha: (index, i) for i, sha in enumerate(shas)})
        parts.bad.update(bad)
    return parts


def _write_part(parts_dir: Path, key: str, meta: dict, shas: list, features: list, bad: list) -> None:
    parts_dir.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.stem.split("-")[1]) for p in parts_dir.glob("part-*.h5")), default=0)
    final = parts_dir / f"part-{number:06d}.h5"
    tmp = temp_path_for(final)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["key"] = key
            f.attrs["weights_sha256"] = meta["weights_sha256"]
            f.attrs["feature_shape"] = np.array(meta["feature_shape"], dtype=np.int64)
            f.create_dataset("sha256", data=np.array(shas, dtype="S64"))
            f.create_dataset("features", data=np.stack(features) if features
                             else np.zeros((0, *meta["feature_shape"]), np.float32))
            f.create_dataset("bad_sha256", data=np.array([b[0] for b in bad], dtype="S64"))
            f.create_dataset("bad_reason", data=np.array([b[1] for b in bad], dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
        os.replace(tmp, final)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"could not write {final} ({error}); is the disk full? Parts written before are kept: "
                         "free some space and run 'make features' again") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _decode(path: Path, size: int, resize):
    """(the backbone's input (S, S, 3) float32 or None, error or None) for one file."""
    try:
        return resize(decode_rgb(path, size)), None
    except ImageError as error:
        return None, str(error)


def _prefetched(function, items, workers: int, window: int):
    """``map(function, items)`` on a thread pool, in order, with at most ``window`` items in flight."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def build_backbone(f: FeaturesParams, cache_dir: Path):
    """The frozen Keras backbone these settings describe (imports TensorFlow)."""
    from pipeline import backbones

    return backbones.build(f.backbone, f.weights, f.layer, f.image_size, cache_dir)


def engine(f: FeaturesParams, cache_dir: Path):
    """What runs the frozen backbone: ``.predict((B, S, S, 3) float32)``, ``.input_size``,
    ``.weights_sha256``, ``.feature_shape``. LiteRT builds the Keras model only to convert it."""
    if f.runtime == "litert":
        from pipeline import litert_runtime

        spec = BACKBONES[f.backbone]
        return litert_runtime.LiteRTEngine(f.backbone, weights_fingerprint(spec, f.weights), f.layer,
                                           f.image_size or spec.input_size, cache_dir,
                                           lambda: build_backbone(f, cache_dir))
    return build_backbone(f, cache_dir)


def featurise_files(paths, runner, f: FeaturesParams):
    """Yield ``(features or None, error or None)`` per path, in order, with ``f.runtime``:
    - ``keras``: images decoded and resized (TensorFlow's ``FitToSize``) on ``f.workers`` threads while
      TensorFlow runs the previous batch;
    - ``litert``: images decoded and resized (OpenCV's twin of ``FitToSize``, no TensorFlow op) on
      ``f.workers`` threads while LiteRT/XNNPACK runs the backbone, checked against Keras first.
    Memory: a bounded window of decoded images, whatever the number of paths."""
    size = runner.input_size
    if f.runtime == "litert":
        from pipeline import litert_runtime
        from pipeline.resize import fit_to_size

        litert_runtime.keep_freed_memory()  # every photo allocates fresh arrays of about a megabyte
        to_input = partial(fit_to_size, size=size, mode=f.resize)
    else:
        from pipeline.preprocessing import single_image_resizer

        to_input = single_image_resizer(size, f.resize)
    decoded = _prefetched(lambda path: _decode(path, size, to_input), paths,
                          workers=f.workers, window=2 * f.batch_size + f.workers)
    predict = runner.predict
    pending: list = []  # (image or None, error or None), images not yet run

    def flush():
        images = [image for image, _ in pending if image is not None]
        # (B, S, S, 3) float32 0..255 -> (B, *feature_shape), inference mode
        outputs = iter(predict(np.stack(images)) if images else [])
        results = [(next(outputs), None) if image is not None else (None, error) for image, error in pending]
        pending.clear()
        return results

    for item in decoded:
        pending.append(item)
        if sum(image is not None for image, _ in pending) == f.batch_size:
            yield from flush()
    yield from flush()


def _featurise(todo, params: Params, base: Path, root: Path, parts_dir: Path, key: str):
    """Run the backbone over ``todo``, committing a part file every ``commit_every`` images."""
    from tqdm import tqdm

    f = params.features
    runner = engine(f, base / params.paths.cache_dir)
    storage = np.dtype(f.dtype)
    feature_shape = runner.feature_shape
    meta = {"weights_sha256": runner.weights_sha256, "feature_shape": feature_shape}
    shas, features, bad = [], [], []
    progress = tqdm(total=len(todo), unit="img", desc="features", mininterval=1.0, disable=None)
    started = time.perf_counter()
    results = featurise_files([root / r.path for r in todo], runner, f)
    try:
        for record, (row, error) in zip(todo, results):
            if row is None:
                bad.append((record.sha256, error))
            else:
                shas.append(record.sha256)
                features.append(row.astype(storage))
            progress.update(1)
            if len(shas) + len(bad) >= f.commit_every:
                _write_part(parts_dir, key, meta, shas, features, bad)
                shas, features, bad = [], [], []
        if shas or bad:
            _write_part(parts_dir, key, meta, shas, features, bad)
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    log.info("features: featurised %d image(s) in %.1f s (%.1f img/s)", len(todo), elapsed,
             len(todo) / max(elapsed, 1e-9))
    return runner.weights_sha256, feature_shape


def _merge(out: Path, rows, feature_shape, dtype, attrs, bad, old_rows, parts: _Parts) -> None:
    """Write the new cache file from the old file and the parts, one chunk at a time."""
    old = h5py.File(out, "r") if old_rows else None
    old_index = {sha: i for i, sha in enumerate(sorted(old_rows))}  # the old file's rows are sorted by sha

    def row_features(start, stop):
        block = np.empty((stop - start, *feature_shape), dtype=dtype)
        from_old = []
        for i, (sha, *_rest) in enumerate(rows[start:stop]):
            if sha in parts.rows:
                part, j = parts.rows[sha]
                block[i] = parts.features[part][j]
            else:
                from_old.append((old_index[sha], i))
        if from_old:
            source, target = zip(*from_old)  # both increasing: rows and old file share sha order
            block[list(target)] = old["features"][list(source)]
        return block

    tmp = temp_path_for(out)
    try:
        feature_store.write_table(tmp, rows, row_features, feature_shape, dtype, attrs, bad)
        if old is not None:
            old.close()
        os.replace(tmp, out)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"could not write {out} ({error}); is the disk full? The cache is as it was and the new "
                         f"rows are kept in {out.with_suffix('.parts').name}: free some space and run again") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if old is not None and old.id.valid:
            old.close()


def _provenance(params: Params, key: str, weights_sha256: str, feature_shape, classes) -> dict:
    f = params.features
    spec = BACKBONES[f.backbone]
    return {
        "key": key,
        "stage": STAGE,
        "stage_version": VERSION,
        "params": as_dict(f),
        "key_params": key_params(params),
        "backbone": f.backbone,
        "weights": f.weights,
        "weights_sha256": weights_sha256,
        "layer": f.layer,
        "input_size": f.image_size or spec.input_size,
        "resize": f.resize,
        "decode": DECODE_METHOD,
        "preprocessing": spec.preprocessing,
        "dtype": f.dtype,
        "feature_shape": list(feature_shape),
        "classes": list(classes),
        "library_versions": {name: _version(name) for name in ("tensorflow-cpu", "keras", "h5py", "numpy", "pillow")},
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
