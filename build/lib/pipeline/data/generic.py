"""Photos any machine can make offline: the int8 backbone's calibration set.

Varied crops, flips and colour changes of the photographs scikit-image ships (in colour: an
astronaut, a cat, coffee, a rocket, a telescope field, stained tissue, a retina; in gray: a
cameraman, the moon, coins, brick, grass, gravel, a clock, cells). They depend on no user's photos,
so the int8 backbone calibrated on them is converted once per machine and serves every project.
``bench/int8.py`` measures what this costs against calibrating on each dataset's own photos.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

NAME = "scikit-image-v1"  # part of the int8 backbone's file name and of the features cache key
COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
GRAY = ("camera", "moon", "coins", "brick", "grass", "gravel", "clock", "cell")


def photos(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` (H, W, 3) uint8 RGB photos, the same on every machine."""
    from skimage import data

    sources = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in COLOUR + GRAY]
    rng = np.random.default_rng(seed)
    return [np.asarray(variant(sources[i % len(sources)], rng)) for i in range(count)]


def variant(photo: Image.Image, rng) -> Image.Image:
    """A random crop (45-95% of each side), maybe mirrored, brightness and saturation changed, shrunk by 0.8."""
    width, height = photo.size
    scale = rng.uniform(0.45, 0.95)
    w, h = int(width * scale), int(height * scale)
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    image = photo.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    return image.resize((int(w * 0.8), int(h * 0.8)))
