"""Stage `evaluate`: metrics of the model that params choose, on the held-out test split.

The model is the one ``train.strategy`` chooses (``ladder``), for these params; evaluate trains
nothing (``make evaluate`` runs the stages before it first). It reads the test rows a batch at a
time and writes into ``reports/``:

- ``metrics.json``: numbers only (accuracy, balanced accuracy, macro F1, test photos, per class), for
  ``dvc metrics``;
- ``run.json``: what was evaluated: the rung, the model's key and params, the features'
  provenance, the classes and the confusion matrix;
- ``predictions.csv`` (path, actual, predicted: ``dvc plots``), ``misclassified.csv``,
  ``index.html`` with its plots, and a line in ``history.jsonl``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import ladder
from pipeline.fingerprint import atomic_write_text, canonical_json, describe_changes
from pipeline.params import SECTIONS, Params, as_dict
from pipeline.stages import features
from pipeline.training.contract import Trained, predict_split
from pipeline.use import report

STAGE = "evaluate"
log = logging.getLogger("pipeline.evaluate")


class EvaluationError(ValueError):
    """Nothing to evaluate on (an empty test split, ...)."""


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict  # metrics.json
    run: dict  # run.json
    metrics_path: Path
    table: str  # human-readable summary


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> tuple[dict, list]:
    """(metrics: numbers only, confusion matrix: rows true, columns predicted). ``y_true``: class numbers."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, \
        precision_recall_fscore_support

    labels = list(range(len(classes)))
    y_pred = np.argmax(proba, axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(f1)),
        "n_test": int(len(y_true)),
        "per_class": {c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
    }
    return metrics, confusion_matrix(y_true, y_pred, labels=labels).tolist()


def evaluate_model(trained: Trained) -> dict:
    """Everything about ``trained`` on the test split: metrics, confusion, and per-photo answers."""
    inputs = trained.inputs
    positions, labels, proba = predict_split(trained.classifier, inputs, "test")
    if not len(labels):
        raise EvaluationError("the test split is empty; set data.test_fraction > 0 or add a test/ folder")
    metrics, confusion = compute_metrics(labels, proba, trained.classes)
    return {"metrics": metrics, "confusion": confusion, "positions": positions, "labels": labels, "proba": proba}


