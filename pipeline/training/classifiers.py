"""The classifiers a rung trains, behind one face (scikit-learn's habits: learned state ends in ``_``):

    classes                  class names, in the order of the probability columns
    history                  what training recorded (epochs, CV scores, seconds, accuracies)
    predict_proba(x)         (N, *input shape) float32 -> (N, n_classes) float64
    as_keras(input_shape)    an equivalent Keras model, input -> probabilities (for export)
    save(folder) / load(folder, meta, history)

- ``LogRegClassifier``: StandardScaler + LogisticRegression (scikit-learn);
- ``KerasClassifier``: any Keras model from the rung's input to probabilities (the softmax head,
  the top blocks with their softmax, the whole fine-tuned network).
Evaluate, predict, export and compare use only this face: they never ask which rung made it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.tf_import import keras as quiet_keras

CALL_BYTES = 256 << 20  # activations of one direct Keras call, about (taken as 16x its input: blocks expand 6x)


class LogRegClassifier:
    """StandardScaler + LogisticRegression on flattened inputs; ``predict_proba`` columns follow ``classes``."""

    kind = "logreg"

    def __init__(self, pipeline, classes: list[str], history: dict):
        self.pipeline_ = pipeline
        self.classes = list(classes)
        self.history = history

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, classes: list[str], C: float, class_weight: str, max_iter: int,
            search: dict | None = None, seed: int = 0, log=None) -> "LogRegClassifier":
        """``x``: (N, ...) train rows in memory; ``y``: (N,) class numbers. ``search``: {C_grid, cv_folds}."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = x.reshape(len(x), -1)
        names = np.array(classes)[y]
        model = make_pipeline(StandardScaler(), LogisticRegression(
            C=C, class_weight="balanced" if class_weight == "balanced" else None, max_iter=max_iter))
        history: dict = {}
        if search:
            smallest = int(np.min(np.unique(y, return_counts=True)[1]))
            folds = min(search["cv_folds"], smallest)
            if folds < 2:
                raise ValueError("train_head.search_C needs at least 2 train images per class")
            grid = GridSearchCV(model, {"logisticregression__C": list(search["C_grid"])}, scoring="balanced_accuracy",
                                cv=StratifiedKFold(folds, shuffle=True, random_state=seed), n_jobs=1)
            grid.fit(x, names)
            model = grid.best_estimator_
            history["cv_folds"] = folds
            history["cv_balanced_accuracy"] = {
                repr(c): float(s) for c, s in zip(search["C_grid"], grid.cv_results_["mean_test_score"])}
            history["chosen_C"] = float(grid.best_params_["logisticregression__C"])
            if log is not None:
                log(f"C={history['chosen_C']:g} chosen by {folds}-fold CV on train")
        else:
            model.fit(x, names)
        return cls(model, list(classes), history)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        proba = self.pipeline_.predict_proba(x.reshape(len(x), -1))
        order = [list(self.pipeline_.classes_).index(c) for c in self.classes]
        return proba[:, order]

    def as_keras(self, input_shape):
        """The scaler and the logistic regression folded into one Dense softmax layer."""
        keras = quiet_keras()
        from keras import layers

        scaler = self.pipeline_.named_steps["standardscaler"]
        regression = self.pipeline_.named_steps["logisticregression"]
        coef = regression.coef_.astype(np.float64)  # (K, D), or (1, D) for two classes
        intercept = regression.intercept_.astype(np.float64)
        if coef.shape[0] == 1:  # binary: p(class 1) = sigmoid(z) = softmax([0, z])[1]
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.array([0.0, intercept[0]])
        scale = scaler.scale_.astype(np.float64)
        kernel = (coef / scale).T  # (D, K): standardise then project, in one matrix
        bias = intercept - (scaler.mean_ / scale) @ coef.T
        order = [list(regression.classes_).index(c) for c in self.classes]
        inputs = keras.Input(tuple(input_shape), name="features")
        x = layers.Flatten(name="flatten")(inputs) if len(input_shape) > 1 else inputs
        dense = layers.Dense(len(self.classes), activation="softmax", name="softmax")
        outputs = dense(x)
        dense.set_weights([kernel[:, order].astype(np.float32), bias[order].astype(np.float32)])
        return keras.Model(inputs, outputs, name="head")

    def save(self, folder: Path) -> None:
        import joblib

        joblib.dump(self.pipeline_, folder / "classifier.joblib")

    @classmethod
    def load(cls, folder: Path, meta: dict, history: dict) -> "LogRegClassifier":
        import joblib

        return cls(joblib.load(folder / "classifier.joblib"), meta["classes"], history)


class KerasClassifier:
    """A Keras model from the rung's input to class probabilities."""

    kind = "keras"

    def __init__(self, model, classes: list[str], history: dict):
        self.model_ = model
        self.classes = list(classes)
        self.history = history

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        # Direct calls (predict() would retrace for every new batch size), in slices small enough
        # that the activations inside spatial blocks stay bounded.
        rows = max(1, CALL_BYTES // max(1, 4 * int(np.prod(x.shape[1:])) * 16))
        blocks = [np.asarray(self.model_(np.asarray(x[i:i + rows], np.float32), training=False), dtype=np.float64)
                  for i in range(0, len(x), rows)]
        return np.concatenate(blocks) if blocks else np.zeros((0, len(self.classes)))

    def as_keras(self, input_shape):
        return self.model_

    def save(self, folder: Path) -> None:
        self.model_.save(folder / "classifier.keras")

    @classmethod
    def load(cls, folder: Path, meta: dict, history: dict) -> "KerasClassifier":
        keras = quiet_keras()

        return cls(keras.saving.load_model(folder / "classifier.keras"), meta["classes"], history)


KINDS = {c.kind: c for c in (LogRegClassifier, KerasClassifier)}


def save(classifier, meta: dict, folder: Path) -> None:
    """Into an empty folder: the classifier, ``history.json`` and ``model.json`` (its provenance)."""
    classifier.save(folder)
    (folder / "history.json").write_text(json.dumps(classifier.history, indent=2))
    (folder / "model.json").write_text(json.dumps({**meta, "classifier": classifier.kind}, indent=2))


def load(folder: Path):
    """A saved classifier, ready for ``predict_proba``."""
    meta = json.loads((folder / "model.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    return KINDS[meta["classifier"]].load(folder, meta, history)
