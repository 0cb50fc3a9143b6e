"""The HDF5 feature cache: one row per distinct image, keyed by the sha256 of its bytes.

Layout of ``cache/features/<key>.h5`` (documented in README):

    /features  (N, D) or (N, H, W, C)  float32 | float16   chunked, fletcher32 checksums
    /sha256    (N,)  ascii, 64 chars     row key, sorted
    /bad_sha256, /bad_reason, /bad_decoder   photos the decoder refused, and its VERSION: not retried by
                                         the same decoder, retried by another
    attrs: key, stage, stage_version, params (JSON), backbone, weights, weights_sha256, layer,
           input_size, resize, decode, preprocessing, dtype, feature_shape, n_rows,
           content_hash, library_versions (JSON), created

What the backbone saw, and nothing the data params decide: each photo's path, label and split
under a setting of the data params is a labelling file beside it (``store.labels``). A row stays
while its photo is under data.root, whichever labelling lists it. Readers only need h5py and numpy. A file is written whole to a temporary name and moved into
place, so a reader sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.data.corrections import UNLABELLED  # photos cached for labelling: in no split downstream
from pipeline.data.decode import VERSION as DECODER_VERSION
from pipeline.errors import PipelineError
from pipeline.fingerprint import canonical_json

STRING = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20


def view_dataset(view: str) -> str:
    """Where a view's activations live: ``/features`` for the photo as it is, ``/features_<view>`` beside it."""
    return "features" if view == "original" else f"features_{view}"


def stored_views(attrs: dict) -> list[str]:
    return list(attrs.get("views", ["original"]))


class CacheError(PipelineError, RuntimeError):
    """A cache that is missing, damaged or not what it claims; the message says what to run."""


@dataclass
class FeatureTable:
    """The labelled rows of a feature cache, held in memory (features as a numpy array). For small caches
    and whole-table analyses only: training and evaluation read caches in batches (``store.batches``)."""

    path: Path
    sha256: np.ndarray  # (N,) str
    paths: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) str
    splits: np.ndarray  # (N,) str
    features: np.ndarray  # (N, ...) float32
    attrs: dict


def content_hash(key: str, rows) -> str:
    """What downstream stages depend on: the feature key and each labelled row's (sha256, label, split).
    Rows of split ``unlabelled`` are left out: adding photos to label retrains nothing."""
    return hashlib.sha256(canonical_json([key, sorted(r for r in rows if r[2] != UNLABELLED)]).encode()).hexdigest()


def rows_hash(key: str, shas) -> str:
    """A features file's own content: its key and the sha256 of every row."""
    return hashlib.sha256(canonical_json([key, sorted(shas)]).encode()).hexdigest()


def open_checked(path: Path, key: str | None = None) -> h5py.File:
    """Open a cache file read-only, refusing one that is damaged or made with another key."""
    if not path.is_file():
        raise CacheError(f"no cached features at {path}; run 'make features' first")
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise CacheError(f"{path} is damaged ({error}); delete it and run 'make features'") from None
    try:
        n = int(f.attrs["n_rows"])
        if key is not None and f.attrs["key"] != key:
            raise CacheError(f"{path} was made with key {f.attrs['key'][:12]}, not {key[:12]}; "
                             "delete it and run 'make features'")
        views = json.loads(f.attrs["views"]) if "views" in f.attrs else ["original"]
        for name in (*(view_dataset(v) for v in views), "sha256"):
            if f[name].shape[0] != n:
                raise CacheError(f"{path}: /{name} has {f[name].shape[0]} rows, attrs say {n}; "
                                 "delete it and run 'make features'")
    except CacheError:
        f.close()
        raise
    except (KeyError, OSError, ValueError) as error:
        f.close()
        raise CacheError(f"{path} is incomplete ({error}); delete it and run 'make features'") from None
    return f


