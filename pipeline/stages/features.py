"""Stage `features`: run the frozen backbone once per distinct photo and cache its activations.

Two stages share this code:
- ``features``: the activations at ``features.layer`` (default: the pooled features), in
  ``cache/features/``; train-head's input;
- ``top-features``: the activations at ``train_top.cut_point`` (float16 spatial maps, gzip), in
  ``cache/top_features/``; train-top's input.

Incremental: rows are keyed by the sha256 of the photo's bytes, so a run featurises only photos
the cache lacks; removed photos drop out. Finished photos are committed every
``features.commit_every`` to a part file (``store.parts``), so an interrupted run loses at most
one part; the next run merges the parts into the cache file and finishes. Beside the cache, the
labels and splits of these data params (``store.labels``). How: ``pipeline.featurise``.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline import layout
from pipeline import scan as scan_mod
from pipeline.errors import PipelineError
from pipeline.featurise.update import FeaturesResult, Update
from pipeline.fingerprint import RunRecord, atomic_write_text
from pipeline.params import FeaturesParams, ParamsError
from pipeline.stages.contract import check_class_names
from pipeline.store.table import CacheError

STAGE = layout.STAGE
TOP_STAGE = "top-features"
__all__ = ["FeaturesResult", "run", "run_top"]

log = logging.getLogger("pipeline.features")

# Skipped for a reason other than the file itself: not counted against data.max_bad_fraction.
# skip reasons that are not a bad photo (data.max_bad_fraction): a choice, a conflict, a format not read
_NOT_BAD = ("label conflict", "split conflict", "not listed", scan_mod.EXCLUDED, scan_mod.UNREAD_REASON)


class BadDataError(PipelineError, RuntimeError):
    """Too many photos could not be used (data.max_bad_fraction)."""


def run(project) -> FeaturesResult:
    """Stage ``features``: bring the cache at ``features.layer`` up to date with ``data.root``."""
    f = project.params.features
    return _run(project, f, layout.FOLDER, STAGE, {"features": layout.key_params(f)})


def run_top(project) -> FeaturesResult:
    """Stage ``top-features``: bring the cache at ``train_top.cut_point`` up to date with ``data.root``."""
    f = project.top_settings
    ingredients = {"train_top": {"cut_point": project.params.train_top.cut_point},
                   "features": {k: v for k, v in layout.key_params(f).items() if k not in ("layer", "dtype")}}
    try:
        return _run(project, f, layout.TOP_FOLDER, TOP_STAGE, ingredients)
    except ParamsError as error:  # the cut point is this stage's setting: name it so
        if str(error).startswith("features.layer:"):
            raise ParamsError(str(error).replace("features.layer:", "train_top.cut_point:", 1)) from None
        raise


def _run(project, f: FeaturesParams, folder: str, stage: str, ingredients: dict) -> FeaturesResult:
    if f.engine == "ray":  # before anything is written: an unreachable cluster is an error with no trace
        from pipeline import ray_engine

        ray_engine.connect(f)
    params = project.params
    data = scan_mod.scan(params.data, project.base, index_path=project.file_index)
    check_class_names(list(data.classes), params.reject.label)
    unread = scan_mod.unread_summary(data.skipped)
    if unread:
        log.warning("%s: %s (%s/skipped.csv)", stage, unread, params.paths.reports_dir)
    out = project.features_file(f, folder)
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
        result = Update(project, f, data, out, stage).run()
    finally:
        lock.release()
    record.save(ingredients)
    if stage == STAGE:  # one writer of reports/skipped.csv: top-features skips the same files
        _write_skipped(project.skipped_csv, result.skipped)
    _check_bad_share(params, data, result)
    return result


def _check_bad_share(params, data, result: FeaturesResult) -> None:
    n_seen = sum(1 + len(r.duplicates) for r in data.records) + len(data.skipped)
    n_bad = sum(1 for s in result.skipped if not s.reason.startswith(_NOT_BAD))
    if n_seen and n_bad / n_seen > params.data.max_bad_fraction:
        raise BadDataError(
            f"{n_bad} of {n_seen} images under {data.root} are unusable (over data.max_bad_fraction="
            f"{params.data.max_bad_fraction}); see {params.paths.reports_dir}/skipped.csv"
        )


def _write_skipped(path: Path, skipped) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "format", "reason"])
    writer.writerows((s.path, s.format, s.reason) for s in skipped)
    atomic_write_text(path, buffer.getvalue())
