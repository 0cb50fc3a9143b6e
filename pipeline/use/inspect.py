"""Command `inspect`: what is wrong with the photos, from the feature cache alone (no backbone).

Three finders, each writing a CSV into ``reports/`` (paths relative to ``data.root``):
- ``label_issues.csv`` (path, given, suggested, score): likely label errors by confident learning
  (cleanlab) on out-of-fold probabilities of a K-fold logistic regression on the cached features;
  most suspicious first (score: cleanlab's label quality, low is suspicious);
- ``near_duplicates.csv`` (path_a, path_b, similarity, split_a, split_b, label_a, label_b, leak,
  labels_differ): pairs whose features are at least the threshold the features stage calibrated
  on copies of these photos; pairs that straddle splits (leakage) first, then pairs with different
  labels;
- ``outliers.csv`` (path, label, split, score, similarity_own_class, nearest_other_class,
  similarity_nearest_other): photos unlike any class, cleanlab's out-of-distribution score on the
  features (low is atypical), with their similarity to their own class and to the nearest other.
``inspect.json`` holds the summary and the cache it was made from; ``make evaluate`` shows the
findings on the report page. Memory: the features of every photo (4 x D bytes each).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import layout
from pipeline.errors import PipelineError
from pipeline.fingerprint import atomic_write_text
from pipeline.quality import near_duplicates
from pipeline.store import labels, table
from pipeline.store.table import CacheError

NEIGHBOUR_CHUNK_MB = 64
log = logging.getLogger("pipeline.inspect")


class InspectError(PipelineError, ValueError):
    """Photos that the finders cannot work on (one class only, ...)."""


@dataclass(frozen=True)
class InspectResult:
    summary: dict
    label_issues: list[dict]
    near_duplicates: list[dict]
    outliers: list[dict]
    text: str


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, classes: list[str], folds: int, C: float):
    """(N, K) probabilities of each photo from a logistic regression that did not see it, and the folds used."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y, minlength=len(classes))
    smallest = int(np.argmin(counts))
    if counts[smallest] < 2:
        raise InspectError(f"class {classes[smallest]} has {counts[smallest]} photo(s); finding label issues needs "
                           "at least 2 per class")
    used = min(folds, int(counts[smallest]))
    if used < folds:
        log.info("inspect: %d folds, not %d: the smallest class (%s) has %d photos", used, folds, classes[smallest],
                 counts[smallest])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=1000))
    probabilities = cross_val_predict(model, x, y, cv=StratifiedKFold(used, shuffle=True, random_state=0),
                                      method="predict_proba")
    return probabilities, used


def run(project, processes: int | None = None) -> InspectResult:
    """The findings on the cached features. ``processes``: cleanlab's worker processes for the label issues
    (None: one per core; the same findings either way). A process serving requests on threads passes 1:
    its forked workers inherit locks other threads held at the fork, and one hung the app's review page."""
    params = project.params
    started = time.perf_counter()
    path = project.features_file()
    if not path.is_file():
        raise CacheError(f"no cached features at {path}; run 'make features' first")
    rows = _labelled(labels.read_table(path, project.labels_file(path)))
    classes = list(rows.attrs["classes"])
    present = sorted(set(rows.labels.tolist()))
    if len(present) < 2:
        raise InspectError(f"the cache holds one class only ({present[0] if present else 'none'}); inspect compares "
                           "classes: it needs at least 2")
    p = params.inspect
    y = np.array([classes.index(label) for label in rows.labels])
    x = rows.features.reshape(len(rows.labels), -1) if rows.features.ndim == 2 else \
        rows.features.mean(axis=(1, 2))
    vectors = near_duplicates.unit_vectors(x)
    label_issues, folds = _label_issues(rows, x, y, classes, p, processes)
    threshold, calibration = _threshold(p, path)
    pairs = _pairs(rows, vectors, threshold)
    outliers = _outliers(rows, vectors, y, classes, p.outliers)
    summary = {"features_key": rows.attrs["key"], "content_hash": rows.attrs["content_hash"], "photos": len(y),
               "classes": len(classes), "folds": folds, "label_issues": len(label_issues),
               "near_duplicate_pairs": len(pairs), "leaking_pairs": sum(q["leak"] for q in pairs),
               "pairs_with_different_labels": sum(q["labels_differ"] for q in pairs),
               "near_duplicate_threshold": threshold, "threshold_from": "inspect.near_duplicate_threshold"
               if p.near_duplicate_threshold is not None else "calibration", "calibration": calibration,
               "outliers": len(outliers), "seconds": time.perf_counter() - started}
    _write_findings(project.reports_dir, summary, label_issues, pairs, outliers)
    text = _summary_text(summary, label_issues, pairs, outliers, Path(params.paths.reports_dir))
    log.info("inspect: %d photos in %.1f s", len(y), summary["seconds"])
    return InspectResult(summary, label_issues, pairs, outliers, text)