def read_index(path: Path, key: str | None = None):
    """([sha256 of every row], {bad sha256: reason}, attrs) without reading features.

    Raises CacheError when the rows do not match the content hash recorded when it was written."""
    with open_checked(path, key) as f:
        shas = f["sha256"].asstr()[...].tolist()
        bad = read_bad(f)
        attrs = {k: attr_value(v) for k, v in f.attrs.items()}
    if rows_hash(attrs["key"], shas) != attrs["content_hash"]:
        raise CacheError(f"{path}: rows do not match their recorded content hash (edited by hand?); "
                         "delete it and run 'make features'")
    return shas, bad, attrs


def read_bad(f: h5py.File) -> dict[str, str]:
    """{sha256: reason} of the photos this version of the decoder refused (a mark of another is retried)."""
    versions = f["bad_decoder"][...] if "bad_decoder" in f else np.zeros(f["bad_sha256"].shape[0], np.int32)
    marks = zip(f["bad_sha256"].asstr()[...].tolist(), f["bad_reason"].asstr()[...].tolist(), versions.tolist())
    return {sha: reason for sha, reason, version in marks if version == DECODER_VERSION}


def write_bad(f: h5py.File, bad) -> None:
    """``bad``: (sha256, reason) of photos the current decoder refused."""
    f.create_dataset("bad_sha256", data=np.array([b[0] for b in bad], dtype="S64").reshape(len(bad)))
    f.create_dataset("bad_reason", data=np.array([b[1] for b in bad], dtype=object).reshape(len(bad)), dtype=STRING)
    f.create_dataset("bad_decoder", data=np.full(len(bad), DECODER_VERSION, np.int32))


def verify_features(path: Path) -> None:
    """Read every chunk of every view's activations so that their fletcher32 checksums are checked;
    CacheError if one fails."""
    with open_checked(path) as f:
        views = json.loads(f.attrs["views"]) if "views" in f.attrs else ["original"]
        for view in views:
            data = f[view_dataset(view)]
            step = data.chunks[0] if data.chunks else max(1, data.shape[0])
            try:
                for start in range(0, data.shape[0], step):
                    data[start:start + step]
            except OSError as error:
                raise CacheError(f"{path}: features fail their checksum ({error}); "
                                 "delete it and run 'make features'") from None


def read_attrs(path: Path, key: str | None = None) -> dict:
    with open_checked(path, key) as f:
        return {k: attr_value(v) for k, v in f.attrs.items()}


def attr_value(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def chunk_rows(row_shape: tuple, dtype) -> int:
    """Rows per HDF5 chunk: about 1 MiB, at least 1."""
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    return max(1, _CHUNK_BYTES // max(row_bytes, 1))


def write_table(path: Path, shas: list[str], row_features, row_shape: tuple, dtype: str,
                attrs: dict, bad: list[tuple[str, str]] = (), columns: dict | None = None) -> None:
    """Write a complete cache file at ``path`` (a temporary name; the caller moves it into place).

    ``shas``: the sha256 of each row, sorted. ``row_features(start, stop)`` returns
    the (stop - start, *row_shape) features of those rows, so memory stays at one chunk; with more
    ``views`` than the original, ``row_features(start, stop, view)`` those of each view.
    ``columns``: other small per-row datasets ({name: array with one entry per row}).
    """
    n = len(shas)
    chunk = chunk_rows(row_shape, dtype)
    spatial = len(row_shape) > 1
    views = list(attrs.get("views", ["original"]))
    with h5py.File(path, "w") as f:
        for view in views:
            data = f.create_dataset(
                view_dataset(view), shape=(n, *row_shape), dtype=dtype,
                chunks=(max(1, min(chunk, n)), *row_shape) if n else None, fletcher32=bool(n),
                compression="gzip" if spatial and n else None, compression_opts=4 if spatial and n else None,
                shuffle=spatial and bool(n),
            )
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                data[start:stop] = row_features(start, stop) if view == "original" else row_features(start, stop, view)
        f.create_dataset("sha256", data=np.array(shas, dtype="S64").reshape(n))
        write_bad(f, bad)
        for name, values in (columns or {}).items():
            f.create_dataset(name, data=values)
        for name, value in attrs.items():
            f.attrs[name] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        f.attrs["n_rows"] = n
        f.attrs["content_hash"] = rows_hash(attrs["key"], shas)
