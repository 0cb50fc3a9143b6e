"""The export formats, as a registry: one entry each says how to write the format, how to run it for the
parity check, whether it is quantised, and for which params it is written.

Adding a format is one entry here (``register``): ``export`` writes every format whose ``wanted``
says so, checks each against the pipeline with its ``runner`` (float formats within
``export.tolerance``, quantised ones on the top-1 label and the accept/reject decision), and lists
it in model.json. Nothing else names the formats.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class WriteJob:
    """What a format's writer gets besides the model and the folder."""

    project: object  # pipeline.project.Project
    trained: object  # training.contract.Trained
    draft: int  # the features stage's DCT draft size, for decoding calibration photos as it did
    size: int  # the backbone's input size


@dataclass(frozen=True)
class ExportFormat:
    name: str  # the file or folder written in export.dir
    write: Callable  # (keras model, folder, WriteJob) -> None: writes folder / name
    runner: Callable  # (path) -> ((1, H, W, 3) uint8 -> ((n_classes,) probabilities, score))
    quantized: bool = False  # checked on the top-1 label and the decision, not within the float tolerance
    wanted: Callable = lambda export_params: True  # (params.export) -> whether export writes it


FORMATS: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"export format {fmt.name!r} is registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


@contextlib.contextmanager
def registered(fmt: ExportFormat):
    """``fmt`` in the registry for the ``with`` block only (tests, plug-ins)."""
    register(fmt)
    try:
        yield fmt
    finally:
        FORMATS.pop(fmt.name, None)


def wanted(export_params) -> list[ExportFormat]:
    return [fmt for fmt in FORMATS.values() if fmt.wanted(export_params)]


def split_outputs(outputs) -> tuple[np.ndarray, float]:
    """(probabilities (n_classes,), score) of one photo from an exported model's two outputs, in whatever
    order or container a format returns them: the probabilities are the 2-D one, the score the 1-D one."""
    arrays = [np.asarray(o) for o in (outputs.values() if isinstance(outputs, dict) else outputs)]
    probabilities = next(a for a in arrays if a.ndim == 2)
    score = next(a for a in arrays if a.ndim == 1)
    return probabilities[0].astype(np.float64), float(score[0])


# ---- Keras ---------------------------------------------------------------------------------------------

def _write_keras(model, folder: Path, job: WriteJob) -> None:
    model.save(folder / "model.keras")


def _run_keras(path: Path):
    import keras

    import pipeline.training.layers  # noqa: F401  (registers FitToSize and the guard's layers for loading)

    reloaded = keras.saving.load_model(path)
    return lambda x: split_outputs(reloaded(x, training=False))


# ---- SavedModel ----------------------------------------------------------------------------------------

def _write_saved_model(model, folder: Path, job: WriteJob) -> None:
    model.export(str(folder / "saved_model"), format="tf_saved_model", verbose=False)


def _run_saved_model(path: Path):
    import tensorflow as tf

    serving = tf.saved_model.load(str(path)).signatures["serve"]
    return lambda x: split_outputs({k: v.numpy() for k, v in serving(tf.constant(x)).items()})


# ---- TFLite (LiteRT) -----------------------------------------------------------------------------------

def _write_tflite(model, folder: Path, job: WriteJob) -> None:
    model.export(str(folder / "model.tflite"), format="litert", verbose=False)


def tflite_interpreter(path: Path):
    """LiteRT's interpreter (ai-edge-litert)."""
    from pipeline.backbones.litert import interpreter

    return interpreter(path)


def _run_tflite(path: Path):
    interpreter = tflite_interpreter(path)
    input_index = interpreter.get_input_details()[0]["index"]
    shape = [None]

    def run(x):
        if shape[0] != x.shape:
            interpreter.resize_tensor_input(input_index, x.shape)
            interpreter.allocate_tensors()
            shape[0] = x.shape
        interpreter.set_tensor(input_index, x)
        interpreter.invoke()
        return split_outputs([interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()])

    return run


def _quantized_writer(mode: str) -> Callable:
    def write(model, folder: Path, job: WriteJob) -> None:
        from pipeline.use.quantize import quantized

        saved_model = folder / "saved_model"
        if not saved_model.is_dir():  # the converter reads a SavedModel
            _write_saved_model(model, folder, job)
        (folder / f"model_{mode}.tflite").write_bytes(quantized(saved_model, mode, job))

    return write


register(ExportFormat("model.keras", _write_keras, _run_keras))
register(ExportFormat("saved_model", _write_saved_model, _run_saved_model))
register(ExportFormat("model.tflite", _write_tflite, _run_tflite))
for _mode in ("dynamic", "int8"):
    register(ExportFormat(f"model_{_mode}.tflite", _quantized_writer(_mode), _run_tflite, quantized=True,
                          wanted=lambda export_params, mode=_mode: export_params.quantize == mode))