def _label_issues(rows, x, y, classes, p, processes) -> tuple[list[dict], int]:
    """Likely label errors by confident learning on out-of-fold probabilities, least likely label first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probabilities, folds = out_of_fold_probabilities(x, y, classes, p.folds, p.C)
    flagged = find_label_issues(y, probabilities, return_indices_ranked_by="self_confidence", n_jobs=processes)
    quality = get_label_quality_scores(y, probabilities, method="self_confidence")
    return [{"path": rows.paths[i], "given": classes[y[i]], "suggested": classes[int(np.argmax(probabilities[i]))],
             "score": float(quality[i]), "split": rows.splits[i]} for i in flagged], folds


def _pairs(rows, vectors, threshold: float) -> list[dict]:
    """Near-duplicate pairs, those straddling splits first, then those with different labels."""
    pairs = []
    for i, j, similarity in near_duplicates.pairs(vectors, threshold):
        pairs.append({"path_a": rows.paths[i], "path_b": rows.paths[j], "similarity": similarity,
                      "split_a": rows.splits[i], "split_b": rows.splits[j], "label_a": rows.labels[i],
                      "label_b": rows.labels[j], "leak": bool(rows.splits[i] != rows.splits[j]),
                      "labels_differ": bool(rows.labels[i] != rows.labels[j])})
    pairs.sort(key=lambda q: (not q["leak"], not q["labels_differ"], -q["similarity"]))
    return pairs


def _outliers(rows, vectors, y, classes, share: float) -> list[dict]:
    """The ``share`` of photos least typical of the cache (cleanlab's k-NN score), least typical first."""
    from cleanlab.outlier import OutOfDistribution

    k = min(10, len(vectors) - 1)
    typicality = np.ones(len(vectors))
    if k >= 1:
        import sklearn

        # the neighbour search goes through scikit-learn's chunked distances: its default 1 GB of
        # working memory per chunk was most of the peak at 10k photos
        with sklearn.config_context(working_memory=NEIGHBOUR_CHUNK_MB):
            typicality = OutOfDistribution(params={"k": k}).fit_score(features=vectors, verbose=False)
    centroids = near_duplicates.unit_vectors(np.stack([vectors[y == c].mean(axis=0) if np.any(y == c)
                                                       else np.zeros(vectors.shape[1]) for c in range(len(classes))]))
    to_centroids = vectors @ centroids.T  # (N, K)
    outliers = []
    for i in np.argsort(typicality, kind="stable")[:max(1, math.ceil(share * len(vectors)))]:
        others = [(float(to_centroids[i, c]), classes[c]) for c in range(len(classes)) if c != y[i]]
        nearest = max(others)
        outliers.append({"path": rows.paths[i], "label": rows.labels[i], "split": rows.splits[i],
                         "score": float(typicality[i]), "similarity_own_class": float(to_centroids[i, y[i]]),
                         "nearest_other_class": nearest[1], "similarity_nearest_other": nearest[0]})
    return outliers


def _write_findings(reports: Path, summary: dict, label_issues, pairs, outliers) -> None:
    _write_csv(reports / "label_issues.csv", ["path", "given", "suggested", "score"], label_issues)
    _write_csv(reports / "near_duplicates.csv", ["path_a", "path_b", "similarity", "split_a", "split_b", "label_a",
                                                 "label_b", "leak", "labels_differ"], pairs)
    _write_csv(reports / "outliers.csv", ["path", "label", "split", "score", "similarity_own_class",
                                          "nearest_other_class", "similarity_nearest_other"], outliers)
    atomic_write_text(reports / "inspect.json", json.dumps(summary, indent=2) + "\n")


def _labelled(rows: table.FeatureTable) -> table.FeatureTable:
    """The rows with a label (photos of data.unlabelled have none to check)."""
    keep = rows.splits != table.UNLABELLED
    if keep.all():
        return rows
    return dataclasses.replace(rows, sha256=rows.sha256[keep], paths=rows.paths[keep], labels=rows.labels[keep],
                               splits=rows.splits[keep], features=rows.features[keep])


def _threshold(p, path: Path) -> tuple[float, dict | None]:
    if p.near_duplicate_threshold is not None:
        return p.near_duplicate_threshold, None
    try:
        calibration = json.loads(layout.calibration_file(path).read_text())
    except (OSError, ValueError):
        raise CacheError(f"no near-duplicate calibration beside {path}; run 'make features' first") from None
    if calibration.get("threshold") is None:
        raise InspectError(f"the near-duplicate calibration failed ({calibration.get('reason')}); "
                           "set inspect.near_duplicate_threshold")
    return float(calibration["threshold"]), calibration


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, header, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _summary_text(summary: dict, issues, pairs, outliers, reports: Path) -> str:
    lines = [f"{summary['photos']:,} photos, {summary['classes']} classes",
             f"likely label errors: {summary['label_issues']} ({summary['folds']}-fold out-of-fold probabilities)"]
    lines += [f"  {q['path']}: {q['given']} -> {q['suggested']} (score {q['score']:.3f})" for q in issues[:5]]
    lines.append(f"near-duplicate pairs: {summary['near_duplicate_pairs']} (similarity >= "
                 f"{summary['near_duplicate_threshold']:.3f}, {summary['threshold_from']}); "
                 f"{summary['leaking_pairs']} straddle splits, {summary['pairs_with_different_labels']} with "
                 "different labels")
    lines += [f"  {q['path_a']} ~ {q['path_b']} ({q['similarity']:.3f}, {q['split_a']}/{q['split_b']})"
              for q in pairs[:5]]
    if summary["leaking_pairs"]:
        lines.append("  set data.group_near_duplicates: true to put each group into one split")
    lines.append(f"outliers: {summary['outliers']} least typical photos")
    lines += [f"  {q['path']} ({q['label']}, score {q['score']:.3f})" for q in outliers[:5]]
    lines.append(f"written: {', '.join(str(reports / n) for n in ('label_issues.csv', 'near_duplicates.csv', 'outliers.csv'))}")
    return "\n".join(lines)


def corrections_template(project, result: InspectResult) -> tuple[Path, int]:
    """Add one undecided row per finding to ``data.corrections`` (photos it names already are left as
    they are), for the user to fill in by hand; returns the file and the rows added."""
    from pipeline.data import corrections

    params, base = project.params, project.base
    path = corrections.file_of(params.data, base)
    if path is None:
        raise InspectError("data.corrections is null; set it to a file (e.g. corrections.csv) to write the template")
    root = base / params.data.root
    rows = [corrections.Correction(corrections.key_of(root / q["path"], base), "", q["suggested"],
                                   f"label issue: filed as {q['given']}, looks like {q['suggested']} "
                                   f"(score {q['score']:.3f})") for q in result.label_issues]
    rows += [corrections.Correction(corrections.key_of(root / q["path_b"], base), "", "",
                                    f"near-duplicate of {corrections.key_of(root / q['path_a'], base)} "
                                    f"(similarity {q['similarity']:.3f}"
                                    f"{', straddles splits' if q['leak'] else ''})") for q in result.near_duplicates]
    rows += [corrections.Correction(corrections.key_of(root / q["path"], base), "", "",
                                    f"outlier: unlike any class (filed as {q['label']}, nearest other class "
                                    f"{q['nearest_other_class']})") for q in result.outliers]
    before = len(corrections.read(path))
    after = corrections.record(path, rows, undecided_only=True)
    return path, len(after) - before
