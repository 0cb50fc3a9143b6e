"""Run the frozen backbone with LiteRT (TFLite) and its XNNPACK CPU kernels.

On a 2-core CPU, XNNPACK runs EfficientNet-Lite0 about twice as fast as TensorFlow. Feeding it
from threads that run TensorFlow ops loses the gain (the thread pools fight over the cores), so
on this path the decoding threads use only Pillow and OpenCV (``resize.fit_to_size``). Measured
here on 1,000 ordinary JPEGs: 150 img/s with one decoding thread, 122 img/s with decoding in a
worker process (shipping each 600 KB image between processes cost more than it saved).

The backbone is converted once from Keras (``model.export(format="litert")``) into
``cache/weights/`` and checked against Keras on the first batch before it is used
(``TOLERANCE``); a mismatch is an error, never a silently different cache.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger("pipeline.litert")

TOLERANCE = 1e-4  # max |LiteRT - Keras| over the features of the check images
THREADS = 2


def interpreter(path: Path, threads: int = THREADS):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=threads)


def _export(model, path: Path) -> Path:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.tflite")
        model.export(str(tmp), format="litert", verbose=False)
        os.replace(tmp, path)
    return path


def backbone_file(backbone, cache_dir: Path) -> Path:
    name = f"{backbone.spec.name}-{backbone.weights_sha256[:16]}-{backbone.layer}-{backbone.input_size}.tflite"
    return _export(backbone.model, cache_dir / "weights" / name)


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
            self.interpreter.resize_tensor_input(self.input, (1, *images.shape[1:]))
            self.interpreter.allocate_tensors()
            self.batch = 1
        rows = []
        for image in images:
            self.interpreter.set_tensor(self.input, np.ascontiguousarray(image[None], dtype=np.float32))
            self.interpreter.invoke()
            rows.append(self.interpreter.get_tensor(self.output)[0].copy())
        return np.stack(rows)


def check(keras_backbone, litert: LiteRTBackbone, samples: np.ndarray) -> float:
    """Max |LiteRT - Keras| over ``samples``; raises RuntimeError above TOLERANCE."""
    expected = keras_backbone.predict(samples)
    got = litert.predict(samples)
    difference = float(np.abs(expected - got).max())
    if not difference <= TOLERANCE:
        raise RuntimeError(f"the LiteRT backbone differs from Keras by {difference:.2g} (> {TOLERANCE:g}) on "
                           "sample images; set features.runtime: keras")
    log.info("features: LiteRT backbone matches Keras within %.1e on %d images", difference, len(samples))
    return difference


def keep_freed_memory() -> None:
    """Ask glibc to serve large arrays from the heap instead of fresh mmaps.

    Every decoded image allocates a few arrays of about a megabyte; by default glibc maps each one
    anew and the first touch of every page faults. Raising the mmap threshold (and the trim
    threshold with it) doubled the decode-and-resize rate of a worker here (101 -> 205 img/s)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: only slower
        pass
