"""Which model was trained last, so that predict and export use it.

``cache/model.json`` names the rung (``head``, ``top`` or ``finetune``), the folder of the
trained model, and the feature cache it was trained on (whose rows are its inputs). Each training
stage records itself here when it finishes or finds its model in the cache.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import feature_store
from pipeline.feature_store import CacheError
from pipeline.fingerprint import atomic_write_text
from pipeline.params import Params


@dataclass
class TrainedModel:
    rung: str  # "head", "top" or "finetune"
    path: Path  # the model's folder
    key: str
    features_file: Path  # the cache the model was trained on
    features_attrs: dict
    model: object  # has .classes, .predict_proba(features), .as_keras(feature_shape)

    @property
    def classes(self) -> list[str]:
        return list(self.model.classes)


def pointer_file(params: Params, base: Path) -> Path:
    return base / params.paths.cache_dir / "model.json"


def record(params: Params, base: Path, rung: str, path: Path, key: str, features_file: Path) -> None:
    atomic_write_text(pointer_file(params, base), json.dumps({
        "rung": rung, "path": str(path.relative_to(base / params.paths.cache_dir)), "key": key,
        "features_file": str(features_file.relative_to(base / params.paths.cache_dir)),
    }, indent=2))


RUNGS = ("head", "top", "finetune")


def last_rung(params: Params, base: Path) -> str:
    """The rung trained last ("head" when none was)."""
    try:
        return json.loads(pointer_file(params, base).read_text())["rung"]
    except (OSError, ValueError, KeyError):
        return "head"


def bring_up_to_date(params: Params, base: Path, rung: str | None = None) -> TrainedModel:
    """Train (or find in the cache) the model of ``rung`` (default: the last trained) for these params."""
    from pipeline import finetune, train_head, train_top

    rung = rung or last_rung(params, base)
    {"top": train_top.run, "finetune": finetune.run}.get(rung, train_head.run)(params, base)
    return load_current(params, base)


def load_current(params: Params, base: Path) -> TrainedModel:
    """The last trained model; a clear error when there is none."""
    from pipeline import train_head

    cache = base / params.paths.cache_dir
    pointer = pointer_file(params, base)
    try:
        info = json.loads(pointer.read_text())
    except FileNotFoundError:
        raise CacheError(f"no trained model in {cache}; run 'make train-head' first") from None
    except ValueError:
        raise CacheError(f"{pointer} is damaged; run 'make train-head' again") from None
    path, features_file = cache / info["path"], cache / info["features_file"]
    if not (path / "head.json").is_file():
        raise CacheError(f"the last trained model {path} is gone; run 'make train-head' again")
    attrs = feature_store.read_attrs(features_file)
    return TrainedModel(info["rung"], path, info["key"], features_file, attrs, train_head.load(path))
