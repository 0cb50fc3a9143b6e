"""A small demo dataset built from the photographs that scikit-image ships (no download).

Three classes, each made of varied crops, flips and colour changes of one photograph: enough to
run every stage in a minute, far too easy to say anything about accuracy. It is a demo.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import generic

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
            variant = generic.variant(photo, rng)
            if not target.exists():
                variant.save(target, quality=90)
    (out / "README.txt").write_text(
        "Demo dataset: crops, flips and colour changes of three scikit-image photographs "
        "(chelsea, coffee, rocket). For trying the pipeline only; its accuracy means nothing.\n"
    )
    return out
