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

from pipeline.errors import PipelineError
from pipeline.fingerprint import atomic_write_text, canonical_json, describe_changes
from pipeline.params import SECTIONS, as_dict
from pipeline.stages import ladder, report
from pipeline.stages.contract import Trained, answer_split
from pipeline.training import guard as guard_mod

STAGE = "evaluate"
log = logging.getLogger("pipeline.evaluate")


class EvaluationError(PipelineError, ValueError):
    """Nothing to evaluate on (an empty test split, ...)."""


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict  # metrics.json
    run: dict  # run.json
    metrics_path: Path
    table: str  # human-readable summary


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> tuple[dict, list]:
    """(metrics: numbers only, confusion matrix: rows true, columns predicted). ``y_true``: class numbers."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

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


def rejection_metrics(labels: np.ndarray, proba: np.ndarray, scores: np.ndarray, guard) -> dict:
    """What the rejection does to the test photos, all of them of known classes: the share rejected, the
    accuracy on those accepted, and the AUROC of the score for telling the photos the model gets wrong
    from those it gets right (unknown photos are measured by bench/open_set.py)."""
    accepted = guard.accepted(scores)
    correct = np.argmax(proba, axis=1) == labels
    both = 0 < correct.sum() < len(correct)
    out = {"threshold": guard.threshold, "keep": guard.keep, "rejected_share": float(1 - accepted.mean()),
           "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else 0.0}
    if both:  # numbers only (dvc metrics): left out when every test photo is right, or every one wrong
        out["auroc_wrong_vs_right"] = guard_mod.auroc(scores[correct], scores[~correct])
    return out


def calibration_metrics(labels: np.ndarray, proba: np.ndarray, uncalibrated: np.ndarray, guard) -> tuple[dict, dict]:
    """(numbers: ECE (15 bins) and Brier score before and after temperature scaling; the bins, for the report)."""
    before = guard_mod.expected_calibration_error(uncalibrated, labels)
    after = guard_mod.expected_calibration_error(proba, labels)
    numbers = {"temperature": guard.temperature, "ece_before": before["ece"], "ece_after": after["ece"],
               "brier_before": guard_mod.brier_score(uncalibrated, labels),
               "brier_after": guard_mod.brier_score(proba, labels)}
    return numbers, {"before": before, "after": after}


def evaluate_model(trained: Trained) -> dict:
    """Everything about ``trained`` on the test split: metrics, confusion, and per-photo answers."""
    answers = answer_split(trained.classifier, trained.inputs, "test")
    labels, proba = answers["labels"], answers["probabilities"]
    if not len(labels):
        raise EvaluationError("the test split is empty; set data.test_fraction > 0 or add a test/ folder")
    metrics, confusion = compute_metrics(labels, proba, trained.classes)
    metrics["rejection"] = rejection_metrics(labels, proba, answers["scores"], trained.guard)
    metrics["calibration"], bins = calibration_metrics(labels, proba, answers["uncalibrated"], trained.guard)
    return {"metrics": metrics, "confusion": confusion, "positions": answers["positions"], "labels": labels,
            "proba": proba, "scores": answers["scores"], "reliability": bins}


def run(project) -> EvaluateResult:
    rung = ladder.chosen(project)
    log.info("evaluate: %s", ladder.describe_choice(project))
    with rung.load(project) as trained:
        return _evaluate(project, rung, trained)


def _evaluate(project, rung, trained: Trained) -> EvaluateResult:
    params = project.params
    reports = project.reports_dir
    ingredients = _say_why(project, rung, trained)
    result = evaluate_model(trained)
    classes, metrics, inputs = trained.classes, result["metrics"], trained.inputs
    paths = np.array(inputs.paths(result["positions"]), dtype=object)
    y_true = np.array(classes)[result["labels"]]
    run_info = _run_info(project, rung, trained, ingredients, result)
    metrics_path = atomic_write_text(reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(reports / "run.json", json.dumps(run_info, indent=2) + "\n")
    wrong = misclassified(paths, y_true, result["proba"], classes)
    _write_tables(reports, paths, y_true, result, wrong, trained, params.evaluate.top_k)
    summary = {**metrics, "classes": classes, "confusion_matrix": result["confusion"], "rung": rung.name,
               "model": rung.stage, "model_key": trained.key, "model_params": trained.meta["params"],
               "backbone": inputs.attrs["backbone"], "layer": inputs.attrs["layer"],
               "features_key": inputs.attrs["key"], "reliability": result["reliability"],
               "rejection_rule": trained.guard.rule, "rejection_label": trained.guard.label}
    previous_entry, entry = report.append_history(reports / "history.jsonl", summary)
    page = report.write(reports, report.ReportPage(
        project.data_root, summary, wrong, trained.classifier.history, report.read_history(reports / "history.jsonl"),
        provenance={**run_info["features"], "model": run_info["model"], "data_root": params.data.root,
                    "params": {name: as_dict(getattr(params, name)) for name in SECTIONS}},
        counts=_counts(trained), skipped=_read_skipped(project.skipped_csv),
        quality=report.data_quality_section(reports, project.data_root, _content_hash(project),
                                            params.inspect.thumbnails),
        rejected=rejected_photos(paths, y_true, result["scores"], trained.guard, params.inspect.thumbnails)))
    text = format_table(metrics, classes, result["confusion"]) + "\n\n" + report.diff(previous_entry, entry)
    log.info("evaluate: accuracy %.4f, balanced accuracy %.4f on %d test images; wrote %s and %s",
             metrics["accuracy"], metrics["balanced_accuracy"], metrics["n_test"], metrics_path, page)
    return EvaluateResult(metrics, run_info, metrics_path, text)


def _say_why(project, rung, trained: Trained) -> dict:
    """What this evaluation is of (its ingredients); logs what changed since the last one, and other rungs
    trained for these params."""
    params = project.params
    for other in ladder.RUNGS.values():
        found = other.find(project) if other is not rung else None
        if found is not None:
            found.inputs.close()
            log.info("evaluate: a %s model is trained for these params too; evaluate it with train.strategy: %s",
                     other.stage, other.name)
    ingredients = {"train.strategy": params.train.strategy, "rung": rung.name, "model": trained.key,
                   "reject": as_dict(params.reject), "evaluate": as_dict(params.evaluate)}
    previous = _read_json(project.reports_dir / "run.json")
    changes = describe_changes(previous.get("inputs") if previous else None, json.loads(canonical_json(ingredients)))
    log.info("evaluate: recomputing (%s)", ", ".join(changes) if changes else
             ("the same model and settings as the last evaluation" if previous else "first evaluation"))
    return ingredients


def _run_info(project, rung, trained: Trained, ingredients: dict, result: dict) -> dict:
    """run.json: what was evaluated."""
    params, base, advice, inputs = project.params, project.base, project.advice, trained.inputs
    return {
        "inputs": ingredients,
        "rung": rung.name,
        "strategy": params.train.strategy,
        "advice": list(advice.reasons) if advice else None,
        "model": {"stage": rung.stage, "key": trained.key, "folder": str(trained.folder.relative_to(base))
                  if trained.folder.is_relative_to(base) else str(trained.folder),
                  "params": trained.meta["params"], "fit_seconds": trained.classifier.history.get("fit_seconds")},
        "features": {k: inputs.attrs[k] for k in ("key", "backbone", "weights", "weights_sha256", "layer",
                                                  "input_size", "resize", "dtype")},
        "data": {"root": params.data.root, "splits": as_dict(params.data)},
        "classes": trained.classes,
        "confusion_matrix": result["confusion"],
        "rejection": {"score": trained.guard.score, "rule": trained.guard.rule, "label": trained.guard.label,
                      "threshold_from": trained.guard.threshold_from, "calibrated_on": trained.guard.calibrated_on},
        "reliability": result["reliability"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_tables(reports: Path, paths, y_true, result: dict, wrong: list, trained: Trained, top_k: int) -> None:
    """misclassified.csv and predictions.csv (dvc plots)."""
    classes, proba = trained.classes, result["proba"]
    atomic_write_text(reports / "misclassified.csv", _misclassified_csv(wrong, proba, classes, top_k))
    predicted = np.array(classes)[np.argmax(proba, axis=1)]
    answered = np.where(trained.guard.accepted(result["scores"]), predicted, trained.guard.label)
    atomic_write_text(reports / "predictions.csv", _csv(
        ["path", "actual", "predicted", "probability", "score", "answer"],
        zip(paths, y_true, predicted, (f"{p:.6f}" for p in proba.max(axis=1)), (f"{s:.6f}" for s in result["scores"]),
            answered)))


def _content_hash(project) -> str | None:
    """The labelled photos of the features stage's cache, which 'make inspect' findings must be from to be shown."""
    from pipeline.store import labels

    try:
        return str(labels.read(project.labels_file()).attrs["content_hash"])
    except labels.CacheError:
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


