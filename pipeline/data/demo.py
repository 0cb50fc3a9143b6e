"""A small demo dataset built from the photographs that scikit-image ships (no download).

Three classes, each made of varied crops, flips and colour changes of one photograph: enough to
run every stage in a minute, far too easy to say anything about accuracy. It is a demo.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

# class name -> scikit-image loader name
SOURCES = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}


def build(out: str | Path = "data/demo", per_class: int = 40, seed: int = 0) -> Path:
    """Write ``out/<class>/<n>.jpg``; returns ``out``. Existing files are left as they are."""
    from skimage import data

    out = Path(out)
    rng = np.random.default_rng(seed)
    for label, loader in SOURCES.items():
        photo = Image.fromarray(getattr(data, loader)()).convert("RGB")
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            target = folder / f"{label}_{n:03d}.jpg"
            variant = _variant(photo, rng)
            if not target.exists():
                variant.save(target, quality=90)
    (out / "README.txt").write_text(
        "Demo dataset: crops, flips and colour changes of three scikit-image photographs "
        "(chelsea, coffee, rocket). For trying the pipeline only; its accuracy means nothing.\n"
    )
    return out


def _variant(photo: Image.Image, rng) -> Image.Image:
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
