"""Command `predict`: top-k labels for new photos, with the model params choose (``train.strategy``).

Photos go through the same runtime as the features stage (``pipeline.runtime``), decoded whole as
an app decodes them (``features.decode: reduced`` shrinks large JPEGs for the cache only), then the
backbone up to the layer the model reads (nothing more for the fine-tuned network). A photo already
in the model's input cache (same bytes) reuses its cached row where that row saw the whole photo.
Photos are handled ``BATCH`` at a time, so memory does not grow with their number.
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

import numpy as np

from pipeline import runtime
from pipeline.data.decode import open_image, reduces, sniff
from pipeline.errors import PipelineError
from pipeline.params import FeaturesParams
from pipeline.stages import ladder
from pipeline.store.table import CacheError

log = logging.getLogger("pipeline.predict")
BATCH = 256  # photos per step


class PredictError(PipelineError, FileNotFoundError):
    """Nothing to predict on."""


@dataclass
class Prediction:
    path: str
    labels: list[str] = field(default_factory=list)  # best first
    probabilities: list[float] = field(default_factory=list)  # calibrated
    answer: str | None = None  # the top label, or reject.label when the photo is unlike the training photos
    score: float | None = None  # rejection score: higher is less like the training photos
    threshold: float | None = None  # the photo is answered reject.label when score > threshold
    cached: bool = False
    error: str | None = None
    row: np.ndarray | None = field(default=None, repr=False)  # the model's input row, when asked to keep it


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


def run(project, inputs, top_k: int | None = None) -> list[Prediction]:
    """Top-k labels for every photo under ``inputs`` (files or folders) with the model params choose."""
    with ladder.chosen(project).load(project) as trained:
        log.info("predict: %s", ladder.describe_choice(project))
        return answer_files(project, trained, inputs, top_k)


def answer_files(project, trained, inputs, top_k: int | None = None, keep_rows: bool = False,
                 runner=None, cached: dict[str, int] | None = None) -> list[Prediction]:
    """Predictions of a loaded model for files or folders. A process that answers many calls (the app)
    passes the backbone ``runner`` (``open_runner``) and the inputs' ``cached`` rows (``position_of``) it
    keeps; ``keep_rows``: each prediction keeps its input row (``Prediction.row``)."""
    top_k = min(top_k or project.params.predict.top_k, len(trained.classes))
    files = expand(inputs)
    if not files:
        raise PredictError(f"no files under {', '.join(map(str, inputs))}; name photos or folders of photos")
    predictions = [Prediction(str(path)) for path in files]
    shas = [_identify(path, prediction) for path, prediction in zip(files, predictions)]
    cached = trained.inputs.position_of() if cached is None else cached
    f = features_params_of(trained.inputs.attrs)
    draft = runtime.draft_size(f)
    for start in range(0, len(files), BATCH):
        chunk = range(start, min(len(files), start + BATCH))
        rows: dict[int, np.ndarray] = {}
        hits = [i for i in chunk if shas[i] in cached and not _reduced_in_cache(files[i], draft)]
        if hits:
            for i, row in zip(hits, trained.inputs.read(np.array([cached[shas[i]] for i in hits]))):
                rows[i] = row
                predictions[i].cached = True
        todo = [i for i in chunk if shas[i] is not None and i not in rows]
        if todo:
            runner = runner or open_runner(trained, project.weights_dir)
            views = trained.inputs.views
            rows_of = runtime.featurise_files([files[i] for i in todo], runner, f, views, whole=True)
            for i, (row, error) in zip(todo, rows_of):
                if row is None:
                    predictions[i].error = error
                else:
                    rows[i] = row.mean(axis=0)  # the mean of the views, as the classifier was trained
        if rows:
            order = sorted(rows)
            proba, scores = trained.classifier.answer(np.stack([rows[i] for i in order]).astype(np.float32))
            for i, row, score in zip(order, proba, scores):
                _fill(predictions[i], row, trained.classes, top_k, float(score), trained.guard)
                if keep_rows:
                    predictions[i].row = rows[i]
    n_cached = sum(p.cached for p in predictions)
    n_done = sum(bool(p.labels) for p in predictions)
    log.info("predict: %d photo(s), %d from the cache, %d through the %s, %d unreadable", len(files), n_cached,
             n_done - n_cached, "backbone" if trained.inputs.layer != runtime.IMAGE else "fine-tuned network",
             sum(p.error is not None for p in predictions))
    return _logged(predictions)


def _identify(path: Path, prediction: Prediction) -> str | None:
    """The sha256 of a photo's bytes, or None with the reason recorded."""
    try:
        data = path.read_bytes()
    except OSError as error:
        prediction.error = f"cannot read: {error.strerror or error}"
        return None
    if sniff(data[:32]) is None:
        prediction.error = "not an image (unrecognised content)"
        return None
    return hashlib.sha256(data).hexdigest()


