"""Work in progress of the features stage: part files, committed every ``features.commit_every`` images.

A run that is interrupted (Ctrl-C, SIGKILL, a full disk) keeps every committed part; the next run
reads them, featurises only what is missing, and merges everything into the cache file. Layout of
``<cache>.parts/part-NNNNNN.h5``:

    /sha256      (n,)  ascii, 64 chars    the rows of this part
    /features, /features_<view>           the views this part computed, (n, *feature_shape) each
    /bad_sha256, /bad_reason, /bad_decoder   images the decoder (of that VERSION) refused
    attrs: key, weights_sha256, feature_shape

A part is written under a temporary name and moved into place, so it is whole or absent. A part
made with another key (another backbone, cut point, preprocessing) is removed, never mixed in.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.fingerprint import os_reason, temp_path_for
from pipeline.store.table import CacheError, read_bad, write_bad

log = logging.getLogger("pipeline.features")

ROW_DATASETS = ("sha256", "bad_sha256", "bad_reason", "bad_decoder")  # not per-row columns of the features


@dataclass
class Parts:
    """The part files of an unfinished run. Their index (which sha256 is where) is read at once; their
    activations only when merged, a whole part at a time, with the last few parts read kept in memory
    (``CACHE_BYTES``): memory and open files stay bounded however many parts there are."""

    files: list = field(default_factory=list)
    rows: dict = field(default_factory=dict)  # (sha256, dataset) -> (part number, row in that part)
    bad: dict = field(default_factory=dict)  # sha256 -> reason
    meta: dict = field(default_factory=dict)  # weights_sha256 and feature_shape of the run that wrote them
    _loaded: OrderedDict = field(default_factory=OrderedDict)  # (part, dataset) -> array, least recent first

    CACHE_BYTES = 256 << 20

    def row(self, sha256: str, column: str = "features"):
        part, index = self.rows[(sha256, column)]
        return self._array(part, column)[index]

    def _array(self, part: int, column: str) -> np.ndarray:
        key = (part, column)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        with h5py.File(self.files[part], "r") as f:
            array = f[column][...]
        self._loaded[key] = array
        while len(self._loaded) > 1 and sum(a.nbytes for a in self._loaded.values()) > self.CACHE_BYTES:
            self._loaded.popitem(last=False)
        return array

    def has(self, sha256: str, column: str = "features") -> bool:
        return (sha256, column) in self.rows

    def shas(self, column: str = "features") -> set[str]:
        return {sha for sha, name in self.rows if name == column}

    def close(self) -> None:
        self._loaded.clear()

    def remove(self) -> None:
        self.close()
        for file in self.files:
            file.unlink(missing_ok=True)
        folder = self.files[0].parent if self.files else None
        if folder is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def read(folder: Path, key: str) -> Parts:
    """Every complete part in ``folder`` made with ``key``; others are removed with a warning."""
    parts = Parts()
    if not folder.is_dir():
        return parts
    for file in sorted(folder.glob("part-*.h5")):
        try:
            with h5py.File(file, "r") as f:
                if f.attrs["key"] != key:
                    raise ValueError(f"made with key {str(f.attrs['key'])[:12]}, not {key[:12]}")
                shas = f["sha256"].asstr()[...].tolist()
                columns = [name for name in f if name not in ROW_DATASETS]
                if not columns or any(len(f[name]) != len(shas) for name in columns):
                    raise ValueError("its columns do not have one row per sha256")
                bad = read_bad(f)
                meta = {"weights_sha256": str(f.attrs["weights_sha256"]),
                        "feature_shape": tuple(int(d) for d in f.attrs["feature_shape"])}
        except (OSError, KeyError, ValueError) as error:
            log.warning("features: ignoring part %s (%s); its images are featurised again", file.name, error)
            file.unlink(missing_ok=True)
            continue
        number = len(parts.files)
        parts.meta = meta
        parts.files.append(file)
        parts.rows.update({(sha, name): (number, i) for name in columns for i, sha in enumerate(shas)})
        parts.bad.update(bad)
    return parts


def write(folder: Path, key: str, meta: dict, shas: list[str], columns: dict[str, list],
          bad: list[tuple[str, str]]) -> Path:
    """Commit one part: ``columns`` maps a dataset name (``features``, ``features_hflip``) to one value per
    row of ``shas``."""
    folder.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.stem.split("-")[1]) for p in folder.glob("part-*.h5")), default=0)
    final = folder / f"part-{number:06d}.h5"
    tmp = temp_path_for(final)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["key"] = key
            f.attrs["weights_sha256"] = meta["weights_sha256"]
            f.attrs["feature_shape"] = np.array(meta["feature_shape"], dtype=np.int64)
            f.create_dataset("sha256", data=np.array(shas, dtype="S64").reshape(len(shas)))
            for name, values in columns.items():
                f.create_dataset(name, data=np.stack(values) if values else
                                 np.zeros((0, *meta["feature_shape"]), np.float32))
            write_bad(f, bad)
        os.replace(tmp, final)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"could not write {final} ({os_reason(error)}); is the disk full? Parts written before are kept: "
                         "free some space and run 'make features' again") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final
