"""Stage `evaluate`: metrics of the current head on the held-out test split.

Brings the head up to date first (``train_head.run`` is a cache hit when nothing changed), then
writes ``reports/metrics.json`` and ``reports/misclassified.csv`` and returns a printable table.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import feature_store, report, trained
from pipeline.fingerprint import atomic_write_text
from pipeline.params import SECTIONS, Params, as_dict

STAGE = "evaluate"
log = logging.getLogger("pipeline.evaluate")


class EvaluationError(ValueError):
    """Nothing to evaluate on (an empty test split, ...)."""


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    metrics_path: Path
    misclassified_path: Path
    table: str  # human-readable summary


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """accuracy, balanced_accuracy, per_class, confusion_matrix (rows: true, columns: predicted)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, \
        precision_recall_fscore_support

    y_pred = np.array(classes)[np.argmax(proba, axis=1)]
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes,
                                                                     zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "n_test": int(len(y_true)),
        "classes": list(classes),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }


def run(params: Params, base: str | Path = ".") -> EvaluateResult:
    base = Path(base)
    current = trained.bring_up_to_date(params, base)
    table = feature_store.read_table(current.features_file)
    x_test, y_test, paths = table.select("test")
    if not len(y_test):
        raise EvaluationError("the test split is empty; set data.test_fraction > 0 or add a test/ folder")
    head = current.model
    classes = list(head.classes)
    if current.rung == "finetune":  # the whole network changed: run it on the test images themselves
        proba = head.predict_files([base / params.data.root / p for p in paths])
    else:
        proba = head.predict_proba(x_test)
    metrics = compute_metrics(y_test, proba, classes)
    meta = json.loads((current.path / "head.json").read_text())
    metrics.update({
        "rung": current.rung,
        "head": {"model": meta["model"], "key": current.key, "params": meta["params"],
                 "fit_seconds": head.history.get("fit_seconds")},
        "features": {k: table.attrs[k] for k in ("key", "backbone", "weights", "weights_sha256", "layer",
                                                 "input_size", "resize", "dtype")},
        "data": {"root": params.data.root, "splits": as_dict(params.data)},
    })
    reports = base / params.paths.reports_dir
    metrics_path = atomic_write_text(reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    wrong = misclassified(paths, y_test, proba, classes)
    misclassified_path = atomic_write_text(reports / "misclassified.csv",
                                           _misclassified_csv(wrong, proba, classes, params.evaluate.top_k))
    predicted = np.array(classes)[np.argmax(proba, axis=1)]
    atomic_write_text(reports / "predictions.csv", _csv(["path", "actual", "predicted"],
                                                        zip(paths, y_test, predicted)))
    previous, entry = report.append_history(reports / "history.jsonl", metrics)
    page = report.write(
        reports, base / params.data.root, metrics, wrong, head.history, report.read_history(reports / "history.jsonl"),
        provenance={**metrics["features"], "head": metrics["head"], "data_root": params.data.root,
                    "params": {name: as_dict(getattr(params, name)) for name in SECTIONS}},
        counts=_counts(table, classes), skipped=_read_skipped(reports / "skipped.csv"))
    text = format_table(metrics) + "\n\n" + report.diff(previous, entry)
    log.info("evaluate: accuracy %.4f, balanced accuracy %.4f on %d test images; wrote %s and %s",
             metrics["accuracy"], metrics["balanced_accuracy"], metrics["n_test"], metrics_path, page)
    return EvaluateResult(metrics, metrics_path, misclassified_path, text)


def compare(params: Params, base: str | Path = ".") -> str:
    """The rungs trained for these params, side by side on the same test split."""
    from pipeline import features, finetune, train_head, train_top

    base = Path(base)
    rows = []
    for rung, folder, features_params in (("head", train_head.find(params, base), params),
                                          ("top", train_top.find(params, base), train_top.cut_params(params)),
                                          ("finetune", finetune.find(params, base), finetune.pooled_params(params))):
        if folder is None:
            rows.append((rung, None))
            continue
        model = train_head.load(folder)
        table = feature_store.read_table(features.cache_file(features_params, base))
        x_test, y_test, test_paths = table.select("test")
        proba = model.predict_files([base / params.data.root / p for p in test_paths]) if rung == "finetune" \
            else model.predict_proba(x_test)
        metrics = compute_metrics(y_test, proba, list(model.classes))
        metrics["fit_seconds"] = model.history.get("fit_seconds")
        metrics["layer"] = table.attrs["layer"] if rung != "finetune" else "nothing"
        rows.append((rung, metrics))
    lines = [f"{'rung':<8} {'frozen up to':<14} {'accuracy':>9} {'balanced':>9} {'test':>5} {'training s':>11}"]
    for rung, m in rows:
        if m is None:
            command = {"head": "make train-head", "top": "make train-top", "finetune": "make finetune"}[rung]
            lines.append(f"{rung:<8} not trained for these params ('{command}')")
        else:
            seconds = f"{m['fit_seconds']:.1f}" if m["fit_seconds"] is not None else "-"
            lines.append(f"{rung:<8} {m['layer']:<14} {m['accuracy']:9.4f} {m['balanced_accuracy']:9.4f} "
                         f"{m['n_test']:5d} {seconds:>11}")
    return "\n".join(lines)


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


def _counts(table, classes) -> dict:
    """{class: {train, val, test: images}}."""
    return {c: {s: int(((table.labels == c) & (table.splits == s)).sum()) for s in ("train", "val", "test")}
            for c in classes}


def _read_skipped(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def format_table(metrics: dict) -> str:
    classes = metrics["classes"]
    width = max(12, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for c in classes:
        m = metrics["per_class"][c]
        lines.append(f"{c:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    lines.append("")
    lines.append(f"accuracy {metrics['accuracy']:.4f}   balanced accuracy {metrics['balanced_accuracy']:.4f}   "
                 f"test images {metrics['n_test']}")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "  " + " ".join(f"{c[:8]:>8}" for c in classes))
    for c, row in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"{c:<{width}}  " + " ".join(f"{v:8d}" for v in row))
    return "\n".join(lines)
