"""Train a Keras classifier on a rung's inputs, streamed a batch at a time.

One loop for every Keras rung: phases (e.g. the new softmax alone, then the pretrained layers as
well), Adam on sparse cross-entropy, class weights as sample weights, early stopping on the val
loss (best weights kept), and a backup of every epoch (``BackupAndRestore``) plus one per finished
phase, so that an interrupted run continues where it stopped.

The data come from ``keras.utils.PyDataset`` over the rung's inputs: an epoch's order is planned
chunk by chunk (``store.batches.plan``) from the seed and the epoch number, so a resumed run sees the
same batches as an uninterrupted one, and memory holds a few batches whatever the number of rows.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.store.batches import SplitRows
from pipeline.tf_import import keras as quiet_keras


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    learning_rate: float
    trainable: Callable  # (model) -> None: sets which layers learn in this phase


def set_trainable(network, trainable: bool) -> None:
    """``network`` learns or not; its BatchNormalization layers never do: trainable=False keeps them
    in inference mode, so their statistics do not move (a few hundred photos would wreck them)."""
    network.trainable = trainable
    for layer in network.layers:
        if type(layer).__name__ == "BatchNormalization":
            layer.trainable = False


def pretrained_phases(network, epochs_head: int, learning_rate_head: float, epochs_all: int,
                      learning_rate_all: float) -> list[Phase]:
    """The Keras transfer-learning guide's two phases: the new layers alone on the frozen pretrained
    ``network`` (so that large random gradients never reach it), then ``network`` as well, at a low rate."""
    return [Phase("head", epochs_head, learning_rate_head, lambda model: set_trainable(network, False)),
            Phase("all", epochs_all, learning_rate_all, lambda model: set_trainable(network, True))]


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """Per class: scikit-learn's ``balanced`` weights, ``n / (classes present * count)``, the meaning the
    logistic regression gives them too (1 for a class with no train photo, which never weighs); else ones."""
    weights = np.ones(n_classes, np.float32)
    if mode == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(labels)
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights


def dataset(inputs, rows: SplitRows, batch_size: int, shuffle: bool, seed: int, weights: np.ndarray | None,
            workers: int = 1):
    """A ``keras.utils.PyDataset`` of ``(x, y[, sample weight])`` batches over ``rows`` of ``inputs``."""
    keras = quiet_keras()

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=4)
            self.epoch = 0
            self._planned = (None, None)

        def batches(self) -> list[np.ndarray]:
            if self._planned[0] != self.epoch:
                self._planned = (self.epoch, inputs.plan(rows, batch_size, shuffle, seed + 1000 * self.epoch))
            return self._planned[1]

        @property
        def num_batches(self):
            return len(self.batches())

        def __len__(self):
            return self.num_batches

        def __getitem__(self, index):
            positions = self.batches()[index]
            y = rows.labels[np.searchsorted(rows.positions, positions)]
            x = inputs.read(positions)
            return (x, y) if weights is None else (x, y, weights[y])

    return Batches()


@dataclass(frozen=True)
class Schedule:
    """How a Keras rung trains: its phases, and what every phase shares."""

    phases: list  # [Phase]
    batch_size: int
    patience: int  # epochs without a better val loss before a phase stops (0: never early)
    class_weight: str  # balanced | none
    seed: int


def fit(model, inputs, train: SplitRows, val: SplitRows, schedule: Schedule, backup: Path, log=None) -> dict:
    """Train ``model`` phase by phase; returns the history (per phase and concatenated)."""
    keras = quiet_keras()
    phases, batch_size, patience = schedule.phases, schedule.batch_size, schedule.patience
    class_weight, seed = schedule.class_weight, schedule.seed
    n_classes = len(inputs.classes)
    weights = class_weights(train.labels, n_classes, class_weight) if class_weight == "balanced" else None
    workers = getattr(inputs, "workers", 1)
    train_data = dataset(inputs, train, batch_size, True, seed, weights, workers)
    val_data = dataset(inputs, val, batch_size, False, seed, None, workers) if len(val) else None

    class EpochOrder(keras.callbacks.Callback):
        """Each epoch's batch order follows from the seed and the epoch number (resumed runs included)."""

        def on_epoch_begin(self, epoch, logs=None):
            train_data.epoch = epoch

    history: dict = {"phases": {}}
    backup.mkdir(parents=True, exist_ok=True)
    for phase in phases:
        if not phase.epochs:
            continue
        done = backup / f"{phase.name}.done.weights.h5"
        phase.trainable(model)
        model.compile(optimizer=keras.optimizers.Adam(phase.learning_rate), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        if done.is_file():  # finished before an interruption: its weights and history are kept
            model.load_weights(done)
            history["phases"][phase.name] = json.loads(done.with_suffix("").with_suffix(".json").read_text())
            continue
        callbacks = [EpochOrder(), keras.callbacks.BackupAndRestore(str(backup / phase.name))]
        if val_data is not None and patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                                           restore_best_weights=True))
        if log is not None:
            log(f"phase {phase.name}: {sum(int(np.prod(w.shape)) for w in model.trainable_weights):,} trainable "
                f"weights, up to {phase.epochs} epochs, learning rate {phase.learning_rate:g}")
        fitted = model.fit(train_data, validation_data=val_data, epochs=phase.epochs, callbacks=callbacks,
                           verbose=0, shuffle=False)
        curves = {name: [float(v) for v in values] for name, values in fitted.history.items()}
        history["phases"][phase.name] = curves
        model.save_weights(done)
        done.with_suffix("").with_suffix(".json").write_text(json.dumps(curves))
    history["epochs"] = {name: sum((curves.get(name, []) for curves in history["phases"].values()), [])
                         for name in ("loss", "val_loss", "accuracy", "val_accuracy")}
    history["epochs"] = {name: values for name, values in history["epochs"].items() if values}
    history["epochs_run"] = len(history["epochs"].get("loss", []))
    return history


def remove_backup(backup: Path) -> None:
    shutil.rmtree(backup, ignore_errors=True)
