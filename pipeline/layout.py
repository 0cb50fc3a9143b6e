"""Where every cache lives, and the key that names the features caches.

A features cache is one HDF5 file per setting of everything that changes the stored activations
(``key_params``): ``cache/features/<backbone>-<key>.h5`` for the pooled features,
``cache/top_features/<backbone>-<key>.h5`` for the activations at train-top's cut point. Beside a
pooled cache, its near-duplicate calibration; under ``cache/file_index/``, the stat index of each
data root. Stages and commands find their inputs here, never in another stage's module.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from pipeline.backbones.keras_models import weights_fingerprint
from pipeline.backbones.registry import BACKBONES
from pipeline.data import corrections, generic
from pipeline.data.decode import DECODE_METHODS
from pipeline.fingerprint import file_sha256, stage_key
from pipeline.params import FeaturesParams, Params, as_dict, key_fields

STAGE = "features"
FOLDER = "features"  # cache/features/: the cache at features.layer
TOP_FOLDER = "top_features"  # cache/top_features/: caches at train_top.cut_point
# Bump when the meaning of stored features changes (decoding, layout), so old caches are not reused.
# 2: labels and splits left the features file for a labelling file keyed by the data params.
VERSION = 2
# Bump when the same data params and files would label or split the photos differently.
LABELS_VERSION = 1


def input_size(f: FeaturesParams) -> int:
    return f.image_size or BACKBONES[f.backbone].input_size


def key_params(f: FeaturesParams) -> dict:
    """Everything that changes the stored activations, and nothing else."""
    spec = BACKBONES[f.backbone]
    values = key_fields(f)
    values["weights"] = weights_fingerprint(spec, f.weights)
    values["image_size"] = input_size(f)
    values["preprocessing"] = spec.preprocessing
    values["decode"] = DECODE_METHODS[f.decode]
    if f.precision == "int8":
        values["int8_calibration"] = generic.NAME
    return values


def top_settings(params: Params) -> FeaturesParams:
    """The features settings of train-top's input: activations at the cut point, stored as float16, of
    the photo as it is (a mirrored view's spatial map is not the same map mirrored)."""
    return dataclasses.replace(params.features, layer=params.train_top.cut_point, dtype="float16",
                               views=("original",))


def cache_key(f: FeaturesParams) -> str:
    return stage_key(STAGE, VERSION, key_params(f))


def cache_file(params: Params, base: Path, f: FeaturesParams | None = None, folder: str = FOLDER) -> Path:
    """The cache file of features settings ``f`` (default: ``params.features``)."""
    f = f or params.features
    return base / params.paths.cache_dir / folder / f"{f.backbone}-{cache_key(f)[:16]}.h5"


def labels_key(params: Params, base: Path) -> str:
    """The key of a labelling: every data param that changes a photo's label or split, the content of
    the split CSV and the decisions of the corrections file they name, and for near-duplicate grouping
    the features it groups by. Not the photos themselves: the features stage labels what it finds."""
    data = {k: v for k, v in as_dict(params.data).items() if k != "max_bad_fraction"}
    split_csv = Path(base) / params.data.split_csv if params.data.split_csv else None
    decided = corrections.decided(corrections.read(corrections.file_of(params.data, base)))
    files = {"split_csv": file_sha256(split_csv) if split_csv is not None and split_csv.is_file() else None,
             "corrections": sorted((d.path, d.action, d.label) for d in decided.values())}
    if params.data.group_near_duplicates:
        files["grouped_by"] = cache_key(params.features)
    return stage_key("labels", LABELS_VERSION, data, files)


def labels_file(features_file: Path, key: str) -> Path:
    """The labelling ``key`` of the photos of ``features_file``, in a folder beside it."""
    return features_file.with_suffix(".labels") / f"{key[:16]}.h5"


def top_cache_file(params: Params, base: Path) -> Path:
    return cache_file(params, base, top_settings(params), TOP_FOLDER)


def skipped_csv(params: Params, base: Path) -> Path:
    return base / params.paths.reports_dir / "skipped.csv"


def file_index_path(params: Params, base: Path) -> Path:
    """Where the stat index of one data root lives (one per root: roots can be switched freely)."""
    root = str((base / params.data.root).resolve())
    return base / params.paths.cache_dir / "file_index" / f"{hashlib.sha256(root.encode()).hexdigest()[:16]}.json"


def weights_dir(params: Params, base: Path) -> Path:
    """Where converted backbones live: ``paths.weights_dir``, else the machine's cache
    (``$XDG_CACHE_HOME/photohead/weights``, by default ``~/.cache/photohead/weights``), shared by projects."""
    if params.paths.weights_dir:
        return Path(base) / Path(params.paths.weights_dir).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home) / "photohead" / "weights"


def calibration_file(out: Path) -> Path:
    return out.with_name(out.stem + ".near_duplicates.json")
