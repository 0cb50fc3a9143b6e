"""Quantised TFLite files of an exported model: dynamic-range int8 weights, or full integer calibrated on
train photos decoded as the features stage decodes them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.decode import ImageError, decode_rgb


def quantized(saved_model: Path, mode: str, job) -> bytes:
    """The TFLite bytes of ``saved_model`` quantised by ``mode`` (dynamic | int8); ``job``: formats.WriteJob."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        converter.representative_dataset = _representative(job)
    return converter.convert()


def _representative(job):
    """Up to export.representative_images train photos, chosen with a fixed seed, and the range samples."""
    project, inputs = job.project, job.trained.inputs
    train = inputs.rows("train").positions
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(len(train), size=min(len(train), project.params.export.representative_images),
                                replace=False))
    paths = inputs.paths(train[chosen])

    def representative():
        first = True
        for path in paths:
            try:
                pixels = decode_rgb(project.data_root / path, job.draft, project.params.features.max_pixels)
            except ImageError:
                continue
            yield [pixels[None]]
            if first:
                first = False
                for extreme in range_samples(pixels, job.size):
                    yield [extreme[None]]

    return representative


def range_samples(pixels: np.ndarray, size: int) -> list[np.ndarray]:
    """Calibration samples that make every tensor of the model's resize reach its full range.

    A full-integer model keeps each tensor's range from calibration. The resize's weights reach 1
    only at some photo sizes (a side that is a multiple of the input size): calibrated on photos of
    other sizes, a weight of 1 would be clipped (a photo made darker). So the calibration also sees
    one photo at twice the input size, contrast-stretched to 0..255, and at half the input size
    (the growing path)."""
    from PIL import Image

    low, high = pixels.min(), pixels.max()
    stretched = ((pixels.astype(np.float32) - low) * (255.0 / max(1, high - low))).round().astype(np.uint8)
    image = Image.fromarray(stretched)
    return [np.asarray(image.resize((2 * size, 2 * size), Image.BOX)),
            np.asarray(image.resize((max(1, size // 2),) * 2, Image.BOX))]
