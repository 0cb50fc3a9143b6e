"""``FitToSize`` with OpenCV and numpy, for the LiteRT runtime's decoding threads (no TensorFlow op in them).

The same operation as the Keras layer ``resize_layer.FitToSize``, on each axis of ``n`` pixels:
1. a box filter by the integer factor ``f = max(1, n // size)``: the mean of complete f-pixel
   blocks (OpenCV's INTER_AREA at an exact integer factor);
2. then exactly ``size`` pixels, output pixel ``i`` covering the source span
   ``[i * n / size, (i + 1) * n / size)``: where the axis shrinks, the area-weighted mean of the 2 or 3
   blocks under that span (a span past the last complete block reads the last one); where it grows,
   bilinear interpolation with half-pixel centres.
Every output pixel averages the same span of the photo whatever the resolution it was decoded at,
so a JPEG decoded at a reduced DCT scale (the features stage) and decoded whole (an app) give
nearly the same pixels. Float32; it agrees with the Keras layer within 0.01 on the 0..255 scale.
"""
from __future__ import annotations

import cv2
import numpy as np

cv2.setNumThreads(1)  # one image per call on each decoding thread: no thread pool of its own


def taps(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel of one axis of ``n`` source pixels: 3 indices into the box-filtered axis and
    their weights, (size, 3) int64 and float32."""
    f = max(1, n // size)
    blocks = n // f
    r = n / (f * size)  # box pixels per output pixel: in [1, 2) when shrinking, < 1 when growing
    i = np.arange(size, dtype=np.float64)[:, None]
    k = np.arange(3, dtype=np.float64)[None, :]
    if r >= 1:
        start = i * r
        index = np.floor(start) + k
        weights = np.maximum(0.0, np.minimum(start + r, index + 1) - np.maximum(start, index)) / r
    else:
        source = (i + 0.5) * r - 0.5
        first = np.floor(source)
        fraction = source - first
        index = first + k
        weights = np.concatenate([1 - fraction, fraction, np.zeros_like(fraction)], axis=1)
    return np.clip(index, 0, blocks - 1).astype(np.int64), weights.astype(np.float32)


def fit_to_size(image: np.ndarray, size: int, mode: str = "squash") -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) float32 in 0..255."""
    x = image
    height, width = x.shape[:2]
    if mode == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        x = x[top:top + side, left:left + side]
        height = width = side
    fy, fx = max(1, height // size), max(1, width // size)
    rows, cols = height // fy, width // fx
    x = np.ascontiguousarray(x[: rows * fy, : cols * fx], dtype=np.float32)
    if fy > 1 or fx > 1:
        x = cv2.resize(x, (cols, rows), interpolation=cv2.INTER_AREA)  # exact block means
    index, weights = taps(height, size)
    x = np.einsum("skhc,sk->shc", x[index], weights)
    index, weights = taps(width, size)
    x = np.einsum("hskc,sk->hsc", x[:, index], weights)
    return np.ascontiguousarray(x, dtype=np.float32)
