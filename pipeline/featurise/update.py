"""One run of a features stage, as state: what the cache holds, what this run adds, then the commit.

Rows are keyed by the sha256 of the photo's bytes: a run featurises only photos the cache lacks, and
a row stays while its photo is anywhere under data.root (so switching the split file or the
corrections back and forth featurises nothing). The labels and splits of these params go to their
own labelling file (``store.labels``), written whenever they differ from what it holds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import layout
from pipeline import scan as scan_mod
from pipeline.featurise import grouping, passes
from pipeline.featurise.merge import Existing, Sources, merge, provenance, read_existing
from pipeline.params import FeaturesParams, as_dict
from pipeline.store import labels
from pipeline.store import parts as parts_mod

log = logging.getLogger("pipeline.features")
STAGE = layout.STAGE


@dataclass(frozen=True)
class FeaturesResult:
    path: Path  # the cache file
    key: str
    n_rows: int
    n_new: int
    n_removed: int
    skipped: list  # list[scan.Skipped]
    labels: Path | None = None  # the labelling of these params


@dataclass
class Update:
    """The state of one run: the project, the settings of the cache, the scan, and what is on disk."""

    project: object  # pipeline.project.Project
    f: FeaturesParams
    data: scan_mod.Dataset
    out: Path  # the cache file
    stage: str
    key: str = ""
    old: Existing = field(default_factory=Existing)
    parts: parts_mod.Parts | None = None
    meta: dict = field(default_factory=dict)
    todo: list = field(default_factory=list)

    def __post_init__(self):
        self.key = layout.cache_key(self.f)

    @property
    def parts_dir(self) -> Path:
        return self.out.with_suffix(".parts")

    @property
    def wanted(self) -> list:
        """The photos this stage caches: the labelled ones, and for the features stage the unlabelled ones
        too (split ``unlabelled``, outside every key downstream), so that labelling one runs no backbone."""
        return self.data.records + self.data.unlabelled if self.stage == STAGE else self.data.records

    def known_bad(self) -> dict:
        return {**self.old.bad, **self.parts.bad}

    def run(self) -> FeaturesResult:
        for stale in self.out.parent.glob(f".{self.out.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # temporary files of a run that was killed
        self.old = read_existing(self.out, self.key, self.stage)
        self.parts = parts_mod.read(self.parts_dir, self.key)
        try:
            self._featurise_missing()
            return self._commit()
        finally:
            self.parts.close()

    def _featurise_missing(self) -> None:
        cached = set(self.old.shas) | self.parts.shas()
        bad = self.known_bad()
        self.todo = [r for r in self.wanted if r.sha256 not in cached and r.sha256 not in bad]
        old_shas = set(self.old.shas)
        # views asked for that cached rows lack (features.views grew): only those views are computed
        missing_views = {view: [r for r in self.wanted if r.sha256 in cached and
                                not self.parts.has(r.sha256, f"features_{view}") and
                                (view not in self.old.views or r.sha256 not in old_shas)]
                         for view in self.f.views if view != "original"}
        jobs = [(self.todo, tuple(self.f.views))] + [(records, (view,)) for view, records in missing_views.items()
                                                      if records]
        self.meta = {"weights_sha256": self.parts.meta.get("weights_sha256", self.old.attrs.get("weights_sha256", "")),
                     "feature_shape": self.parts.meta.get("feature_shape",
                                                          tuple(self.old.attrs.get("feature_shape", ())))}
        if self.todo:
            log.info("%s: %d new image(s) to featurise (%d cached)", self.stage, len(self.todo), len(cached))
        for records, views in jobs[1:]:
            log.info("%s: view %s of %d cached image(s) to featurise (features.views)", self.stage, views[0],
                     len(records))
        if any(records for records, _ in jobs):
            self.meta = passes.featurise(jobs, self.f, self.project.weights_dir, self.data.root, self.parts_dir,
                                         self.key, self.stage)
            self.parts.close()
            self.parts = parts_mod.read(self.parts_dir, self.key)

    def _labelled_rows(self, bad: dict) -> list:
        rows = sorted((r.sha256, r.path, r.label, r.split) for r in self.wanted if r.sha256 not in bad)
        if not any(r[3] != scan_mod.UNLABELLED for r in rows):
            raise scan_mod.DatasetError(f"no usable images under {self.data.root}; see "
                                        f"{self.project.params.paths.reports_dir}/skipped.csv")
        return rows

    def skipped(self, bad: dict) -> list:
        """The scan's skipped files, and every path of a photo that could not be decoded."""
        skipped = list(self.data.skipped)
        for record in self.wanted:
            if record.sha256 in bad:
                for path in (record.path, *record.duplicates):
                    skipped.append(scan_mod.Skipped(path, bad[record.sha256], record.format))
                    log.warning("%s: skipped %s: %s", self.stage, path, bad[record.sha256])
        return sorted(skipped, key=lambda s: s.path)

    def _commit(self) -> FeaturesResult:
        """Merge the old rows and the parts into the cache file unless nothing changed, then the labelling."""
        bad = self.known_bad()
        present = self.data.present
        rows = self._labelled_rows(bad)
        cached = set(self.old.shas) | self.parts.shas()
        keep = sorted(sha for sha in cached if sha in present and sha not in bad)
        bad_here = sorted((sha, reason) for sha, reason in bad.items() if sha in present)
        sources = Sources(self.out, self.old, self.parts, self.meta["feature_shape"])
        try:
            rows = self._grouped(rows, sources)
            removed = len(set(self.old.shas) - set(keep))
            unchanged = not self.todo and not self.parts.files and keep == self.old.shas and \
                bad_here == sorted(self.old.bad.items()) and self.old.views == list(self.f.views)
            if not unchanged:
                merge(self.out, keep, self.meta["feature_shape"], self.f.dtype,
                      provenance(self.f, self.key, self.meta, self.stage), bad_here, sources)
        finally:
            sources.close()
        self.parts.remove()
        labelling = self._write_labels(rows)
        n_new = len([r for r in self.todo if r.sha256 not in bad])
        if unchanged:
            log.info("%s: cache hit (%s images, 0 new)", self.stage, f"{len(keep):,}")
        elif self.todo or removed:
            log.info("%s: %d new image(s), %d removed (%s cached)", self.stage, n_new, removed, f"{len(keep):,}")
        else:
            log.info("%s: cache hit (%s images, 0 new); views or parts updated", self.stage, f"{len(keep):,}")
        return FeaturesResult(self.out, self.key, len(keep), n_new, removed, self.skipped(bad), labelling)

    def _grouped(self, rows, sources):
        params = self.project.params
        calibration = None
        if self.stage == STAGE:
            calibration = grouping.calibrated(self.f, self.project.weights_dir, self.data.root, self.out, self.key,
                                              rows, sources)
        if not (params.data.group_near_duplicates and self.data.split_mode == "hash"):
            return rows
        if self.stage == STAGE:
            return grouping.grouped(rows, sources, calibration, self.stage)
        return grouping.splits_of_pooled(self.project.labels_file(), rows, self.stage)

    def _write_labels(self, rows) -> Path:
        """The labelling of these params, rewritten only when it differs from the file's."""
        path = self.project.labels_file(self.out)
        classes = list(self.data.classes)
        try:
            current = labels.read(path)
            if current.rows() == rows and current.classes == classes:
                return path
        except labels.CacheError:
            pass  # none yet, or damaged: written anew
        labels.write(path, rows, classes, self.key, self.project.labels_key, as_dict(self.project.params.data))
        return path