def run(params: Params, base: str | Path = ".") -> EvaluateResult:
    base = Path(base)
    rung, advice = ladder.chosen(params, base)
    log.info("evaluate: %s", ladder.describe_choice(params, rung))
    trained = rung.load(params, base)
    for other in ladder.RUNGS.values():
        if other is not rung and other.find(params, base) is not None:
            log.info("evaluate: a %s model is trained for these params too; evaluate it with train.strategy: %s",
                     other.stage, other.name)
    reports = base / params.paths.reports_dir
    ingredients = {"train.strategy": params.train.strategy, "rung": rung.name, "model": trained.key,
                   "evaluate": as_dict(params.evaluate)}
    previous = _read_json(reports / "run.json")
    changes = describe_changes(previous.get("inputs") if previous else None, json.loads(canonical_json(ingredients)))
    log.info("evaluate: recomputing (%s)", ", ".join(changes) if changes else
             ("the same model and settings as the last evaluation" if previous else "first evaluation"))

    result = evaluate_model(trained)
    classes, metrics, inputs = trained.classes, result["metrics"], trained.inputs
    paths = np.array(inputs.paths(result["positions"]), dtype=object)
    y_true = np.array(classes)[result["labels"]]
    proba = result["proba"]
    model_meta = trained.meta
    run_info = {
        "inputs": ingredients,
        "rung": rung.name,
        "strategy": params.train.strategy,
        "advice": list(advice.reasons) if advice else None,
        "model": {"stage": rung.stage, "key": trained.key, "folder": str(trained.folder.relative_to(base))
                  if trained.folder.is_relative_to(base) else str(trained.folder),
                  "params": model_meta["params"], "fit_seconds": trained.classifier.history.get("fit_seconds")},
        "features": {k: inputs.attrs[k] for k in ("key", "backbone", "weights", "weights_sha256", "layer",
                                                  "input_size", "resize", "dtype")},
        "data": {"root": params.data.root, "splits": as_dict(params.data)},
        "classes": classes,
        "confusion_matrix": result["confusion"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    metrics_path = atomic_write_text(reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(reports / "run.json", json.dumps(run_info, indent=2) + "\n")
    wrong = misclassified(paths, y_true, proba, classes)
    atomic_write_text(reports / "misclassified.csv", _misclassified_csv(wrong, proba, classes, params.evaluate.top_k))
    predicted = np.array(classes)[np.argmax(proba, axis=1)]
    atomic_write_text(reports / "predictions.csv", _csv(["path", "actual", "predicted"],
                                                        zip(paths, y_true, predicted)))
    summary = {**metrics, "classes": classes, "confusion_matrix": result["confusion"], "rung": rung.name,
               "model": rung.stage, "model_key": trained.key, "model_params": model_meta["params"],
               "backbone": inputs.attrs["backbone"], "layer": inputs.attrs["layer"],
               "features_key": inputs.attrs["key"]}
    previous_entry, entry = report.append_history(reports / "history.jsonl", summary)
    page = report.write(
        reports, base / params.data.root, summary, wrong, trained.classifier.history,
        report.read_history(reports / "history.jsonl"),
        provenance={**run_info["features"], "model": run_info["model"], "data_root": params.data.root,
                    "params": {name: as_dict(getattr(params, name)) for name in SECTIONS}},
        counts=_counts(trained), skipped=_read_skipped(features.skipped_csv(params, base)),
        quality=report.data_quality_section(reports, base / params.data.root, _content_hash(params, base),
                                            params.inspect.thumbnails))
    text = format_table(metrics, classes, result["confusion"]) + "\n\n" + report.diff(previous_entry, entry)
    log.info("evaluate: accuracy %.4f, balanced accuracy %.4f on %d test images; wrote %s and %s",
             metrics["accuracy"], metrics["balanced_accuracy"], metrics["n_test"], metrics_path, page)
    return EvaluateResult(metrics, run_info, metrics_path, text)


def _content_hash(params: Params, base: Path) -> str | None:
    """The features stage's cache content, which 'make inspect' findings must be from to be shown."""
    from pipeline.store import table

    try:
        return table.read_attrs(features.cache_file(params, base))["content_hash"]
    except (table.CacheError, KeyError):
        return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def misclassified(paths, y_true, proba, classes) -> list[dict]:
    """Wrong test predictions, most confident mistakes first."""
    predicted = np.argmax(proba, axis=1)
    wrong = [i for i in range(len(y_true)) if classes[predicted[i]] != y_true[i]]
    wrong.sort(key=lambda i: -proba[i, predicted[i]])
    return [{"index": i, "path": str(paths[i]), "true": str(y_true[i]), "predicted": classes[predicted[i]],
             "p_predicted": float(proba[i, predicted[i]]), "p_true": float(proba[i, classes.index(y_true[i])])}
            for i in wrong]


def _csv(header, rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _misclassified_csv(wrong: list[dict], proba, classes, top_k: int) -> str:
    k = min(top_k, len(classes))
    header = ["path", "true", "predicted", "p_predicted", "p_true"] + \
        [f"top{j + 1}_{what}" for j in range(k) for what in ("label", "p")]
    rows = []
    for item in wrong:
        row = proba[item["index"]]
        top = np.argsort(-row)[:k]
        rows.append([item["path"], item["true"], item["predicted"], f"{item['p_predicted']:.4f}",
                     f"{item['p_true']:.4f}"] + [v for j in top for v in (classes[j], f"{row[j]:.4f}")])
    return _csv(header, rows)


def _counts(trained: Trained) -> dict:
    """{class: {train, val, test: photos}}."""
    classes = trained.classes
    by_split = {split: np.bincount(trained.inputs.rows(split).labels, minlength=len(classes))
                for split in ("train", "val", "test")}
    return {c: {split: int(by_split[split][i]) for split in by_split} for i, c in enumerate(classes)}


def _read_skipped(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def format_table(metrics: dict, classes: list[str], confusion: list) -> str:
    width = max(12, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for c in classes:
        m = metrics["per_class"][c]
        lines.append(f"{c:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    lines.append("")
    lines.append(f"accuracy {metrics['accuracy']:.4f}   balanced accuracy {metrics['balanced_accuracy']:.4f}   "
                 f"test images {metrics['n_test']}")
    if len(classes) <= 20:
        lines.append("confusion matrix (rows: true, columns: predicted)")
        lines.append(" " * width + "  " + " ".join(f"{c[:8]:>8}" for c in classes))
        for c, row in zip(classes, confusion):
            lines.append(f"{c:<{width}}  " + " ".join(f"{v:8d}" for v in row))
    return "\n".join(lines)
