"""The labelling of a features cache: each photo's path, label and split under one setting of the data params.

A features cache holds what the backbone saw, one row per distinct photo, and nothing that the data
params decide. What they decide (which folder is which class, the split, the user's corrections)
is a labelling file beside it, named by ``layout.labels_key``:
``cache/features/<backbone>-<key>.labels/<labels key>.h5``:

    /sha256  (N,)  ascii, 64 chars   the photo's row in the features cache, sorted
    /path    (N,)  utf-8             its first path, relative to data.root
    /label   (N,)  utf-8             its class ("" for a photo of data.unlabelled without one)
    /split   (N,)  utf-8             train | val | test | unlabelled
    attrs: key, features_key, classes (JSON), data (JSON: the data params), content_hash, n_rows, created

So two commands with the same params read the same labels and splits, whatever ran between them.
``content_hash`` (the features key and every labelled row's sha256, label and split) is what a
trained model's key depends on. Written whole to a temporary name and moved into place.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from pipeline.fingerprint import temp_path_for
from pipeline.store.table import STRING, CacheError, FeatureTable, attr_value, content_hash, open_checked, view_dataset

COLUMNS = ("sha256", "path", "label", "split")


@dataclass(frozen=True)
class Labelling:
    """The rows of a labelling file as arrays, in sha256 order."""

    path: Path
    sha256: np.ndarray  # (N,) str
    paths: np.ndarray  # (N,) str, relative to data.root
    labels: np.ndarray  # (N,) str
    splits: np.ndarray  # (N,) str
    classes: list[str]
    attrs: dict

    def __len__(self) -> int:
        return len(self.sha256)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(sha256, path, label, split) of every photo."""
        return list(zip(self.sha256.tolist(), self.paths.tolist(), self.labels.tolist(), self.splits.tolist()))


def write(path: Path, rows: list[tuple[str, str, str, str]], classes, features_key: str, key: str,
          data: dict) -> None:
    """Write a labelling: ``rows`` (sha256, path, label, split) sorted by sha256."""
    tmp = temp_path_for(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("sha256", data=np.array([r[0] for r in rows], dtype="S64").reshape(len(rows)))
            for i, name in enumerate(COLUMNS[1:], start=1):
                f.create_dataset(name, data=np.array([r[i] for r in rows], dtype=object).reshape(len(rows)),
                                 dtype=STRING)
            attrs = {"key": key, "features_key": features_key, "classes": json.dumps(list(classes)),
                     "data": json.dumps(data), "n_rows": len(rows),
                     "content_hash": content_hash(features_key, [(r[0], r[2], r[3]) for r in rows]),
                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            f.attrs.update(attrs)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read(path: Path) -> Labelling:
    """A labelling file; CacheError naming what to run when it is missing or damaged."""
    if not path.is_file():
        raise CacheError(f"no labels for these data params at {path}; run 'make features' (it labels and splits "
                         "the photos as the params say)")
    try:
        with h5py.File(path, "r") as f:
            columns = [f[name].asstr()[...] for name in COLUMNS]
            attrs = dict(f.attrs.items())
    except (OSError, KeyError) as error:
        raise CacheError(f"{path} is damaged ({' '.join(str(error).split())}); delete it and run 'make features'") \
            from None
    attrs = {k: v.decode() if isinstance(v, bytes) else (v.item() if isinstance(v, np.generic) else v)
             for k, v in attrs.items()}
    labelling = Labelling(path, *(np.asarray(c, dtype=str) for c in columns), json.loads(attrs["classes"]), attrs)
    expected = content_hash(attrs["features_key"], zip(labelling.sha256.tolist(), labelling.labels.tolist(),
                                                       labelling.splits.tolist()))
    if expected != attrs["content_hash"]:
        raise CacheError(f"{path}: rows do not match their recorded content hash (edited by hand?); "
                         "delete it and run 'make features'")
    return labelling


def positions_in(labelling: Labelling, features_sha256: np.ndarray, features_path: Path) -> np.ndarray:
    """(N,) int64 increasing: the row of each labelled photo in the features cache (both sorted by sha256)."""
    positions = np.searchsorted(features_sha256, labelling.sha256)
    if len(positions) and (positions.max() >= len(features_sha256) or
                           not np.array_equal(features_sha256[positions], labelling.sha256)):
        raise CacheError(f"{features_path.name} lacks photos that {labelling.path.name} labels; run 'make features'")
    return positions.astype(np.int64)


def read_table(path: Path, labelling_path: Path) -> FeatureTable:
    """Every photo a labelling lists, with its features as float32 (the mean of the cached views, as heads
    see them); a checksum failure is a CacheError."""
    labelling = read(labelling_path)
    with open_checked(path) as f:
        positions = positions_in(labelling, f["sha256"].asstr()[...], path)
        try:
            views = json.loads(f.attrs["views"]) if "views" in f.attrs else ["original"]
            rows = positions.tolist()
            features = np.mean([f[view_dataset(v)][rows].astype(np.float32) for v in views], axis=0) \
                if len(views) > 1 else f["features"][rows].astype(np.float32, copy=False)
        except OSError as error:  # fletcher32 mismatch: edited or damaged on disk
            raise CacheError(f"{path}: features fail their checksum ({error}); "
                             "delete it and run 'make features'") from None
        attrs = {k: attr_value(v) for k, v in f.attrs.items()}
    attrs = {**attrs, "classes": labelling.classes, "content_hash": labelling.attrs["content_hash"]}
    return FeatureTable(path=path, sha256=labelling.sha256, paths=labelling.paths, labels=labelling.labels,
                        splits=labelling.splits, features=features.reshape(len(rows), *features.shape[1:]),
                        attrs=attrs)
