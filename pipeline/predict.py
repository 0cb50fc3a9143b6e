"""Command `predict`: top-k labels for new photos with the last trained model.

Photos already in the feature cache (same bytes) reuse their cached features; others go through
the backbone the model was trained on, decoded and resized exactly as in the features stage.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline import trained
from pipeline.images import sniff
from pipeline.params import FeaturesParams, Params

log = logging.getLogger("pipeline.predict")


@dataclass
class Prediction:
    path: str
    labels: list[str] = field(default_factory=list)  # best first
    probabilities: list[float] = field(default_factory=list)
    cached: bool = False
    error: str | None = None


def expand(inputs) -> list[Path]:
    """Files as given, folders walked (sorted, hidden files skipped). A missing path stays in the
    list so that it is reported."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            for current, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [Path(current) / n for n in sorted(names) if not n.startswith(".")]
        else:
            files.append(item)
    return files


def run(params: Params, base: str | Path, inputs, top_k: int | None = None) -> list[Prediction]:
    base = Path(base)
    model = trained.load_current(params, base)
    top_k = min(top_k or params.predict.top_k, len(model.classes))
    files = expand(inputs)
    if not files:
        raise FileNotFoundError(f"no files under {', '.join(map(str, inputs))}")
    predictions = [Prediction(str(path)) for path in files]
    shas: list[str | None] = []
    for prediction, path in zip(predictions, files):
        try:
            data = path.read_bytes()
        except OSError as error:
            prediction.error = f"cannot read: {error.strerror or error}"
            shas.append(None)
            continue
        if sniff(data[:32]) is None:
            prediction.error = "not an image (unrecognised content)"
            shas.append(None)
            continue
        shas.append(hashlib.sha256(data).hexdigest())

    if model.rung == "finetune":  # the fine-tuned network reads the photos themselves
        _predict_finetuned(model, files, shas, predictions, top_k)
        return _logged(predictions)
    feature_shape = tuple(model.features_attrs["feature_shape"])
    features = np.zeros((len(files), *feature_shape), np.float32)
    have = np.zeros(len(files), bool)
    with h5py.File(model.features_file, "r") as f:
        index = {sha: i for i, sha in enumerate(f["sha256"].asstr()[...].tolist())}
        for i, sha in enumerate(shas):
            if sha in index:
                features[i] = f["features"][index[sha]]
                have[i] = predictions[i].cached = True
    todo = [i for i, sha in enumerate(shas) if sha is not None and not have[i]]
    if todo:
        _featurise(model, base, params, [files[i] for i in todo], todo, features, have, predictions)
    log.info("predict: %d photo(s), %d from the feature cache, %d through the backbone, %d unreadable",
             len(files), sum(p.cached for p in predictions), int(have.sum()) - sum(p.cached for p in predictions),
             sum(p.error is not None for p in predictions))
    if have.any():
        proba = model.model.predict_proba(features[have])
        for row, i in zip(proba, np.flatnonzero(have)):
            _fill(predictions[i], row, model.classes, top_k)
    return _logged(predictions)


def _fill(prediction: Prediction, probabilities: np.ndarray, classes: list[str], top_k: int) -> None:
    order = np.argsort(-probabilities)[:top_k]
    prediction.labels = [classes[j] for j in order]
    prediction.probabilities = [float(probabilities[j]) for j in order]


def _logged(predictions: list[Prediction]) -> list[Prediction]:
    for prediction in predictions:
        if prediction.error:
            log.warning("predict: skipped %s: %s", prediction.path, prediction.error)
    return predictions


def _predict_finetuned(model, files, shas, predictions, top_k: int) -> None:
    from pipeline.images import ImageError

    for i, (path, sha) in enumerate(zip(files, shas)):
        if sha is None:
            continue
        try:
            _fill(predictions[i], model.model.predict_files([path])[0], model.classes, top_k)
        except ImageError as error:
            predictions[i].error = str(error)


def features_params_of(attrs: dict) -> FeaturesParams:
    """The features settings a cache was made with, from its own attributes."""
    return FeaturesParams(**attrs["params"])


def _featurise(model, base, params, paths, positions, features, have, predictions) -> None:
    from pipeline import features as features_stage

    f = features_params_of(model.features_attrs)
    runner = features_stage.engine(f, base / params.paths.cache_dir)
    if runner.weights_sha256 != model.features_attrs["weights_sha256"]:
        raise RuntimeError(f"the backbone's weights differ from those of {model.features_file.name}; "
                           "run 'make features' and 'make train-head' again")
    results = features_stage.featurise_files(paths, runner, f)
    for position, (row, error) in zip(positions, results):
        if row is None:
            predictions[position].error = error
        else:
            features[position] = row
            have[position] = True


def format_predictions(predictions: list[Prediction], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([
            {"path": p.path, "cached": p.cached, "error": p.error,
             "predictions": [{"label": label, "probability": round(prob, 6)}
                             for label, prob in zip(p.labels, p.probabilities)]}
            for p in predictions], indent=2)
    k = max((len(p.labels) for p in predictions), default=0)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", *[f"{what}_{j + 1}" for j in range(k) for what in ("label", "p")], "error"])
        for p in predictions:
            cells = [v for label, prob in zip(p.labels, p.probabilities) for v in (label, f"{prob:.6f}")]
            writer.writerow([p.path, *cells, *[""] * (2 * k - len(cells)), p.error or ""])
        return buffer.getvalue().rstrip("\n")
    width = max([len(p.path) for p in predictions] + [4])
    lines = [f"{'path':<{width}}  prediction"]
    for p in predictions:
        text = ("  ".join(f"{label} {prob:.3f}" for label, prob in zip(p.labels, p.probabilities))
                if not p.error else f"skipped: {p.error}")
        lines.append(f"{p.path:<{width}}  {text}")
    return "\n".join(lines)
