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
    trained: object  # stages.contract.Trained
    draft: int  # the features stage's DCT draft size, for decoding calibration photos as it did
    size: int  # the backbone's input size


@dataclass(frozen=True)
class ExportFormat:
    name: str  # the file or folder written in export.dir
    write: Callable  # (keras model, folder, WriteJob) -> None: writes folder / name
    # (path) -> ((1, H, W, 3) uint8 -> ((n_classes,) probabilities, score)); None: a bundle of files checked
    # elsewhere (the browser bundle runs model.onnx, checked as its own format, and the tests run the page)
    runner: Callable | None
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


OUTPUTS = ("probabilities", "score")  # every format's output names: (1, n_classes) and (1,)


def split_outputs(outputs: dict) -> tuple[np.ndarray, float]:
    """(probabilities (n_classes,), score) of one photo from an exported model's outputs, by name."""
    probabilities, score = (np.asarray(outputs[name]) for name in OUTPUTS)
    return probabilities[0].astype(np.float64), float(score[0])


# ---- Keras ---------------------------------------------------------------------------------------------

def _write_keras(model, folder: Path, job: WriteJob) -> None:
    model.save(folder / "model.keras")


def traced(model):
    """A Keras model's call as one traced function for photos of every size (an eager call costs ~10x)."""
    import tensorflow as tf

    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda x: split_outputs({k: v.numpy() for k, v in call(tf.constant(x)).items()})


def _run_keras(path: Path):
    import keras

    import pipeline.training.layers  # noqa: F401  (registers FitToSize and the guard's layers for loading)

    return traced(keras.saving.load_model(path))


# ---- SavedModel ----------------------------------------------------------------------------------------

def _write_saved_model(model, folder: Path, job: WriteJob) -> None:
    model.export(str(folder / "saved_model"), format="tf_saved_model", verbose=False)


def _run_saved_model(path: Path):
    import tensorflow as tf

    serving = tf.saved_model.load(str(path)).signatures["serve"]
    return lambda x: split_outputs({k: v.numpy() for k, v in serving(tf.constant(x)).items()})


# ---- TFLite (LiteRT) -----------------------------------------------------------------------------------

TFLITE_METADATA = "photohead"  # the name of the model's metadata entry holding labels and threshold (JSON)


def described(job: WriteJob) -> dict:
    """What an app needs besides the outputs, carried inside the files that allow it."""
    guard = job.trained.guard
    return {"labels": list(job.trained.classes), "threshold": float(guard.threshold), "reject_label": guard.label,
            "model_key": job.trained.key,
            "outputs": "probabilities (1, classes), calibrated, in labels order; score (1,): answer reject_label "
                       "when above threshold"}


def with_tflite_metadata(data: bytes, job: WriteJob) -> bytes:
    """The TFLite flatbuffer with a metadata entry ``TFLITE_METADATA``: ``described(job)`` as JSON."""
    import json

    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(described(job)).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = TFLITE_METADATA, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def tflite_metadata(path: Path) -> dict:
    """The ``TFLITE_METADATA`` entry of a TFLite file written by export."""
    import json

    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    entry = next(m for m in model.metadata if m.name.decode() == TFLITE_METADATA)
    return json.loads(bytes(model.buffers[entry.buffer].data))


def _write_tflite(model, folder: Path, job: WriteJob) -> None:
    model.export(str(folder / "model.tflite"), format="litert", verbose=False)
    (folder / "model.tflite").write_bytes(with_tflite_metadata((folder / "model.tflite").read_bytes(), job))


def tflite_interpreter(path: Path):
    """LiteRT's interpreter (ai-edge-litert)."""
    from pipeline.backbones.litert import interpreter

    return interpreter(path)


def _run_tflite(path: Path):
    # the signature runner: inputs and outputs by name, the input resized to each photo's shape
    runner = tflite_interpreter(path).get_signature_runner("serving_default")
    return lambda x: split_outputs(runner(image=x))


def _quantized_writer(mode: str) -> Callable:
    def write(model, folder: Path, job: WriteJob) -> None:
        from pipeline.use.quantize import quantized

        saved_model = folder / "saved_model"
        if not saved_model.is_dir():  # the converter reads a SavedModel
            _write_saved_model(model, folder, job)
        (folder / f"model_{mode}.tflite").write_bytes(with_tflite_metadata(quantized(saved_model, mode, job), job))

    return write


# ---- ONNX ----------------------------------------------------------------------------------------------

ONNX_OPSET = 17  # onnxruntime 1.16+ and onnxruntime-web run it


def _write_onnx(model, folder: Path, job: WriteJob) -> None:
    """tf2onnx from the Keras model's traced call (its public ``from_function``), the labels, rejection
    threshold and label in the file's ``metadata_props``."""
    import tensorflow as tf
    import tf2onnx

    @tf.autograph.experimental.do_not_convert
    def serve(image):
        return model(image, training=False)

    signature = [tf.TensorSpec((None, None, None, 3), tf.uint8, name="image")]
    proto, _ = tf2onnx.convert.from_function(tf.function(serve), input_signature=signature, opset=ONNX_OPSET)
    for key, value in described(job).items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = "\n".join(value) if key == "labels" else repr(value) if key == "threshold" else value
    (folder / "model.onnx").write_bytes(proto.SerializeToString())


def _run_onnx(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: split_outputs(dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"image": x}))))


register(ExportFormat("model.keras", _write_keras, _run_keras))
register(ExportFormat("saved_model", _write_saved_model, _run_saved_model))
register(ExportFormat("model.tflite", _write_tflite, _run_tflite))
register(ExportFormat("model.onnx", _write_onnx, _run_onnx))


# ---- the browser bundle --------------------------------------------------------------------------------

def _write_web(model, folder: Path, job: WriteJob) -> None:
    from pipeline.use import web

    if not (folder / "model.onnx").is_file():
        _write_onnx(model, folder, job)
    web.write(folder / "web", folder / "model.onnx", job.project.weights_dir.parent)


register(ExportFormat("web", _write_web, None, wanted=lambda export_params: export_params.web))
for _mode in ("dynamic", "int8"):
    register(ExportFormat(f"model_{_mode}.tflite", _quantized_writer(_mode), _run_tflite, quantized=True,
                          wanted=lambda export_params, mode=_mode: export_params.quantize == mode))
