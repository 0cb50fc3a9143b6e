"""Command `export`: one self-contained model, in every format, proven to answer like the pipeline.

The exported Keras model takes one RGB image of any size, ``(1, H, W, 3)`` uint8 (or a batch of
same-sized images), and returns two outputs: calibrated class probabilities ``(N, n_classes)``
and the rejection score ``(N,)`` (answer ``reject.label`` when it is above ``model.json``'s
threshold). Inside: ``FitToSize`` (the features stage's own resize), the frozen part of the
backbone with its normalisation, the classifier of the rung params choose (a logistic-regression
head is folded into one Dense layer; the fine-tuned network is the whole model) and its guard
(temperature, score: ``training.guard``).

Files in ``export.dir`` (default ``models/``): ``model.keras``, ``saved_model/`` (signature
``serve``), ``model.tflite`` (float32, signature ``serving_default``), ``model.onnx`` (float32; the
labels and threshold in its metadata), optionally ``model_dynamic.tflite`` or ``model_int8.tflite``,
``labels.txt``, ``model.json`` and ``web/`` (the browser bundle: ``use.web``). The input is named ``image``, the outputs ``probabilities`` and
``score`` in every format. They are written to a temporary folder
and moved into place only after the parity check on the test split passed.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import runtime
from pipeline.data.decode import ImageError, decode_rgb
from pipeline.errors import PipelineError
from pipeline.fingerprint import replaced_folder
from pipeline.params import as_dict
from pipeline.stages import ladder
from pipeline.training.inputs import iterate
from pipeline.use import formats
from pipeline.use.predict import features_params_of

log = logging.getLogger("pipeline.export")
# Quantised formats: scores within this share of the threshold are borderline (either answer is fair)
DECISION_BAND = 0.05
FORMAT_VERSION = 3  # 2: two outputs (probabilities, score), rejection and calibration in model.json; 3: named, ONNX


class ExportError(PipelineError, RuntimeError):
    """An export that does not answer like the pipeline; nothing was written."""


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    files: dict  # name -> size in bytes
    parity: dict  # format -> {"max_abs_diff" | "top1_agreement", "n_images"}


def build_export_model(backbone, classifier_model, size: int, resize: str, views=("original",)):
    """uint8 (N, H, W, 3) -> [probabilities (N, n_classes), score (N,)]: resize, [the frozen backbone on
    each view, averaged,] the guarded classifier."""
    from pipeline.training.layers import FitToSize, keras

    image = keras.Input((None, None, 3), dtype="uint8", name="image")
    x = FitToSize(size, resize, name="fit_to_size")(image)
    if backbone is not None:  # None: the classifier takes the resized image itself (fine-tuned network)
        activations = [backbone.model(x if view == "original" else keras.ops.flip(x, axis=2), training=False)
                       for view in views]  # every view but the original is the photo mirrored left-right (hflip)
        x = activations[0] if len(activations) == 1 else keras.layers.Average(name="views")(activations)
    probabilities, score = classifier_model(x, training=False)
    # named outputs: the signatures of SavedModel, TFLite and ONNX carry these names
    return keras.Model(image, {"probabilities": probabilities, "score": score}, name="classifier")


def run(project) -> ExportResult:
    rung = ladder.chosen(project)
    with rung.load(project) as trained:
        log.info("export: %s", ladder.describe_choice(project))
        return _export(project, rung, trained)


def _export(project, rung, trained) -> ExportResult:
    from pipeline.backbones import keras_models

    inputs = trained.inputs
    attrs = inputs.attrs
    f = features_params_of(attrs)
    size = runtime.input_size(f)
    backbone = None
    if inputs.layer != runtime.IMAGE:
        backbone = keras_models.build(f.backbone, f.weights, inputs.layer, f.image_size, project.weights_dir)
        if backbone.weights_sha256 != attrs["weights_sha256"]:
            raise ExportError(f"the backbone's weights differ from those of {inputs.path.name}; "
                              f"run 'make features' and 'make {rung.stage}' again")
    model = build_export_model(backbone, trained.classifier.as_keras(inputs.shape), size, f.resize, inputs.views)

    params = project.params
    tolerance = params.export.tolerance
    if attrs["dtype"] == "float16":
        tolerance = max(tolerance, 2e-3)  # the reference itself went through float16 storage
        log.info("export: float16 feature cache; parity tolerance widened to %g", tolerance)
    target = project.base / params.export.dir
    draft = runtime.draft_size(f)
    with replaced_folder(target) as tmp:  # moved into place only after parity held
        files = _write_formats(model, tmp, formats.WriteJob(project, trained, draft, size))
        parity = _check_parity(_runners(tmp, model, files), _test_samples(project, trained, draft), tolerance,
                               params.export.min_top1_agreement, trained.guard, len(trained.inputs.rows("test")))
        _write_metadata(tmp, project, trained, size, f, parity)
    sizes = {name: _size(target / name) for name in files}
    for name, size_bytes in sizes.items():
        log.info("export: %-22s %8.1f MB", name, size_bytes / 1e6)
    return ExportResult(target, sizes, parity)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@dataclass
class _Sample:
    path: str
    pixels: np.ndarray  # (H, W, 3) uint8, decoded as the features stage does
    reference: np.ndarray  # (n_classes,) the pipeline's probabilities from its own inputs
    score: float  # the pipeline's rejection score


def _test_samples(project, trained, draft: int):
    """Yield the test photos that still have the bytes they were cached with, with the pipeline's answer;
    a batch of test rows at a time (memory does not grow with the test split)."""
    import hashlib

    inputs = trained.inputs
    root = project.data_root
    changed = 0
    for positions, x in iterate(inputs, "test", 32):
        reference, scores = trained.classifier.answer(x)
        for path, sha, probabilities, score in zip(inputs.paths(positions), inputs.sha256(positions), reference, scores):
            file = root / path
            try:
                data = file.read_bytes()
                if hashlib.sha256(data).hexdigest() != sha:
                    changed += 1
                    continue
                yield _Sample(path, decode_rgb(io.BytesIO(data), draft, project.params.features.max_pixels),
                              probabilities, float(score))
            except (OSError, ImageError):
                changed += 1
    if changed:
        log.warning("export: %d test image(s) changed or missing since 'make features'; checked the others", changed)


def _write_formats(model, folder: Path, job: formats.WriteJob) -> list[str]:
    """Every registered format these params want, then labels.txt; the names written."""
    written = []
    for fmt in formats.wanted(job.project.params.export):
        if not (folder / fmt.name).exists():  # a quantised format may have written the SavedModel it needs
            started = time.perf_counter()
            fmt.write(model, folder, job)
            log.info("export: wrote %-20s in %.1f s", fmt.name, time.perf_counter() - started)
        written.append(fmt.name)
    (folder / "labels.txt").write_text("\n".join(job.trained.classes) + "\n")
    return written + ["labels.txt", "model.json"]


def _runners(folder: Path, live_model, names: list[str]) -> dict:
    """Each written format as a function (1, H, W, 3) uint8 -> ((n_classes,) probabilities, score), after the
    model in memory."""
    runners = {"keras (in memory)": formats.traced(live_model)}
    for name in names:
        if name in formats.FORMATS and formats.FORMATS[name].runner is not None:
            runners[name] = formats.FORMATS[name].runner(folder / name)
    return runners


def _run_formats(runners: dict, samples, threshold: float, total: int) -> dict:
    """Every sample through every format: per format the max |difference| of the probabilities, top-1
    agreement, score difference, accept/reject agreement (None: borderline) and seconds; and the paths."""
    runs = {key: {name: [] for name in runners} for key in ("diff", "agree", "score_diff", "decision")}
    from tqdm import tqdm

    runs["seconds"], runs["paths"] = dict.fromkeys(runners, 0.0), []
    for sample in tqdm(samples, desc=f"export: parity of {len(runners)} formats", total=total, unit="photo",
                       leave=False, mininterval=1.0, disable=None):
        runs["paths"].append(sample.path)
        # a photo whose score is within DECISION_BAND of the threshold may fall either side after 8-bit
        # rounding: counted apart (borderline), not as a disagreement
        borderline = abs(sample.score - threshold) <= DECISION_BAND * max(abs(threshold), 1e-6)
        for name, runner in runners.items():
            started = time.perf_counter()
            output, score = runner(sample.pixels[None])
            runs["seconds"][name] += time.perf_counter() - started
            runs["diff"][name].append(float(np.abs(output - sample.reference).max()))
            runs["agree"][name].append(bool(output.argmax() == sample.reference.argmax()))
            runs["score_diff"][name].append(abs(score - sample.score))
            runs["decision"][name].append(None if borderline else
                                          bool((score <= threshold) == (sample.score <= threshold)))
    return runs


def _judge(name: str, runs: dict, quantized: bool, tolerance: float, min_agreement: float) -> tuple[dict, str]:
    """(the format's parity figures, the failure line or "")."""
    paths = runs["paths"]
    diff, same = np.array(runs["diff"][name]), np.array(runs["agree"][name])
    score_diff = np.array(runs["score_diff"][name])
    decided = np.array([d is not False for d in runs["decision"][name]])
    clear = [d for d in runs["decision"][name] if d is not None]
    entry = {"n_images": len(paths), "max_abs_diff": float(diff.max()), "top1_agreement": float(same.mean()),
             "score_max_abs_diff": float(score_diff.max()), "decision_agreement": float(np.mean(clear)) if clear else 1.0,
             "borderline": len(paths) - len(clear), "seconds": runs["seconds"][name]}
    if quantized:
        ok = entry["top1_agreement"] >= min_agreement and entry["decision_agreement"] >= min_agreement
        log.info("export: parity %-20s top-1 agreement %.2f%%, accept/reject agreement %.2f%% on %d test images "
                 "(%d borderline; %.1f s)", name, 100 * entry["top1_agreement"], 100 * entry["decision_agreement"],
                 len(paths), entry["borderline"], entry["seconds"])
        worst = np.flatnonzero(~same | ~decided)[:3]
        limit = (f"top-1 agreement {100 * entry['top1_agreement']:.1f}%, accept/reject agreement "
                 f"{100 * entry['decision_agreement']:.1f}% (need {100 * min_agreement:g}%)")
    else:
        ok = entry["max_abs_diff"] <= tolerance and entry["score_max_abs_diff"] <= tolerance
        log.info("export: parity %-20s max |diff| %.2e, score %.2e on %d test images (%.1f s)", name,
                 entry["max_abs_diff"], entry["score_max_abs_diff"], len(paths), entry["seconds"])
        worst = np.argsort(-np.maximum(diff, score_diff))[:3]
        limit = f"max |diff| {entry['max_abs_diff']:.2g}, score {entry['score_max_abs_diff']:.2g} (limit {tolerance:g})"
    if ok:
        return entry, ""
    names = ", ".join(f"{paths[i]} ({max(diff[i], score_diff[i]):.2g})" for i in worst)
    return entry, f"{name}: {limit}; worst: {names}"


def _check_parity(runners: dict, samples, tolerance: float, min_agreement: float, guard, total: int) -> dict:
    """Run every test photo through every format and compare with the pipeline's probabilities and scores:
    float formats within ``tolerance``, quantised ones on the top-1 label and on the accept/reject decision."""
    runs = _run_formats(runners, samples, guard.threshold, total)
    if not runs["paths"]:
        raise ExportError("no test images to check parity on; set data.test_fraction > 0")
    report, failures = {}, []
    for name in runners:
        quantized = name in formats.FORMATS and formats.FORMATS[name].quantized
        report[name], failure = _judge(name, runs, quantized, tolerance, min_agreement)
        if failure:
            failures.append(failure)
    if failures:
        raise ExportError("export does not answer like the pipeline, nothing written: " + " | ".join(failures))
    return report


def _metrics_of(reports: Path, model_key: str) -> dict | None:
    """The test metrics evaluate recorded for this very model, or None when it has not evaluated it."""
    try:
        run_info = json.loads((reports / "run.json").read_text())
        recorded = json.loads((reports / "metrics.json").read_text())
    except FileNotFoundError:
        return None  # not evaluated yet
    except ValueError:  # a report cut short: says nothing about this model
        log.warning("export: %s holds no readable evaluation; model.json gets no metrics", reports)
        return None
    if run_info.get("model", {}).get("key") != model_key:  # another model's evaluation
        return None
    return {k: recorded.get(k) for k in ("accuracy", "balanced_accuracy", "n_test")}


def _write_metadata(folder: Path, project, trained, size: int, features_params, parity) -> None:
    metrics = _metrics_of(project.reports_dir, trained.key)
    meta = trained.meta
    attrs = trained.inputs.attrs
    description = {
        "format_version": FORMAT_VERSION,
        "classes": trained.classes,
        "input": {"shape": [None, None, None, 3], "dtype": "uint8", "color": "RGB, upright (EXIF applied)",
                  "note": "one image of any size per call, or a batch of same-sized images"},
        "outputs": {
            "probabilities": {"shape": [None, len(trained.classes)], "dtype": "float32",
                              "meaning": "calibrated class probabilities (temperature scaling), in labels.txt order"},
            "score": {"shape": [None], "dtype": "float32",
                      "meaning": "how unlike the training photos the image is; higher is less like them"},
            "note": "by name in every format: the SavedModel signature serve, the TFLite signature "
                    "serving_default, ONNX; the input is named image"},
        "rejection": {"rule": trained.guard.rule, "label": trained.guard.label, "threshold": trained.guard.threshold,
                      "score": trained.guard.score, "k": trained.guard.k, "keep": trained.guard.keep,
                      "threshold_from": trained.guard.threshold_from, "bank_rows": trained.guard.bank_rows,
                      "bank_kind": trained.guard.bank_kind},
        "calibration": {"method": "temperature scaling", "temperature": trained.guard.temperature,
                        "fitted_on": trained.guard.calibrated_on},
        "preprocessing": {"resize": features_params.resize, "input_size": size,
                          "method": "box filter by the integer factor side // size, then the area-weighted mean "
                                    "of the blocks under each output pixel (bilinear where the photo is smaller)",
                          "normalization": attrs["preprocessing"]},
        "provenance": {"rung": trained.rung.name, "stage": trained.rung.stage, "backbone": attrs["backbone"],
                       "weights": attrs["weights"], "weights_sha256": attrs["weights_sha256"],
                       "layer": trained.inputs.layer, "features_key": attrs["key"], "model_key": trained.key,
                       "model_params": meta["params"], "features_params": as_dict(features_params)},
        "metrics": metrics,
        "parity": parity,
    }
    (folder / "model.json").write_text(json.dumps(description, indent=2) + "\n")
    if (folder / "web").is_dir():  # the browser bundle reads the labels and the threshold from its own copy
        (folder / "web" / "model.json").write_text(json.dumps(description, indent=2) + "\n")
