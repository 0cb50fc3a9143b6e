"""The one resize every path uses: the features stage, predict, and the exported models.

``FitToSize`` turns an RGB image of any size, (N, H, W, 3) uint8 or float, into (N, S, S, 3)
float32 in 0..255:
- ``crop`` first keeps the largest centred square (the shorter side is then scaled to S);
- each axis is shrunk by an integer factor ``f = max(1, side // S)`` with a box filter (the mean
  of f x f blocks: the antialiasing), then bilinear interpolation makes it exactly S x S.

Built only from reshape, mean, slicing and bilinear resize, so it converts to TFLite builtins
(TensorFlow's antialiased resize does not), and the exported model resizes exactly as the
features stage did. That is what makes export parity hold by construction.
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
        x = tf.image.resize(x, (self.size, self.size), method="bilinear", antialias=False)
        return tf.ensure_shape(x, [None, self.size, self.size, 3])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, 3)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "mode": self.mode}


def single_image_resizer(size: int, mode: str):
    """A thread-safe traced function: (H, W, 3) uint8 ndarray -> (size, size, 3) float32 ndarray."""
    layer = FitToSize(size, mode)
    traced = tf.function(lambda image: layer(image[None])[0],
                         input_signature=[tf.TensorSpec((None, None, 3), tf.uint8)])
    return lambda image: traced(image).numpy()
