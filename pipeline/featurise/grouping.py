"""Near-duplicates in the features stage: the threshold calibrated on copies of these photos, and each
group of near-duplicates kept in one split (``data.group_near_duplicates``)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline import layout, runtime
from pipeline import scan as scan_mod
from pipeline.fingerprint import atomic_write_text
from pipeline.params import FeaturesParams
from pipeline.quality import near_duplicates
from pipeline.store import labels

log = logging.getLogger("pipeline.features")


def calibrated(f: FeaturesParams, weights_dir: Path, root: Path, out: Path, key: str, rows, sources) -> dict:
    """The near-duplicate threshold of these photos (``quality.near_duplicates.calibrate``), kept beside
    the cache; made again only when a photo of its sample is gone (adding photos keeps it)."""
    by_sha = sorted(rows)
    path = layout.calibration_file(out)
    try:
        stored = json.loads(path.read_text())
        present = {r[0] for r in rows}
        if stored.get("key") == key and stored.get("version") == near_duplicates.VERSION and \
                set(stored.get("sample", [None])) <= present:
            return stored
    except (OSError, ValueError):
        pass  # none yet, or unreadable: calibrate again
    sample = by_sha[:near_duplicates.SAMPLE]
    record = {"key": key, "version": near_duplicates.VERSION, "sample": [r[0] for r in sample]}
    originals = near_duplicates.unit_vectors(sources.get([r[0] for r in sample]))
    distinct = near_duplicates.unit_vectors(sources.get([r[0] for r in by_sha[:near_duplicates.DISTINCT]]))
    runner = runtime.open_backbone(f, weights_dir)
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


def grouped(rows, sources, calibration: dict, stage: str):
    """Rows with each near-duplicate group in one split: that of its member with the smallest sha256."""
    threshold = calibration.get("threshold")
    if threshold is None:
        return rows
    vectors = np.concatenate([near_duplicates.unit_vectors(sources.get([r[0] for r in rows[i:i + 1024]]))
                              for i in range(0, len(rows), 1024)])
    group = near_duplicates.groups(len(rows), near_duplicates.pairs(vectors, threshold))
    split_of_group = {}
    for g, row in zip(group, rows):  # rows are sorted by sha: the first labelled member of a group decides
        if row[3] != scan_mod.UNLABELLED:
            split_of_group.setdefault(g, row[3])
    regrouped = [(sha, path, label, split if split == scan_mod.UNLABELLED else split_of_group[g])
                 for g, (sha, path, label, split) in zip(group, rows)]
    moved = sum(a[3] != b[3] for a, b in zip(rows, regrouped))
    members = int(np.sum(np.bincount(group)[group] > 1))
    log.info("%s: %d photo(s) in near-duplicate groups, %d moved to their group's split "
             "(data.group_near_duplicates)", stage, members, moved)
    return regrouped


def splits_of_pooled(pooled_labels: Path, rows, stage: str):
    """top-features takes its splits from the features stage's labelling of the same params, where
    near-duplicates were grouped."""
    try:
        labelling = labels.read(pooled_labels)
    except labels.CacheError:
        raise labels.CacheError(f"{stage} with data.group_near_duplicates takes its splits from {pooled_labels}; "
                                "run 'make features' first") from None
    index = dict(zip(labelling.sha256.tolist(), labelling.splits.tolist()))
    return [(sha, path, label, index.get(sha, split)) for sha, path, label, split in rows]