def _reduced_in_cache(path: Path, draft: int) -> bool:
    """Whether the features stage decoded this photo at a reduced DCT scale (so its cached row is not
    what an app's whole decode gives)."""
    if not draft:
        return False
    try:
        with open_image(path) as image:
            return reduces(image, draft)
    except (OSError, ValueError):
        return False  # unreadable now: the cached row is all there is


def open_runner(trained, weights_dir: Path):
    """What turns a new photo into the model's input: the backbone up to the inputs' layer."""
    attrs = trained.inputs.attrs
    runner = runtime.open_backbone(features_params_of(attrs), weights_dir, trained.inputs.layer)
    if trained.inputs.layer != runtime.IMAGE and runner.weights_sha256 != attrs["weights_sha256"]:
        raise CacheError(f"the backbone's weights differ from those of {trained.inputs.path.name}; "
                           f"run 'make features' and 'make {trained.rung.stage}' again")
    return runner


def _fill(prediction: Prediction, probabilities: np.ndarray, classes: list[str], top_k: int, score: float,
          guard) -> None:
    order = np.argsort(-probabilities)[:top_k]
    prediction.labels = [classes[j] for j in order]
    prediction.probabilities = [float(probabilities[j]) for j in order]
    prediction.score, prediction.threshold = score, guard.threshold
    prediction.answer = prediction.labels[0] if guard.accepted(np.array([score]))[0] else guard.label


def _logged(predictions: list[Prediction]) -> list[Prediction]:
    for prediction in predictions:
        if prediction.error:
            log.warning("predict: skipped %s: %s", prediction.path, prediction.error)
    return predictions


def features_params_of(attrs: dict) -> FeaturesParams:
    """The features settings a cache was made with, from its own attributes."""
    return FeaturesParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in attrs["params"].items()})


def format_predictions(predictions: list[Prediction], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([as_json(p) for p in predictions], indent=2)
    k = max((len(p.labels) for p in predictions), default=0)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "answer", "score", "threshold",
                         *[f"{what}_{j + 1}" for j in range(k) for what in ("label", "p")], "error"])
        for p in predictions:
            cells = [v for label, prob in zip(p.labels, p.probabilities) for v in (label, f"{prob:.6f}")]
            guard = [p.answer, f"{p.score:.6f}", f"{p.threshold:.6f}"] if p.answer else ["", "", ""]
            writer.writerow([p.path, *guard, *cells, *[""] * (2 * k - len(cells)), p.error or ""])
        return buffer.getvalue().rstrip("\n")
    width = max([len(p.path) for p in predictions] + [4])
    lines = [f"{'path':<{width}}  prediction"]
    for p in predictions:
        if p.error:
            text = f"skipped: {p.error}"
        else:
            text = "  ".join(f"{label} {prob:.3f}" for label, prob in zip(p.labels, p.probabilities))
            if p.answer != p.labels[0]:  # rejected: say so first, the closest labels after
                text = f"{p.answer} (score {p.score:.3f} > {p.threshold:.3f}; closest: {text})"
        lines.append(f"{p.path:<{width}}  {text}")
    return "\n".join(lines)


def as_json(p: Prediction) -> dict:
    """One photo's answer as ``predict --format json`` (and the app's API) gives it."""
    return {"path": p.path, "answer": p.answer, "score": None if p.score is None else round(p.score, 6),
            "threshold": None if p.threshold is None else round(p.threshold, 6),
            "accepted": None if p.answer is None else p.answer == p.labels[0], "cached": p.cached, "error": p.error,
            "predictions": [{"label": label, "probability": round(prob, 6)}
                            for label, prob in zip(p.labels, p.probabilities)]}