def rejected_photos(paths, y_true, scores, guard, limit: int) -> list[dict]:
    """The test photos the guard would answer ``reject.label``, least like the training photos first."""
    rejected = ~guard.accepted(scores)
    order = [i for i in np.argsort(-scores) if rejected[i]]
    return [{"path": str(paths[i]), "true": str(y_true[i]), "score": float(scores[i])} for i in order[:limit]]


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
    if "rejection" in metrics:
        r, c = metrics["rejection"], metrics["calibration"]
        auroc = f"{r['auroc_wrong_vs_right']:.3f}" if "auroc_wrong_vs_right" in r else "-"
        lines.append(f"rejected as unlike the training photos {100 * r['rejected_share']:.1f}% (threshold keeps "
                     f"{100 * r['keep']:g}% of known photos)   accuracy on the accepted {r['accuracy_accepted']:.4f}   "
                     f"score AUROC wrong vs right {auroc}")
        fitted = f"temperature {c['temperature']:.3g}" if c["temperature"] != 1.0 else "none (the held-out photos all answered right)"
        lines.append(f"calibration: {fitted}   ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}"
                     f"   Brier {c['brier_before']:.4f} -> {c['brier_after']:.4f}")
    if len(classes) <= 20:
        lines.append("confusion matrix (rows: true, columns: predicted)")
        lines.append(" " * width + "  " + " ".join(f"{c[:8]:>8}" for c in classes))
        for c, row in zip(classes, confusion):
            lines.append(f"{c:<{width}}  " + " ".join(f"{v:8d}" for v in row))
    return "\n".join(lines)
