"""Command `advise`: which rung of the ladder suits this dataset, and why.

The rule of thumb of transfer learning, made concrete. ``recommend`` is a pure function of a
dataset summary, so its thresholds are tested directly:

- fewer than ``TOP_MIN`` images in the smallest class: train only a new head on frozen features
  (``make train-head``): more trainable weights would overfit;
- from ``TOP_MIN`` to ``FINETUNE_MIN``: also train the backbone's last blocks (``make train-top``);
- ``FINETUNE_MIN`` or more: enough data to fine-tune every layer from the pretrained start.

Within the head rung, with at most ``NCM_MAX`` train images in the smallest class, the nearest
class mean (``train_head.model: ncm``) measured better than the logistic regression and the softmax
head (bench/open_set.py's few-shot table, README), so it is the head advised there.

The smallest class decides, because the rarest class is the first one a bigger model overfits.
Very small images (median shorter side under ``SMALL_SIDE`` pixels) are upscaled ~4x to the input
size; that is noted, and argues for the frozen rungs too.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

TOP_MIN = 300  # train images in the smallest class from which train-top pays
FINETUNE_MIN = 2000  # ... from which fine-tuning everything pays
SMALL_SIDE = 64
NCM_MAX = 10  # train images in the smallest class up to which ncm is the head advised (bench/open_set.py)


@dataclass(frozen=True)
class Summary:
    train_per_class: dict[str, int]
    median_short_side: int | None = None  # pixels, of a sample of images


@dataclass(frozen=True)
class Advice:
    rung: str  # "head", "top" or "finetune"
    command: str
    reasons: tuple[str, ...]
    head: str | None = None  # for the head rung: the train_head.model advised


def recommend(summary: Summary) -> Advice:
    counts = summary.train_per_class
    smallest_class = min(counts, key=counts.get)
    smallest = counts[smallest_class]
    reasons = [f"{len(counts)} classes, {sum(counts.values())} training images; the smallest class "
               f"({smallest_class}) has {smallest}"]
    head = None
    if smallest < TOP_MIN:
        rung, command = "head", "make train-head"
        reasons.append(f"under {TOP_MIN} per class: train only a new head on frozen features; training "
                       "backbone layers as well would fit the few examples rather than the task")
        head = "ncm" if smallest <= NCM_MAX else "logreg"
        if head == "ncm":
            command = 'make train-head SET="train_head.model=ncm"'
            reasons.append(f"at most {NCM_MAX} per class: the nearest class mean (train_head.model: ncm) measured "
                           "better than a trained head with this few photos, and adding photos costs only a mean")
    elif smallest < FINETUNE_MIN:
        rung, command = "top", "make train-top"
        reasons.append(f"{TOP_MIN} to {FINETUNE_MIN - 1} per class: enough to also train the last blocks of the "
                       "backbone from their pretrained weights, on cached activations at the cut point")
    else:
        rung, command = "finetune", "make finetune"
        reasons.append(f"{FINETUNE_MIN} or more per class: enough data to fine-tune every layer from the "
                       "pretrained initialisation")
    if summary.median_short_side is not None and summary.median_short_side < SMALL_SIDE:
        reasons.append(f"the images are small (median shorter side {summary.median_short_side} px): they are "
                       "upscaled to the input size, which favours frozen features")
    return Advice(rung, command, tuple(reasons), head)


def summarise(dataset, sample: int = 200) -> Summary:
    """Counts per class in the train split, and the median shorter side of up to ``sample`` images."""
    from pipeline.data.decode import open_image

    counts = {c: 0 for c in dataset.classes}
    for record in dataset.records:
        if record.split == "train":
            counts[record.label] += 1
    sides = []
    step = max(1, len(dataset.records) // sample)
    for record in dataset.records[::step][:sample]:
        try:
            with open_image(dataset.root / record.path) as image:
                sides.append(min(image.size))
        except OSError:
            continue
    return Summary(counts, int(statistics.median(sides)) if sides else None)


def format_advice(advice: Advice) -> str:
    lines = [f"recommended rung: {advice.rung}  ->  {advice.command}, or train.strategy: {advice.rung}"
             + (f" and train_head.model: {advice.head}" if advice.head and advice.head != "logreg" else "")]
    lines += [f"  - {reason}" for reason in advice.reasons]
    lines.append(f"  thresholds: head below {TOP_MIN} train images in the smallest class (ncm up to {NCM_MAX}), "
                 f"train-top below {FINETUNE_MIN}, fine-tuning from {FINETUNE_MIN}")
    return "\n".join(lines)
