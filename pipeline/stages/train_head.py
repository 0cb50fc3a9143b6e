"""Stage `train-head`: the first rung. A shallow head on the cached features, never on the photos.

Reads only the features stage's cache (the backbone is never built). The head is the one
``train_head.model`` names in the registry ``training.heads.HEADS`` (logreg, softmax, ncm, knn). Heads that fit
in memory read the train split's features at once ((N, D) float32, 5 KB a photo for Lite0's 1280);
the softmax head streams them from the cache a batch at a time (memory flat in N). The test split
feeds no choice. Everything else (key, reuse, class check, guard, saving) is the rung contract's
(``stages.contract``).
"""
from __future__ import annotations

import numpy as np

from pipeline.stages.contract import FitJob, Rung
from pipeline.training import heads
from pipeline.training.inputs import CachedInputs

# Bump when a head trained with the same params and features would come out different.
VERSION = 5  # 5: the logreg head fits with scikit-learn's LogisticRegression
OUT_OF_FOLD = 5  # folds for out-of-fold logits when the val split is too small to calibrate on


def open_inputs(project) -> CachedInputs:
    path = project.features_file()
    return CachedInputs(path, project.labels_file(path), project.params.features.views,
                        missing=f"no cached features at {path}; run 'make features' first")


def fit(inputs: CachedInputs, job: FitJob):
    train = job.train
    head = heads.from_params(job.params.train_head)
    if head.streams:  # reads the cache a batch at a time
        head.fit_inputs(inputs, train, job.val, job.backup, job.log)
        return head.face(inputs.classes, head.history_)
    x = inputs.read(train.positions)  # (N, D): the whole train split, as scikit-learn wants it
    if head.uses_val:  # a head that chooses a setting on val (logreg's C)
        head.fit(x, train.labels, log=job.log, X_val=inputs.read(job.val.positions), y_val=job.val.labels)
    else:
        head.fit(x, train.labels, log=job.log)
    history = dict(head.history_)
    history["train_accuracy"] = float(np.mean(head.predict(x) == train.labels))
    return head.face(inputs.classes, history)


def out_of_fold(inputs: CachedInputs, job: FitJob, classifier) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) logits of each train photo from the same head fitted on the other folds, and the labels. The
    settings the fitted head chose for itself (logreg's C) are kept, not chosen again in every fold."""
    train = job.train
    x, y = inputs.read(train.positions), train.labels
    splits = heads.folds(y, OUT_OF_FOLD, job.params.train_head.seed,
                   "calibration needs at least 2 train photos per class when the val split has fewer than 20; "
                   "add photos or raise data.val_fraction")
    head = heads.from_params(job.params.train_head)
    if "C" in head.get_params() and "chosen_C" in classifier.history:
        head.set_params(C=classifier.history["chosen_C"], search_C=False)
    logits = np.zeros((len(y), len(inputs.classes)))
    for fit_rows, held_rows in splits:
        fold_head = head.clone().fit(x[fit_rows], y[fit_rows])
        if fold_head.n_classes_ < len(inputs.classes):
            raise heads.HeadError("a fold lost a class; add photos or raise data.val_fraction")
        logits[held_rows] = fold_head.decision_function(x[held_rows])
    job.log(f"out-of-fold logits from {len(splits)} folds of the train split")
    return logits, y


RUNG = Rung(name="head", stage="train-head", section="train_head", version=VERSION,
            summary="train the head on the cached features (never runs the backbone)",
            input_stage="features", open_inputs=open_inputs, fit=fit, out_of_fold=out_of_fold)
run = RUNG.train
