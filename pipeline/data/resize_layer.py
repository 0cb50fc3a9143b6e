"""The one resize every path uses: the features stage, predict, and the exported models.

``FitToSize`` turns an RGB image of any size, (N, H, W, 3) uint8 or float, into (N, S, S, 3)
float32 in 0..255:
- ``crop`` first keeps the largest centred square (the shorter side is then scaled to S);
- each axis is shrunk by an integer factor ``f = max(1, side // S)`` with a box filter (the mean
  of f x f blocks);
- then each axis becomes exactly S, output pixel i covering the source span [i n / S, (i + 1) n / S):
  by area averaging where it shrinks (the 2 or 3 box pixels under the span, weighted by overlap),
  by bilinear interpolation (half-pixel centres) where it grows.
Every output pixel averages the same span of the photo whatever resolution it was decoded at, so
a JPEG decoded at a reduced DCT scale (the features stage) and decoded whole (an app) end close to
the same pixels.

Built only from reshape, mean, slicing, range arithmetic and gathers, so it converts to TFLite
builtins (TensorFlow's antialiased resize does not), and the exported model resizes as the
features stage did. ``data/resize.py`` is its OpenCV twin.
"""
from __future__ import annotations

from pipeline.tf_import import keras as _quiet_keras

keras = _quiet_keras()
import tensorflow as tf  # noqa: E402

RESIZE_MODES = ("squash", "crop")


@keras.saving.register_keras_serializable(package="pipeline")
class FitToSize(keras.layers.Layer):
    """(N, H, W, 3) any size, uint8 or float -> (N, size, size, 3) float32, values kept in 0..255."""

    def __init__(self, size: int, mode: str = "squash", **kwargs):
        super().__init__(**kwargs)
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
        self.size = int(size)
        self.mode = mode

    def call(self, images):
        x = tf.cast(images, tf.float32)
        shape = tf.shape(x)
        height, width = shape[1], shape[2]
        if self.mode == "crop":
            side = tf.minimum(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            x = x[:, top:top + side, left:left + side, :]
            height = width = side
        fy = tf.maximum(1, height // self.size)
        fx = tf.maximum(1, width // self.size)
        rows, cols = height // fy, width // fx
        x = x[:, : rows * fy, : cols * fx, :]
        x = tf.reshape(x, tf.stack([shape[0], rows, fy, cols, fx, 3]))
        x = tf.reduce_mean(x, axis=[2, 4])
        x = _resample(x, 1, height, self.size)
        x = _resample(x, 2, width, self.size)
        return tf.ensure_shape(x, [None, self.size, self.size, 3])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, 3)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "mode": self.mode}


def _taps(n, size: int):
    """``data.resize.taps`` in TensorFlow ops: per output pixel, 3 indices into the box-filtered axis
    and their weights, (size, 3) int32 and float32, for an axis of ``n`` source pixels.

    Positions are integers (in units of 1/size of a source pixel, 1/(2 size) for bilinear): only the
    weights, all in [0, 1], are floats. A full-integer (int8) export quantises float tensors; a
    position quantised to 8 bits would pick the wrong pixels, a weight loses less than 1/255."""
    f = tf.maximum(1, n // size)
    blocks = n // f
    i = tf.range(size)[:, None]
    k = tf.range(3)[None, :]
    # shrinking: output i spans [i n, (i + 1) n), box j spans [j f size, (j + 1) f size)
    box = f * size
    start, end = i * n, (i + 1) * n
    area_index = start // box + k
    overlap = tf.maximum(0, tf.minimum(end, (area_index + 1) * box) - tf.maximum(start, area_index * box))
    area_weights = tf.cast(overlap, tf.float32) / tf.cast(n, tf.float32)
    # growing (f = 1): source position ((2 i + 1) n - size) / (2 size), bilinear between its neighbours
    twice = (2 * i + 1) * n - size
    # floor(twice / (2 size)) for twice >= -size: divided while non-negative, since ONNX's integer Div
    # truncates toward zero where TensorFlow's floors (tf2onnx converts one to the other)
    first = (twice + 2 * size) // (2 * size) - 1
    fraction = tf.cast(twice - first * 2 * size, tf.float32) / float(2 * size)
    linear_weights = tf.concat([1.0 - fraction, fraction, tf.zeros_like(fraction)], axis=1)
    shrink = n >= size
    index = tf.where(shrink, area_index, first + k)
    weights = tf.where(shrink, area_weights, linear_weights)
    return tf.clip_by_value(index, 0, blocks - 1), weights


def _resample(x, axis: int, n, size: int):
    """Resize the box-filtered ``x`` (N, H, W, 3) along ``axis`` (1 or 2) to ``size`` pixels; ``n`` is
    that axis's length before the box filter."""
    index, weights = _taps(n, size)
    gathered = tf.gather(x, index, axis=axis)  # the axis becomes (size, 3)
    shape = [1, 1, 1, 1, 1]
    shape[axis], shape[axis + 1] = size, 3
    return tf.reduce_sum(gathered * tf.reshape(weights, shape), axis=axis + 1)


def single_image_resizer(size: int, mode: str):
    """A thread-safe traced function: (H, W, 3) uint8 ndarray -> (size, size, 3) float32 ndarray."""
    layer = FitToSize(size, mode)
    traced = tf.function(lambda image: layer(image[None])[0],
                         input_signature=[tf.TensorSpec((None, None, 3), tf.uint8)])
    return lambda image: traced(image).numpy()
