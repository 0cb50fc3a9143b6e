"""Run the frozen backbone with LiteRT (TFLite) and its XNNPACK CPU kernels.

On a 2-core CPU, XNNPACK runs EfficientNet-Lite0 about twice as fast as TensorFlow. Feeding it
from threads that run TensorFlow ops loses the gain (the thread pools fight over the cores), so
on this path the decoding threads use only Pillow and OpenCV (``resize.fit_to_size``). Measured
here on 1,000 ordinary JPEGs: 150 img/s with one decoding thread, 122 img/s with decoding in a
worker process (shipping each 600 KB image between processes cost more than it saved).

The backbone is converted once from Keras (``model.export(format="litert")``) into
``cache/weights/`` and checked against Keras on the first batch of real images before it is used
(``TOLERANCE``); a mismatch is an error, never a silently different cache.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import numpy as np

from pipeline.backbones.registry import BackboneError
from pipeline.data import generic
from pipeline.fingerprint import atomic_write_text, file_sha256

log = logging.getLogger("pipeline.litert")

TOLERANCE = 1e-4  # max |LiteRT - Keras| over the check images, relative to the largest activation (if > 1)
INT8_MIN_COSINE = 0.95  # int8: the least cosine similarity to the float features accepted on any check image
INT8_CALIBRATION_PHOTOS = 200  # int8: photos whose activations set the quantisation ranges
THREADS = 2


def interpreter(path: Path, threads: int = THREADS):
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.tf_import import quiet

    with quiet():
        return Interpreter(model_path=str(path), num_threads=threads)


class LiteRTBackbone:
    """``predict((B, S, S, 3) float32) -> (B, *feature_shape)`` on XNNPACK."""

    def __init__(self, path: Path, threads: int = THREADS):
        self.interpreter = interpreter(path, threads)
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.batch = None

    def predict(self, images: np.ndarray) -> np.ndarray:
        # One image per call: XNNPACK on 2 cores ran Lite0 at 192 img/s with batch 1 and 158 with
        # batch 32 (measured here), so batching only costs memory.
        if self.batch is None:
            from pipeline.tf_import import quiet

            with quiet():  # XNNPACK announces itself here
                self.interpreter.resize_tensor_input(self.input, (1, *images.shape[1:]))
                self.interpreter.allocate_tensors()
            self.batch = 1
        rows = []
        for image in images:
            self.interpreter.set_tensor(self.input, np.ascontiguousarray(image[None], dtype=np.float32))
            self.interpreter.invoke()
            rows.append(self.interpreter.get_tensor(self.output)[0].copy())
        return np.stack(rows)


class LiteRTEngine:
    """The backbone on LiteRT, converted once per (backbone, weights, layer, size, precision) into
    ``cache/weights/``. Its first use checks it against Keras on the first batch of real images and
    writes a sidecar JSON; later runs load the verified file without building the Keras model or
    importing TensorFlow (that keeps small incremental runs cheap).

    ``precision="int8"``: a full-integer model (int8 weights and activations, float input and output),
    its quantisation ranges calibrated on ``calibration()``: ``INT8_CALIBRATION_PHOTOS`` photos that depend on
    no project (``data.generic``), (S, S, 3) float32 each. Checked against the float Keras model by the cosine
    similarity of each check image's features; refused below ``INT8_MIN_COSINE``."""

    def __init__(self, name: str, weights_fingerprint: str, layer: str, input_size: int, weights_dir: Path,
                 build_keras, precision: str = "float32", calibration=None):
        stem = f"{name}-{weights_fingerprint.split(':')[-1][:16]}-{layer}-{input_size}"
        if precision == "int8":
            stem += f"-int8-{generic.NAME}"
        self.path = weights_dir / f"{stem}.tflite"
        self.sidecar = weights_dir / f"{stem}.verified.json"
        self.input_size = input_size
        self.precision = precision
        self.calibration = calibration
        self.keras = None
        info = self._verified()
        if info is None:
            self.keras = build_keras()  # a Backbone
            self._convert()
            self.weights_sha256 = self.keras.weights_sha256
            self.feature_shape = tuple(int(d) for d in self.keras.model.output_shape[1:])
        else:
            self.weights_sha256 = info["weights_sha256"]
            self.feature_shape = tuple(info["feature_shape"])
        self.runner = LiteRTBackbone(self.path)

    def _verified(self) -> dict | None:
        try:
            info = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            return None
        if not self.path.is_file() or info.get("tflite_sha256") != file_sha256(self.path):
            return None  # the conversion changed or is gone since it was checked
        return info

    def _convert(self) -> None:
        if self.path.is_file():
            self.path.unlink()  # not verified: convert again rather than trust it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp.tflite")
        from pipeline.tf_import import quiet

        with quiet():
            if self.precision == "int8":
                tmp.write_bytes(self._int8())
            else:
                self.keras.model.export(str(tmp), format="litert", verbose=False)
        os.replace(tmp, self.path)

    def _int8(self) -> bytes:
        import tempfile

        import tensorflow as tf

        images = list(self.calibration())
        log.info("features: converting the backbone to int8, calibrated on %d variants of scikit-image's "
                 "photographs (once per machine)", len(images))
        self.calibrated_on = len(images)
        with tempfile.TemporaryDirectory() as tmp:
            self.keras.model.export(f"{tmp}/saved_model", format="tf_saved_model", verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(f"{tmp}/saved_model")
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in images)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]  # every op in int8
            return converter.convert()

    def predict(self, images: np.ndarray) -> np.ndarray:
        if self.keras is not None:
            self._check(images[:8])
        return self.runner.predict(images)

    def _check(self, samples: np.ndarray) -> None:
        """Float: max |LiteRT - Keras| over ``samples``, RuntimeError above TOLERANCE. Int8: the cosine
        similarity of each sample's features to the float ones, RuntimeError below INT8_MIN_COSINE.
        Else the sidecar, so that later runs trust the file without TensorFlow."""
        expected = self.keras.predict(samples)
        got = self.runner.predict(samples)
        record = {"tflite_sha256": file_sha256(self.path), "weights_sha256": self.weights_sha256,
                  "feature_shape": list(self.feature_shape), "checked_images": int(len(samples)),
                  "precision": self.precision}
        if self.precision == "int8":
            a, b = expected.reshape(len(samples), -1), got.reshape(len(samples), -1)
            cosine = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            worst = float(cosine.min())
            if not worst >= INT8_MIN_COSINE:
                self.path.unlink(missing_ok=True)
                raise BackboneError(f"the int8 backbone's features differ from the float ones (cosine similarity "
                                   f"{worst:.3f} < {INT8_MIN_COSINE} on a check photo); set features.precision: "
                                   "float32")
            log.info("features: int8 backbone checked against float on %d photos: cosine similarity min %.4f, "
                     "median %.4f", len(samples), worst, float(np.median(cosine)))
            record.update({"min_cosine": worst, "median_cosine": float(np.median(cosine)),
                           "threshold": INT8_MIN_COSINE, "calibration_photos": getattr(self, "calibrated_on", None)})
        else:
            difference = float(np.abs(expected - got).max())
            limit = TOLERANCE * max(1.0, float(np.abs(expected).max()))
            if not difference <= limit:
                raise BackboneError(f"the LiteRT backbone differs from Keras by {difference:.2g} (> {limit:.2g}) on "
                                   "sample images; set features.runtime: keras")
            log.info("features: LiteRT backbone matches Keras within %.1e on %d images", difference, len(samples))
            record.update({"max_abs_difference": difference, "tolerance": TOLERANCE})
        atomic_write_text(self.sidecar, json.dumps(record, indent=2))
        self.keras = None


@functools.cache
def keep_freed_memory() -> None:
    """Ask glibc to serve large arrays from the heap instead of fresh mmaps (once per process: finding
    libc runs ``ldconfig``, milliseconds that a server answering one photo at a time would pay each time).

    Every decoded image allocates a few arrays of about a megabyte; by default glibc maps each one
    anew and the first touch of every page faults. Raising the mmap threshold (and the trim
    threshold with it) doubled the decode-and-resize rate of a worker here (101 -> 205 img/s)."""
    _mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
    _mallopt(-1, 128 * 1024 * 1024)  # M_TRIM_THRESHOLD


@functools.cache
def one_heap() -> None:
    """One glibc heap (arena) for every thread of the process. A server answers each request on whichever
    thread of its pool is free; with one arena per thread, each keeps its own freed megabyte arrays
    (``keep_freed_memory``), and memory rose with requests as more threads touched the model (bench/serve.py:
    283 -> 316 MB over 6,000 requests; with one arena, 274 -> 276)."""
    _mallopt(-8, 1)  # M_ARENA_MAX


def _mallopt(option: int, value: int) -> None:
    try:
        _libc().mallopt(option, value)
    except (OSError, AttributeError, TypeError):  # not glibc: only slower, or larger
        pass


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c"))
