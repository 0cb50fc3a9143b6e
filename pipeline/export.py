"""Command `export`: one self-contained model, in every format, proven to answer like the pipeline.

The exported Keras model takes one RGB image of any size, ``(1, H, W, 3)`` uint8 (or a batch of
same-sized images), and returns class probabilities ``(N, n_classes)``. Inside: ``FitToSize``
(the features stage's own resize), the frozen backbone with its normalisation, and the head (a
logistic-regression head is folded into one Dense softmax layer).

Files in ``export.dir`` (default ``models/``): ``model.keras``, ``saved_model/`` (signature
``serve``), ``model.tflite`` (float32), optionally ``model_dynamic.tflite`` or
``model_int8.tflite``, ``labels.txt`` and ``model.json``. They are written to a temporary folder
and moved into place only after the parity check on the test split passed.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import feature_store, trained
from pipeline.fingerprint import replaced_folder
from pipeline.images import ImageError, decode_rgb
from pipeline.params import Params, as_dict
from pipeline.predict import features_params_of

log = logging.getLogger("pipeline.export")
FORMAT_VERSION = 1


class ExportError(RuntimeError):
    """An export that does not answer like the pipeline; nothing was written."""


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    files: dict  # name -> size in bytes
    parity: dict  # format -> {"max_abs_diff" | "top1_agreement", "n_images"}


def build_export_model(backbone, head_model, size: int, resize: str):
    """uint8 (N, H, W, 3) -> probabilities (N, n_classes)."""
    from pipeline.preprocessing import FitToSize, keras

    image = keras.Input((None, None, 3), dtype="uint8", name="image")
    x = FitToSize(size, resize, name="fit_to_size")(image)
    if backbone is not None:  # None: head_model takes the resized image itself (fine-tuned network)
        x = backbone.model(x, training=False)
    probabilities = head_model(x, training=False)
    return keras.Model(image, probabilities, name="classifier")


def run(params: Params, base: str | Path = ".") -> ExportResult:
    from pipeline import backbones

    base = Path(base)
    current = trained.load_current(params, base)
    attrs = current.features_attrs
    f = features_params_of(attrs)
    backbone = backbones.build(f.backbone, f.weights, f.layer, f.image_size, base / params.paths.cache_dir)
    if backbone.weights_sha256 != attrs["weights_sha256"]:
        raise ExportError(f"the backbone's weights differ from those of {current.features_file.name}; "
                          "run 'make features' and 'make train-head' again")
    if current.rung == "finetune":  # one network from resized image to probabilities
        model = build_export_model(None, current.model.image_model(), backbone.input_size, f.resize)
    else:
        head_model = current.model.as_keras(tuple(attrs["feature_shape"]))
        model = build_export_model(backbone, head_model, backbone.input_size, f.resize)

    samples = _test_samples(params, base, current)
    if not samples:
        raise ExportError("no test images to check parity on; set data.test_fraction > 0")
    tolerance = params.export.tolerance
    if attrs["dtype"] == "float16":
        tolerance = max(tolerance, 2e-3)  # the reference itself went through float16 storage
        log.info("export: float16 feature cache; parity tolerance widened to %g", tolerance)

    target = base / params.export.dir
    with replaced_folder(target) as tmp:  # moved into place only after parity held
        files = _write_formats(model, tmp, params, base, current)
        parity = _check_parity(tmp, model, samples, tolerance, params.export.min_top1_agreement)
        _write_metadata(tmp, params, base, current, backbone, f, parity)
    sizes = {name: _size(target / name) for name in files}
    for name, size in sizes.items():
        log.info("export: %-22s %8.1f MB", name, size / 1e6)
    return ExportResult(target, sizes, parity)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@dataclass
class _Sample:
    path: str
    pixels: np.ndarray  # (H, W, 3) uint8, as the features stage decoded it
    reference: np.ndarray  # (n_classes,) the pipeline's probabilities from the cached features


def _test_samples(params: Params, base: Path, current) -> list[_Sample]:
    """Test images that still have the bytes they were cached with, with the pipeline's answer."""
    import hashlib

    table = feature_store.read_table(current.features_file)
    mask = table.splits == "test"
    root = base / params.data.root
    size = int(table.attrs["input_size"])
    samples, changed = [], 0
    if current.rung == "finetune":
        reference = current.model.predict_files([root / p for p in table.paths[mask]])
    else:
        reference = current.model.predict_proba(table.features[mask])
    for path, sha, probabilities in zip(table.paths[mask], table.sha256[mask], reference):
        file = root / path
        try:
            if hashlib.sha256(file.read_bytes()).hexdigest() != sha:
                changed += 1
                continue
            samples.append(_Sample(path, decode_rgb(file, size), probabilities))
        except (OSError, ImageError):
            changed += 1
    if changed:
        log.warning("export: %d test image(s) changed or missing since 'make features'; checked the other %d",
                    changed, len(samples))
    return samples


def _write_formats(model, folder: Path, params: Params, base: Path, current) -> list[str]:
    files = ["model.keras", "saved_model", "model.tflite"]
    model.save(folder / "model.keras")
    model.export(str(folder / "saved_model"), format="tf_saved_model", verbose=False)
    model.export(str(folder / "model.tflite"), format="litert", verbose=False)
    quantize = params.export.quantize
    if quantize != "none":
        name = f"model_{quantize}.tflite"
        (folder / name).write_bytes(_quantized(folder / "saved_model", quantize, params, base, current))
        files.append(name)
    (folder / "labels.txt").write_text("\n".join(current.classes) + "\n")
    return files + ["labels.txt", "model.json"]


