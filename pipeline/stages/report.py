"""The evaluation report: ``reports/index.html`` plus its plots as PNG files, and the run history.

The page is self-contained (images embedded as data URIs; no server, no network) and is written
by ``evaluate`` after the metrics. ``history.jsonl`` gets one line per evaluation; ``diff``
compares the latest two, like ``dvc metrics diff``.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.fingerprint import atomic_write_text

MAX_GALLERY = 60  # misclassified thumbnails on the page, worst first (all of them are in misclassified.csv)
THUMBNAIL = 160  # pixels, longer side
MATRIX_CLASSES = 20  # beyond this many classes, the confusion matrix plots show the most confused ones


def confused_classes(matrix: np.ndarray, limit: int = MATRIX_CLASSES) -> list[int]:
    """The classes to draw: all of them up to ``limit``, else the ``limit`` most involved in mistakes."""
    if len(matrix) <= limit:
        return list(range(len(matrix)))
    off = matrix - np.diag(np.diag(matrix))
    involvement = off.sum(axis=0) + off.sum(axis=1)
    return sorted(np.argsort(-involvement, kind="stable")[:limit].tolist())


def confused_pairs(matrix: np.ndarray, classes: list[str], limit: int = 15) -> list[dict]:
    """The most frequent mistakes: (true, predicted, photos, share of the true class), most first."""
    pairs = [(int(matrix[i, j]), i, j) for i in range(len(matrix)) for j in range(len(matrix))
             if i != j and matrix[i, j] > 0]
    pairs.sort(key=lambda q: (-q[0], q[1], q[2]))
    return [{"true": classes[i], "predicted": classes[j], "photos": n,
             "share": n / max(1, int(matrix[i].sum()))} for n, i, j in pairs[:limit]]


def append_history(path: Path, summary: dict) -> tuple[dict | None, dict]:
    """Append this evaluation to history.jsonl; returns (previous entry or None, this entry)."""
    entries = read_history(path)
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "accuracy": summary["accuracy"],
        "balanced_accuracy": summary["balanced_accuracy"],
        "n_test": summary["n_test"],
        "f1": {c: m["f1"] for c, m in summary["per_class"].items()},
        "model": summary["model"],
        "model_key": summary["model_key"],
        "model_params": summary["model_params"],
        "backbone": summary["backbone"],
        "layer": summary["layer"],
        "features_key": summary["features_key"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    return (entries[-1] if entries else None), entry


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # a line cut by an interrupted write is not history
    return entries


def diff(previous: dict | None, current: dict) -> str:
    """A table of each metric's change against the previous evaluation."""
    if previous is None:
        return "first evaluation: nothing to compare with yet"
    rows = [("accuracy", previous["accuracy"], current["accuracy"]),
            ("balanced_accuracy", previous["balanced_accuracy"], current["balanced_accuracy"])]
    rows += [(f"f1.{c}", previous.get("f1", {}).get(c), v) for c, v in current["f1"].items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  previous   current    change"]
    for name, old, new in rows:
        change = f"{new - old:+.4f}" if old is not None else "new"
        old_text = f"{old:.4f}" if old is not None else "-"
        lines.append(f"{name:<{width}}  {old_text:>8}  {new:8.4f}  {change:>8}")
    if previous.get("model") != current["model"]:
        lines.append(f"model changed: {previous.get('model')} -> {current['model']}")
    elif previous.get("model_key") != current["model_key"]:
        changed = [f"{k}: {previous['model_params'].get(k)} -> {v}" for k, v in current["model_params"].items()
                   if previous.get("model_params", {}).get(k) != v]
        if changed:
            lines.append(f"{current['model']} settings changed: " + ", ".join(changed))
    return "\n".join(lines)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _figures(metrics: dict, head_history: dict, history: list[dict]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plots = _confusion_figures(plt, metrics)
    plots["training_curves.png"] = _training_figure(plt, metrics, head_history)
    if metrics.get("reliability"):
        plots["reliability.png"] = _reliability_figure(plt, metrics["reliability"], metrics.get("calibration", {}))
    plots["history.png"] = _history_figure(plt, history)
    return plots


def _saved(plt, figure) -> bytes:
    png = _png(figure)
    plt.close(figure)
    return png


def _confusion_figures(plt, metrics: dict) -> dict[str, bytes]:
    """Counts and row-normalised rates, over the most confused classes when there are many."""
    full = np.array(metrics["confusion_matrix"], dtype=float)
    shown = confused_classes(full)
    classes = [metrics["classes"][i] for i in shown]
    matrix = full[np.ix_(shown, shown)]
    note = "" if len(shown) == len(full) else f", the {len(shown)} most confused of {len(full)} classes"
    plots = {}
    for name, values, fmt, title in [
        ("confusion_matrix.png", matrix, "{:.0f}", f"Confusion matrix (test images{note})"),
        ("confusion_matrix_normalized.png", matrix / np.maximum(full[shown].sum(axis=1, keepdims=True), 1), "{:.2f}",
         f"Confusion matrix, each true class sums to 1{note}"),
    ]:
        size = 1.6 + 0.6 * len(classes)
        figure, axes = plt.subplots(figsize=(size + 1.2, size))
        image = axes.imshow(values, cmap="Blues")
        axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        axes.set_yticks(range(len(classes)), classes)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(title)
        peak = values.max() if values.size else 1
        for i in range(len(classes)):
            for j in range(len(classes)):
                axes.text(j, i, fmt.format(values[i, j]), ha="center", va="center",
                          color="white" if values[i, j] > 0.6 * peak else "black")
        figure.colorbar(image, ax=axes, fraction=0.046)
        plots[name] = _saved(plt, figure)
    return plots


def _training_figure(plt, metrics: dict, head_history: dict) -> bytes:
    """Loss and accuracy per epoch (Keras heads), or CV accuracy over C and accuracy by split (the regression)."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = head_history.get("epochs")
    if epochs:
        for metric, ax in (("loss", axes[0]), ("accuracy", axes[1])):
            for prefix, style in (("", "-"), ("val_", "--")):
                if prefix + metric in epochs:
                    ax.plot(range(1, len(epochs[prefix + metric]) + 1), epochs[prefix + metric], style,
                            label=("validation " if prefix else "train ") + metric)
            ax.set_xlabel("epoch")
            ax.set_title(metric)
            ax.legend()
        return _saved(plt, figure)
    if head_history.get("cv_balanced_accuracy"):
        grid = {float(c): s for c, s in head_history["cv_balanced_accuracy"].items()}
        axes[0].semilogx(list(grid), list(grid.values()), "o-")
        axes[0].set_xlabel("C")
        axes[0].set_title(f"{head_history['cv_folds']}-fold CV balanced accuracy on train")
        axes[0].axvline(head_history["chosen_C"], color="grey", linestyle=":")
    else:
        axes[0].text(0.5, 0.5, "logistic regression: one fit, no epochs\n(set train_head.search_C: true for a "
                               "curve over C)", ha="center", va="center")
        axes[0].set_axis_off()
    bars = {k: head_history[k] for k in ("train_accuracy", "val_accuracy") if k in head_history}
    bars["test_accuracy"] = metrics["accuracy"]
    axes[1].bar(list(bars), list(bars.values()), color=["#4c72b0", "#dd8452", "#55a868"][:len(bars)])
    axes[1].set_ylim(0, 1)
    axes[1].set_title("accuracy by split")
    return _saved(plt, figure)


def _history_figure(plt, history: list[dict]) -> bytes:
    figure, axes = plt.subplots(figsize=(8, 3))
    runs = range(1, len(history) + 1)
    axes.plot(runs, [h["accuracy"] for h in history], "o-", label="accuracy")
    axes.plot(runs, [h["balanced_accuracy"] for h in history], "s--", label="balanced accuracy")
    axes.set_xlabel("evaluation")
    axes.set_xticks(list(runs))
    axes.set_title("test metrics over evaluations")
    axes.legend()
    return _saved(plt, figure)


def _reliability_figure(plt, bins: dict, numbers: dict) -> bytes:
    """Accuracy against confidence per bin, before and after calibration, with each bin's photo count."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, which, title in ((axes[0], "before", "before calibration"), (axes[1], "after", "after calibration")):
        b = bins[which]
        edges = np.array(b["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        counts = np.array(b["counts"])
        shown = counts > 0
        ax.bar(centres[shown], np.array(b["accuracy"])[shown], width=width * 0.9, color="#4c72b0", label="accuracy")
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
        ax.plot(centres[shown], np.array(b["confidence"])[shown], "o", color="#dd8452", ms=4, label="mean confidence")
        for x, n, y in zip(centres[shown], counts[shown], np.array(b["accuracy"])[shown]):
            ax.text(x, min(y + 0.02, 0.97), str(n), ha="center", fontsize=7)
        ece = numbers.get(f"ece_{which}")
        ax.set_title(f"{title}" + (f" (ECE {ece:.3f})" if ece is not None else ""))
        ax.set_xlabel("confidence of the top label (numbers: test photos per bin)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share correct")
    axes[1].legend(loc="upper left", fontsize=8)
    png = _png(figure)
    plt.close(figure)
    return png


def _thumbnail(path: Path, side: int = THUMBNAIL) -> str | None:
    from pipeline.data.decode import ImageError, thumbnail_jpeg

    try:
        jpeg = thumbnail_jpeg(path, side)
    except (OSError, ValueError, ImageError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def _figure(uri: str | None, alt: str, caption: str) -> str:
    e = html.escape
    image = f"<img src='{uri}' alt='{e(alt)}'>" if uri else "<div class='missing'>image gone</div>"
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def data_quality_section(reports: Path, data_root: Path, content_hash: str | None, thumbnails: int) -> str:
    """The findings of 'make inspect', when they were made from the current feature cache."""
    e = html.escape
    try:
        summary = json.loads((reports / "inspect.json").read_text())
    except (OSError, ValueError):
        return "<h2>Data quality</h2><p>Run <code>make inspect</code> for likely label errors, near-duplicates " \
               "and outliers.</p>"
    if content_hash is not None and summary.get("content_hash") != content_hash:
        return "<h2>Data quality</h2><p>The findings of <code>make inspect</code> are from another version of the " \
               "photos; run it again.</p>"

    def read(name):
        import csv

        try:
            with open(reports / name, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        except OSError:
            return []

    issues = read("label_issues.csv")[:thumbnails]
    pairs = read("near_duplicates.csv")[:thumbnails]
    outliers = read("outliers.csv")[:thumbnails]
    side = 120
    parts = [f"<h2>Data quality</h2><p data-quality='summary'>{summary['photos']:,} photos: "
             f"<b>{summary['label_issues']}</b> likely label errors, <b>{summary['near_duplicate_pairs']}</b> "
             f"near-duplicate pairs ({summary['leaking_pairs']} straddle splits), <b>{summary['outliers']}</b> "
             "outliers (make inspect; the CSV files in reports/ list them all).</p>"]
    parts.append("<h3>Likely label errors, most suspicious first</h3><div class='gallery'>" + "".join(
        _figure(_thumbnail(data_root / q["path"], side), q["path"],
                f"labelled <b>{e(q['given'])}</b>, looks like <b>{e(q['suggested'])}</b> ({float(q['score']):.2f})"
                f"<br><span>{e(q['path'])}</span>") for q in issues) + "</div>")
    parts.append("<h3>Near-duplicates, pairs that straddle splits first</h3><div class='gallery'>" + "".join(
        "<div class='pair'>" + _figure(_thumbnail(data_root / q["path_a"], side), q["path_a"],
                                       f"{e(q['split_a'])} / {e(q['label_a'])}<br><span>{e(q['path_a'])}</span>")
        + _figure(_thumbnail(data_root / q["path_b"], side), q["path_b"],
                  f"{e(q['split_b'])} / {e(q['label_b'])} ({float(q['similarity']):.3f})<br><span>{e(q['path_b'])}</span>")
        + "</div>" for q in pairs) + "</div>")
    parts.append("<h3>Outliers, least typical first</h3><div class='gallery'>" + "".join(
        _figure(_thumbnail(data_root / q["path"], side), q["path"],
                f"{e(q['label'])}, nearest other class {e(q['nearest_other_class'])}<br><span>{e(q['path'])}</span>")
        for q in outliers) + "</div>")
    return "".join(parts)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _trust_section(metrics: dict, plots: dict, data_root: Path, rejected: list[dict]) -> str:
    """How far the probabilities can be trusted, and what the model answers for photos unlike its training."""
    if "rejection" not in metrics:
        return ""
    r, c = metrics["rejection"], metrics["calibration"]
    auroc = (f"{r['auroc_wrong_vs_right']:.3f}" if r.get("auroc_wrong_vs_right") is not None
             else "not defined (no test photo is wrong, or none right)")
    e = html.escape
    gallery = "".join(_figure(_thumbnail(data_root / item["path"]), item["path"],
                              f"<b>{e(item['true'])}</b>, score {item['score']:.3f}<br><span>{e(item['path'])}</span>")
                      for item in rejected)
    return f"""<h2>Confidence and "none of these"</h2>
<div class="cards">
<div class="card">rejected test photos<div class="v" data-metric="rejected_share">{100 * r['rejected_share']:.1f}%</div></div>
<div class="card">accuracy on the accepted<div class="v" data-metric="accuracy_accepted">{r['accuracy_accepted']:.4f}</div></div>
<div class="card">ECE before / after<div class="v" data-metric="ece_after">{c['ece_before']:.3f} / {c['ece_after']:.3f}</div></div>
<div class="card">Brier before / after<div class="v">{c['brier_before']:.3f} / {c['brier_after']:.3f}</div></div>
</div>
<p>{html.escape(metrics.get('rejection_rule', ''))}; threshold {r['threshold']:.4g}, set to keep {100 * r['keep']:g}% of
known photos. The score's AUROC for telling the test photos the model gets wrong from those it gets right: {auroc}.
{_calibration_sentence(c)}</p>
<div class="plots"><img src="{_data_uri(plots['reliability.png'])}" alt="reliability diagram"></div>
{f'<h3>Test photos it would answer "{e(metrics.get("rejection_label", "unknown"))}" (least like the training photos first)</h3><div class="gallery">{gallery}</div>' if gallery else ''}
"""


def _calibration_sentence(c: dict) -> str:
    if c["temperature"] == 1.0:  # not fitted: every val photo answered right (training.guard.separable)
        return ("Probabilities are the head's own: the held-out photos (val, or out-of-fold) are all answered "
                "right, so no temperature can be fitted from them.")
    return f"Probabilities are calibrated by temperature scaling (T = {c['temperature']:.3g})."


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
header { display: flex; gap: 1rem; align-items: baseline; } nav a { margin-right: .8rem; } nav a.here { font-weight: 600; }
h1 { margin-bottom: .2rem; } .sub { color: #666; margin-top: 0; }
.cards { display: flex; gap: 1rem; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: .8rem 1.2rem; min-width: 10rem; }
.card .v { font-size: 2rem; font-weight: 600; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; }
td, th { border-bottom: 1px solid #eee; padding: .3rem .8rem; text-align: left; }
.plots img { max-width: 100%; margin: .5rem 1rem .5rem 0; }
.gallery { display: flex; flex-wrap: wrap; gap: .8rem; }
figure { margin: 0; width: 170px; font-size: .8rem; } figure img { max-width: 160px; max-height: 160px; }
.pair { display: flex; gap: .3rem; border: 1px solid #eee; padding: .3rem; }
figcaption span { color: #888; word-break: break-all; }
pre { background: #f6f6f6; padding: .8rem; overflow-x: auto; }
"""


@dataclass(frozen=True)
class ReportPage:
    """What ``write`` shows: the evaluation's summary and the material of its sections."""

    data_root: Path  # the photos, for thumbnails
    metrics: dict  # metrics.json and more: classes, confusion_matrix, model, ...
    misclassified: list  # wrong test predictions, most confident first
    head_history: dict  # the classifier's training history (curves)
    history: list  # history.jsonl's entries
    provenance: dict
    counts: dict  # {class: {train, val, test: photos}}
    skipped: list  # skipped.csv's rows
    quality: str = ""  # the data-quality section (data_quality_section)
    rejected: list = field(default_factory=list)  # test photos the guard would reject


def write(reports: Path, page: ReportPage) -> Path:
    """Write the PNG plots and index.html into ``reports``; returns the page's path."""
    from pipeline import templates

    metrics, classes = page.metrics, page.metrics["classes"]
    plots = _figures(metrics, page.head_history, page.history)
    for name, png in plots.items():
        (reports / name).write_bytes(png)
    matrix = [(t, list(zip(classes, (int(n) for n in row)))) for t, row in zip(classes, metrics["confusion_matrix"])]
    gallery = [{**item, "uri": _thumbnail(page.data_root / item["path"])} for item in page.misclassified[:MAX_GALLERY]]
    html_text = templates.render(
        "report.html", title="Evaluation report", here="/report", standalone=True, inline_style=STYLE,
        metrics=metrics, classes=classes, provenance=page.provenance, history=page.history,
        trust=_trust_section(metrics, plots, page.data_root, page.rejected),
        worst_first=sorted(metrics["per_class"].items(), key=lambda item: (item[1]["f1"], item[0])),
        confusions=confused_pairs(np.array(metrics["confusion_matrix"]), classes),
        matrix=matrix if len(classes) <= MATRIX_CLASSES else [],
        plots={name: _data_uri(png) for name, png in plots.items()},
        misclassified=page.misclassified, gallery=gallery, more=len(page.misclassified) - MAX_GALLERY,
        quality=page.quality, history_rows=list(reversed(list(enumerate(page.history, start=1)))),
        counts=page.counts, skipped=page.skipped, provenance_json=json.dumps(page.provenance, indent=2))
    return atomic_write_text(reports / "index.html", html_text)
