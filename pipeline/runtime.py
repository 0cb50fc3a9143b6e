"""Photos on disk in, the frozen backbone's activations at one layer out: the features stage and
predict both run photos through here, so a photo is decoded, resized and featurised one way.

``open_backbone`` picks what runs the frozen part (``features.runtime``):
- ``litert``: LiteRT with XNNPACK, converted once and checked against Keras (``backbones.litert``);
  the decoding threads resize with OpenCV (``data.resize``), no TensorFlow op in them;
- ``keras``: the TensorFlow model through a traced call; decoding threads resize with the Keras
  ``FitToSize`` layer.
``layer="image"`` is the input itself (decoded and resized, no backbone): the fine-tuned network's input.

``featurise_files`` overlaps decoding (``features.workers`` threads, a bounded window) with the
backbone, so memory holds a window of decoded photos whatever their number.
"""
from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.backbones.keras_models import weights_fingerprint
from pipeline.backbones.registry import BACKBONES
from pipeline.data.decode import ImageError, decode_rgb
from pipeline.layout import input_size  # noqa: F401  (the input size, for callers of runtime)
from pipeline.params import FeaturesParams

IMAGE = "image"  # the layer name of the network's input: resized photos, nothing frozen
# The views of a photo that the features stage can cache, applied to the resized input (S, S, 3);
# the exported model applies the same ones (``use.export``).
VIEWS = {"original": lambda image: image, "hflip": lambda image: image[:, ::-1]}


@dataclass
class ImageRunner:
    """No backbone: the resized photo is the input (for the fine-tuned network)."""

    input_size: int
    weights_sha256: str = ""

    @property
    def feature_shape(self) -> tuple:
        return (self.input_size, self.input_size, 3)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return images


def gpu_visible() -> bool:
    """A GPU this process may use, without importing TensorFlow: an NVIDIA driver, and devices not hidden."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return Path("/proc/driver/nvidia/gpus").is_dir() and visible not in ("", "-1")


def resolve_runtime(f: FeaturesParams) -> str:
    """``features.runtime``, with ``auto`` decided here: Keras where a GPU is visible, LiteRT elsewhere."""
    if f.runtime != "auto":
        return f.runtime
    return "keras" if gpu_visible() else "litert"


def draft_size(f: FeaturesParams) -> int:
    """What ``decode_rgb`` may shrink a JPEG to while decoding: twice the input size with ``decode: reduced``,
    the input size with ``decode: draft``, 0 (the whole photo) with ``full``."""
    return {"reduced": 2 * input_size(f), "draft": input_size(f)}.get(f.decode, 0)


def open_backbone(f: FeaturesParams, weights_dir: Path, layer: str | None = None):
    """What runs the frozen part up to ``layer`` (default ``f.layer``): ``.predict((B, S, S, 3) float32)
    -> (B, *feature_shape)``, ``.input_size``, ``.weights_sha256``, ``.feature_shape``. Converted backbones
    are read from and kept in ``weights_dir`` (``layout.weights_dir``); an int8 one is calibrated on
    ``calibration_images`` once, when it is first converted."""
    layer = layer or f.layer
    if layer == IMAGE:
        return ImageRunner(input_size(f))
    if resolve_runtime(f) == "litert":
        from pipeline.backbones import litert

        spec = BACKBONES[f.backbone]
        return litert.LiteRTEngine(f.backbone, weights_fingerprint(spec, f.weights), layer, input_size(f),
                                   weights_dir, lambda: build_keras(f, weights_dir, layer), f.precision,
                                   calibration_images(f))
    return build_keras(f, weights_dir, layer)


def calibration_images(f: FeaturesParams):
    """For ``precision: int8``, a function giving the conversion's calibration set: photos every machine
    makes offline (``data.generic``), resized as the backbone's input. None for float32."""
    if f.precision != "int8":
        return None

    def images():
        from pipeline.backbones.litert import INT8_CALIBRATION_PHOTOS
        from pipeline.data import generic

        to_input = resizer(f, input_size(f))
        return [to_input(photo) for photo in generic.photos(INT8_CALIBRATION_PHOTOS)]

    return images


def build_keras(f: FeaturesParams, weights_dir: Path, layer: str | None = None):
    """The frozen Keras backbone up to ``layer`` (imports TensorFlow)."""
    from pipeline.backbones import keras_models

    return keras_models.build(f.backbone, f.weights, layer or f.layer, f.image_size, weights_dir)


def resizer(f: FeaturesParams, size: int):
    """(H, W, 3) uint8 -> (size, size, 3) float32 0..255, the way ``f.runtime`` does it."""
    if resolve_runtime(f) == "litert":
        from pipeline.backbones.litert import keep_freed_memory
        from pipeline.data.resize import fit_to_size

        keep_freed_memory()  # every photo allocates fresh arrays of about a megabyte
        return partial(fit_to_size, size=size, mode=f.resize)
    from pipeline.data.resize_layer import single_image_resizer

    return single_image_resizer(size, f.resize)


def decode_file(path, draft: int, resize, max_pixels: int):
    """(the backbone's input (S, S, 3) float32, None) or (None, the reason it cannot be used).
    ``path``: a file, or a file object holding its bytes."""
    try:
        return resize(decode_rgb(path, draft, max_pixels)), None
    except ImageError as error:
        return None, str(error)


def prefetched(function, items, workers: int, window: int):
    """``map(function, items)`` on a thread pool, in order, with at most ``window`` items in flight."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def featurise_files(paths, runner, f: FeaturesParams, views=("original",), whole: bool = False):
    """Yield ``((len(views), *feature_shape) activations or None, error or None)`` per path, in order.
    ``whole``: decode every photo whole, as an app does, whatever ``features.decode`` says."""
    to_input = resizer(f, runner.input_size)
    draft = 0 if whole else draft_size(f)
    decoded = prefetched(lambda path: decode_file(path, draft, to_input, f.max_pixels), paths,
                         workers=f.workers, window=2 * f.batch_size + f.workers)
    pending: list = []  # (image or None, error or None), images not yet run

    def flush():
        images = [image for image, _ in pending if image is not None]
        # (B * V, S, S, 3) float32 0..255 -> (B, V, *feature_shape), inference mode
        if images:
            batch = np.stack([VIEWS[view](image) for image in images for view in views])
            activations = runner.predict(batch)
            outputs = iter(activations.reshape(len(images), len(views), *activations.shape[1:]))
        else:
            outputs = iter([])
        results = [(next(outputs), None) if image is not None else (None, error) for image, error in pending]
        pending.clear()
        return results

    for item in decoded:
        pending.append(item)
        if sum(image is not None for image, _ in pending) == f.batch_size:
            yield from flush()
    yield from flush()