def _quantized(saved_model: Path, mode: str, params: Params, base: Path, current) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        table = feature_store.read_table(current.features_file)
        paths = table.paths[table.splits == "train"]
        rng = np.random.default_rng(0)
        chosen = rng.choice(len(paths), size=min(len(paths), params.export.representative_images), replace=False)
        size = int(table.attrs["input_size"])
        root = base / params.data.root

        def representative():
            for i in sorted(chosen):
                try:
                    yield [decode_rgb(root / paths[i], size)[None]]
                except ImageError:
                    continue

        converter.representative_dataset = representative
    return converter.convert()


class _Runners:
    """Each exported format as a function: (1, H, W, 3) uint8 -> (n_classes,) probabilities."""

    def __init__(self, folder: Path, live_model):
        import keras
        import tensorflow as tf

        import pipeline.preprocessing  # noqa: F401  (registers FitToSize for loading)

        self.formats = {"keras (in memory)": lambda x: np.asarray(live_model(x, training=False))[0]}
        reloaded = keras.saving.load_model(folder / "model.keras")
        self.formats["model.keras"] = lambda x: np.asarray(reloaded(x, training=False))[0]
        serving = tf.saved_model.load(str(folder / "saved_model")).signatures["serve"]
        self.formats["saved_model"] = lambda x: next(iter(serving(tf.constant(x)).values())).numpy()[0]
        for path in sorted(folder.glob("*.tflite")):
            self.formats[path.name] = _tflite_runner(path)


def tflite_interpreter(path: Path):
    """LiteRT's interpreter (ai-edge-litert), with TensorFlow's as a fallback."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - ai-edge-litert is a dependency
        from tensorflow.lite import Interpreter
    return Interpreter(model_path=str(path), num_threads=2)


def _tflite_runner(path: Path):
    interpreter = tflite_interpreter(path)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    shape = [None]

    def run(x):
        if shape[0] != x.shape:
            interpreter.resize_tensor_input(input_index, x.shape)
            interpreter.allocate_tensors()
            shape[0] = x.shape
        interpreter.set_tensor(input_index, x)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)[0].astype(np.float64)

    return run


def _check_parity(folder: Path, model, samples: list[_Sample], tolerance: float, min_agreement: float) -> dict:
    runners = _Runners(folder, model)
    report, failures = {}, []
    for name, runner in runners.formats.items():
        started = time.perf_counter()
        outputs = np.stack([runner(s.pixels[None]) for s in samples])
        references = np.stack([s.reference for s in samples])
        diff = np.abs(outputs - references).max(axis=1)
        agree = outputs.argmax(axis=1) == references.argmax(axis=1)
        quantized = name.startswith(("model_dynamic", "model_int8"))
        entry = {"n_images": len(samples), "max_abs_diff": float(diff.max()), "top1_agreement": float(agree.mean()),
                 "seconds": time.perf_counter() - started}
        report[name] = entry
        ok = entry["top1_agreement"] >= min_agreement if quantized else entry["max_abs_diff"] <= tolerance
        if quantized:
            log.info("export: parity %-20s top-1 agreement %.2f%% on %d test images", name,
                     100 * entry["top1_agreement"], len(samples))
        else:
            log.info("export: parity %-20s max |diff| %.2e on %d test images", name, entry["max_abs_diff"],
                     len(samples))
        if not ok:
            worst = np.argsort(-diff)[:3] if not quantized else np.flatnonzero(~agree)[:3]
            names = ", ".join(f"{samples[i].path} ({diff[i]:.2g})" for i in worst)
            limit = f"max |diff| {entry['max_abs_diff']:.2g} > {tolerance:g}" if not quantized else \
                f"top-1 agreement {100 * entry['top1_agreement']:.1f}% < {100 * min_agreement:g}%"
            failures.append(f"{name}: {limit}; worst: {names}")
    if failures:
        raise ExportError("export does not answer like the pipeline, nothing written: " + " | ".join(failures))
    return report


def _write_metadata(folder: Path, params: Params, base: Path, current, backbone, features_params, parity) -> None:
    metrics_path = base / params.paths.reports_dir / "metrics.json"
    metrics = None
    if metrics_path.is_file():
        recorded = json.loads(metrics_path.read_text())
        if recorded.get("head", {}).get("key") == current.key:  # only metrics of this very model
            metrics = {k: recorded[k] for k in ("accuracy", "balanced_accuracy", "n_test")}
    head_meta = json.loads((current.path / "head.json").read_text())
    attrs = current.features_attrs
    description = {
        "format_version": FORMAT_VERSION,
        "classes": current.classes,
        "input": {"shape": [None, None, None, 3], "dtype": "uint8", "color": "RGB, upright (EXIF applied)",
                  "note": "one image of any size per call, or a batch of same-sized images"},
        "output": {"shape": [None, len(current.classes)], "dtype": "float32", "meaning": "class probabilities"},
        "preprocessing": {"resize": features_params.resize, "input_size": backbone.input_size,
                          "method": "box filter by the integer factor side // size, then bilinear",
                          "normalization": attrs["preprocessing"]},
        "provenance": {"rung": current.rung, "backbone": attrs["backbone"], "weights": attrs["weights"],
                       "weights_sha256": attrs["weights_sha256"], "layer": attrs["layer"],
                       "features_key": attrs["key"], "head_key": current.key, "head": head_meta["model"],
                       "head_params": head_meta["params"], "features_params": as_dict(features_params)},
        "metrics": metrics,
        "parity": parity,
    }
    (folder / "model.json").write_text(json.dumps(description, indent=2) + "\n")
