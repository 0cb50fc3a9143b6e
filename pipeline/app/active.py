"""Which unlabelled photos to label next: the order that teaches the model most, from cached features.

Two regimes, as in the active-learning literature:
- **tiny budgets** (fewer than ``TYPICAL_UNTIL`` labelled photos per class): typical photos first
  (TypiClust, Hacohen et al. 2022). The labelled and unlabelled photos are clustered into
  ``labelled + batch`` clusters; from each cluster that holds no labelled photo, largest first, the
  photo of highest typicality (the inverse mean distance to its ``TYPICALITY_K`` nearest photos in the
  cluster). Uncertainty is worthless while the model has seen almost nothing.
- **larger budgets**: uncertain photos, spread out. The unlabelled photos are clustered into
  ``batch`` clusters; from each, the photo whose two best classes are closest (smallest margin);
  clusters in order of that photo's margin (Cluster-Margin, Citovsky et al. 2021).
After the batch, the remaining photos follow by margin, so the list never ends early.

Features are centred on the labelled photos' mean (all photos' mean when none is labelled) and scaled
to unit length, the geometry the knn head and the neighbours use.
"""
from __future__ import annotations

import numpy as np

from pipeline.vectors import unit_rows

TYPICAL_UNTIL = 3  # labelled photos per class below which typical photos come first
TYPICALITY_K = 20  # neighbours that define a photo's typicality
MAX_CLUSTER_POINTS = 20_000  # k-means on a sample of this many photos beyond it (memory and time flat)


def order(unlabelled: np.ndarray, labelled: np.ndarray, n_classes: int, proba: np.ndarray | None = None,
          batch: int | None = None, seed: int = 0) -> tuple[np.ndarray, str]:
    """(indices into ``unlabelled``, best first; the regime used: ``typical`` or ``uncertain``).

    ``proba``: the current model's (N, K) probabilities of the unlabelled photos (None: no model yet)."""
    n = len(unlabelled)
    if n == 0:
        return np.zeros(0, np.int64), "none"
    batch = max(1, min(n, batch or n_classes))
    centre = (labelled if len(labelled) else unlabelled).mean(axis=0)
    u = unit_rows(unlabelled, centre)
    margins = _margins(proba) if proba is not None and proba.shape[1] > 1 else None
    if margins is None or len(labelled) < TYPICAL_UNTIL * n_classes:
        first, regime = _typical(u, unit_rows(labelled, centre) if len(labelled) else u[:0], batch, seed), "typical"
    else:
        first, regime = _uncertain_spread(u, margins, batch, seed), "uncertain"
    rest = np.setdiff1d(np.arange(n), first)
    if margins is not None:
        rest = rest[np.argsort(margins[rest], kind="stable")]
    return np.concatenate([first, rest]).astype(np.int64), regime


def _margins(proba: np.ndarray) -> np.ndarray:
    top = np.sort(proba, axis=1)
    return top[:, -1] - top[:, -2]


def _kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster numbers of ``points`` (k-means fitted on a sample beyond ``MAX_CLUSTER_POINTS``)."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(points)))
    rng = np.random.default_rng(seed)
    sample = points if len(points) <= MAX_CLUSTER_POINTS else points[rng.choice(len(points), MAX_CLUSTER_POINTS,
                                                                                  replace=False)]
    model = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(sample)
    return model.predict(points)


def _typical(u: np.ndarray, labelled: np.ndarray, batch: int, seed: int) -> np.ndarray:
    everything = np.concatenate([labelled, u]) if len(labelled) else u
    clusters = _kmeans(everything, len(labelled) + batch, seed)
    covered = set(clusters[:len(labelled)].tolist())
    mine = clusters[len(labelled):]
    sizes = np.bincount(mine, minlength=clusters.max() + 1)
    chosen = []
    for c in sorted(set(mine.tolist()) - covered, key=lambda c: (-sizes[c], c)):
        members = np.flatnonzero(mine == c)
        chosen.append(members[np.argmax(_typicality(u[members]))])
        if len(chosen) == batch:
            break
    if len(chosen) < batch:  # more clusters are covered than expected: the most typical photos overall
        others = np.setdiff1d(np.arange(len(u)), chosen)
        chosen += others[np.argsort(-_typicality(u[others]), kind="stable")][:batch - len(chosen)].tolist()
    return np.array(chosen, np.int64)


def _typicality(points: np.ndarray) -> np.ndarray:
    """1 / mean distance to the ``TYPICALITY_K`` nearest others (in blocks: memory flat)."""
    if len(points) == 1:
        return np.ones(1)
    k = min(TYPICALITY_K, len(points) - 1)
    out = np.empty(len(points))
    for start in range(0, len(points), 1024):
        block = points[start:start + 1024]
        distances = np.sqrt(np.maximum(2 - 2 * block @ points.T, 0))
        nearest = np.partition(distances, k, axis=1)[:, 1:k + 1]  # column 0: the photo itself
        out[start:start + 1024] = 1 / np.maximum(nearest.mean(axis=1), 1e-9)
    return out


def _uncertain_spread(u: np.ndarray, margins: np.ndarray, batch: int, seed: int) -> np.ndarray:
    clusters = _kmeans(u, batch, seed)
    picks = []
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        picks.append(members[np.argmin(margins[members])])
    picks = np.array(picks, np.int64)
    return picks[np.argsort(margins[picks], kind="stable")]
