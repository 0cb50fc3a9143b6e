"""Stage `train-head`: the first rung. A shallow classifier on the cached features, never on the photos.

Reads only the features stage's cache (the backbone is never built). Two models:
- ``logreg``: scikit-learn StandardScaler + LogisticRegression (optionally C by CV on train).
  It holds the train split's features in memory: (N, D) float32, 5 KB a photo for Lite0's 1280;
- ``softmax``: a Keras Dense softmax layer (dropout, L2, Adam, early stopping on val), optionally
  after new hidden layers, streamed from the cache a batch at a time (memory flat in N).
The test split feeds no choice. Everything else (key, reuse, class check, saving) is the rung
contract's (``training.contract``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.params import Params
from pipeline.stages import features
from pipeline.tf_import import keras as quiet_keras
from pipeline.training import keras_fit
from pipeline.training.classifiers import KerasClassifier, LogRegClassifier
from pipeline.training.contract import FitJob, Rung
from pipeline.store.table import CacheError
from pipeline.training.inputs import CachedInputs

# Bump when a head trained with the same params and features would come out different.
VERSION = 2


def open_inputs(params: Params, base: Path) -> CachedInputs:
    path = features.cache_file(params, base)
    inputs = CachedInputs(path, missing=f"no cached features at {path}; run 'make features' first")
    if inputs.views != params.features.views:
        raise CacheError(f"{path.name} holds the views {list(inputs.views)}, features.views asks for "
                         f"{list(params.features.views)}; run 'make features'")
    return inputs


def build_softmax(input_shape, n_classes: int, p):
    """[GlobalAveragePooling2D for spatial inputs] -> [Dropout -> Dense(relu)] per hidden layer ->
    Dropout -> Dense(softmax), L2 on every kernel."""
    keras = quiet_keras()
    from keras import layers

    inputs = keras.Input(tuple(input_shape), name="features")
    x = layers.GlobalAveragePooling2D(name="pool")(inputs) if len(input_shape) == 3 else inputs
    regularizer = keras.regularizers.L2(p.l2) if p.l2 else None
    for i, units in enumerate(p.hidden_units):  # new hidden layers, trained from scratch
        x = layers.Dropout(p.dropout, name=f"dropout_{i}")(x)
        x = layers.Dense(units, activation="relu", kernel_regularizer=regularizer, name=f"hidden_{i}")(x)
    x = layers.Dropout(p.dropout, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="softmax", kernel_regularizer=regularizer)(x)
    return keras.Model(inputs, outputs, name="head")


def fit(inputs: CachedInputs, job: FitJob):
    p, train = job.params.train_head, job.train
    if p.model == "logreg":
        x = inputs.read(train.positions)  # (N, D): scikit-learn's lbfgs wants the whole train split
        search = {"C_grid": p.C_grid, "cv_folds": p.cv_folds} if p.search_C else None
        head = LogRegClassifier.fit(x, train.labels, inputs.classes, p.C, p.class_weight, p.max_iter, search, p.seed,
                                    job.log)
        head.history["train_accuracy"] = float(np.mean(np.argmax(head.predict_proba(x), axis=1) == train.labels))
        return head
    keras = quiet_keras()
    keras.utils.set_random_seed(p.seed)
    model = build_softmax(inputs.shape, len(inputs.classes), p)
    phases = [keras_fit.Phase("head", p.epochs, p.learning_rate, lambda model: None)]
    history = keras_fit.fit(model, inputs, train, job.val, phases, batch_size=p.batch_size, patience=p.patience,
                            class_weight=p.class_weight, seed=p.seed, backup=job.backup, log=job.log)
    return KerasClassifier(model, inputs.classes, history)


RUNG = Rung(name="head", stage="train-head", section="train_head", version=VERSION,
            summary="train the head on the cached features (never runs the backbone)",
            input_stage="features", open_inputs=open_inputs, fit=fit)
run = RUNG.train
