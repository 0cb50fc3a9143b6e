"""Near-duplicate photos from their cached features: the same shot resized, re-saved, lightly cropped
or colour-adjusted. Exact duplicates (the same bytes) are already one row.

Two photos are near-duplicates when the cosine similarity of their pooled features is at least a
threshold calibrated on the user's own photos, not guessed:
- ``calibrate``: a sample of the cached photos is copied in four ways (shrunk to half and re-saved,
  re-saved at JPEG quality 40, 8% cropped off each side, brightness +20% and saturation -30%), the
  copies go through the same decode, resize and backbone; the threshold is set between the
  similarities of copies to their originals (which it must catch) and those of distinct photos
  (which it must not), and the recall and false-pair rate it gives on them are recorded;
- ``pairs``: every pair of rows at or above the threshold, computed block by block (all rows'
  unit vectors are held: 4 bytes x D a row);
- ``groups``: the connected groups of those pairs, for ``data.group_near_duplicates`` (one split per group).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from pipeline.data.decode import open_image
from pipeline.vectors import unit_rows

SAMPLE = 32  # photos copied for the calibration
WORKING_SIDE = 1024  # copies are made from the photo shrunk to at most this many pixels a side: cheap for
                     # 12 MP photos, and still 4x the input size, so the copy is what the backbone would see
DISTINCT = 256  # photos whose pairwise similarities stand for distinct photos
BLOCK = 2048  # rows per block of the all-pairs search
VERSION = 2  # bump when the copies or the rule change, so calibrations are redone


def unit_vectors(features: np.ndarray) -> np.ndarray:
    """(N, D) or (N, H, W, C) activations -> (N, D) float32 rows of length 1 (spatial maps averaged)."""
    x = np.asarray(features, np.float32)
    return unit_rows(x.mean(axis=(1, 2)) if x.ndim == 4 else x)


def copies(image: Image.Image) -> dict[str, Image.Image]:
    """The four near-copies of one photo that the calibration featurises (saved as JPEG by the caller)."""
    image.draft("RGB", (WORKING_SIDE, WORKING_SIDE))
    image = ImageOps.exif_transpose(image).convert("RGB")
    image.thumbnail((WORKING_SIDE, WORKING_SIDE))
    width, height = image.size
    cut = (round(width * 0.08), round(height * 0.08))
    return {
        "resized": image.resize((max(1, width // 2), max(1, height // 2)), Image.BILINEAR),
        "recompressed": image,  # saved at quality 40
        "cropped": image.crop((cut[0], cut[1], width - cut[0], height - cut[1])),
        "colour": ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.2)).enhance(0.7),
    }


def calibrate(sample: list[tuple[str, Path]], originals: np.ndarray, distinct: np.ndarray, featurise) -> dict:
    """The threshold, from ``sample`` (sha256, file) photos whose unit ``originals`` are given, and the
    unit vectors of ``distinct`` photos. ``featurise(paths) -> [(features or None, error)]``."""
    similarities: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        made = []  # (row in sample, kind, path)
        for i, (_, file) in enumerate(sample):
            try:
                with open_image(file) as image:
                    for kind, copy in copies(image).items():
                        path = Path(tmp) / f"{i}-{kind}.jpg"
                        copy.save(path, quality=40 if kind == "recompressed" else 90)
                        made.append((i, kind, path))
            except OSError:
                continue
        results = featurise([path for _, _, path in made])
        for (i, kind, _), (row, _error) in zip(made, results):
            if row is not None:
                similarities.setdefault(kind, []).append(float(unit_vectors(row[None])[0] @ originals[i]))
    copy_values = np.array([v for values in similarities.values() for v in values])
    upper = np.triu_indices(len(distinct), k=1)
    distinct_values = (distinct @ distinct.T)[upper] if len(distinct) > 1 else np.zeros(0)
    if not len(copy_values):
        return {"version": VERSION, "threshold": None, "reason": "no photo of the sample could be copied"}
    catch = float(np.quantile(copy_values, 0.05))  # keeps 95% of the synthetic copies
    avoid = float(np.quantile(distinct_values, 0.999)) if len(distinct_values) else -1.0
    threshold = (catch + avoid) / 2 if catch > avoid else catch
    return {
        "version": VERSION,
        "threshold": threshold,
        "recall_on_copies": float(np.mean(copy_values >= threshold)),
        "recall_by_kind": {kind: float(np.mean(np.array(v) >= threshold)) for kind, v in similarities.items()},
        "distinct_pairs_above": float(np.mean(distinct_values >= threshold)) if len(distinct_values) else 0.0,
        "copies": {"n": int(len(copy_values)), "min": float(copy_values.min()), "q05": catch,
                   "median": float(np.median(copy_values))},
        "distinct": {"n": int(len(distinct_values)), "q999": avoid,
                     "max": float(distinct_values.max()) if len(distinct_values) else None},
    }


def pairs(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Every (i, j, similarity) with i < j and similarity >= threshold, most similar first."""
    found = []
    for start in range(0, len(vectors), BLOCK):
        block = vectors[start:start + BLOCK] @ vectors.T  # (B, N)
        rows, cols = np.nonzero(block >= threshold)
        keep = cols > rows + start
        for i, j in zip(rows[keep], cols[keep]):
            found.append((int(i + start), int(j), float(block[i, j])))
    found.sort(key=lambda pair: -pair[2])
    return found


def groups(n: int, found: list[tuple[int, int, float]]) -> np.ndarray:
    """(N,) group number of each row: rows joined by a pair, directly or not, share one (the connected
    components of the graph of pairs, numbered by their first row)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = np.array([i for i, _, _ in found], np.int64)
    cols = np.array([j for _, j, _ in found], np.int64)
    graph = coo_matrix((np.ones(len(found)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    first = np.full(component.max() + 1 if n else 0, n, np.int64)
    np.minimum.at(first, component, np.arange(n))
    return first[component]
