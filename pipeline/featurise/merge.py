"""A features cache written anew from the old file and this run's parts, one chunk at a time, with its
provenance; and the old file read back, set aside when it is damaged."""
from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from pipeline import layout, runtime
from pipeline.backbones.registry import BACKBONES
from pipeline.data.decode import DECODE_METHODS
from pipeline.fingerprint import os_reason, temp_path_for
from pipeline.params import FeaturesParams, as_dict
from pipeline.store import table
from pipeline.store.table import CacheError

log = logging.getLogger("pipeline.features")


@dataclass(frozen=True)
class Existing:
    """What the current cache file holds: its rows' sha256 (sorted), the photos it could not decode, attrs."""

    shas: list[str] = field(default_factory=list)
    bad: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    @property
    def views(self) -> list[str]:
        return table.stored_views(self.attrs) if self.shas else []


def read_existing(out: Path, key: str, stage: str) -> Existing:
    """The current cache file, features left on disk. A damaged file, or one whose rows do not match
    their content hash, is set aside, not used."""
    if not out.exists():
        return Existing()
    try:
        shas, bad, attrs = table.read_index(out, key)
        table.verify_features(out)
    except CacheError as error:
        damaged = out.with_name(out.name + ".damaged")
        os.replace(out, damaged)
        log.warning("%s: %s; moved it to %s and rebuilding", stage, error, damaged.name)
        return Existing()
    return Existing(shas, bad, attrs)


class Sources:
    """The features of rows by sha256, from this run's part files or the old cache file."""

    def __init__(self, out: Path, old: Existing, parts, feature_shape):
        self.parts = parts
        self.shape = tuple(feature_shape)
        self.old = h5py.File(out, "r") if old.shas else None
        self.old_index = {sha: i for i, sha in enumerate(old.shas)}  # the old file's rows are sorted by sha

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


def merge(out: Path, shas: list[str], feature_shape, dtype, attrs, bad, sources: Sources) -> None:
    """Write the new cache file from the old file and the parts, one chunk at a time."""
    tmp = temp_path_for(out)
    try:
        table.write_table(tmp, shas, lambda start, stop, view="original": sources.get(
            shas[start:stop], dtype, view), feature_shape, dtype, attrs, bad)
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


def provenance(f: FeaturesParams, key: str, meta: dict, stage: str) -> dict:
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
        "library_versions": {name: _version(name) for name in ("tensorflow-cpu", "keras", "h5py", "numpy", "pillow",
                                                               "ai-edge-litert")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""
