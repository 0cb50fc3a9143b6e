"""The classifiers a rung trains, behind one face (scikit-learn's habits: learned state ends in ``_``):

    classes                  class names, in the order of the logit and probability columns
    history                  what training recorded (epochs, CV scores, seconds, accuracies)
    embed(x)                 (N, *input shape) -> (N, E) float32: what the last layer sees
    logits(x)                (N, *input shape) -> (N, n_classes) float64; ``predict_proba`` is their softmax
    as_keras(input_shape)    the same as a Keras model: input -> [embedding, logits] (for export)
    save(folder) / load(folder, meta, history)

- ``HeadClassifier``: a head of ``training.heads`` with a scikit-learn face (logreg, ncm, knn);
- ``KerasClassifier``: any Keras model from the rung's input whose last layer is a Dense softmax
  named ``softmax`` (the softmax head, the top blocks with their softmax, the fine-tuned network).
Evaluate, predict, export and compare use only this face (through ``training.guard``, which adds
calibration and the rejection score): they never ask which rung or head made it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.tf_import import keras as quiet_keras

CALL_BYTES = 32 << 20  # the activations of one direct Keras call, every layer's output counted (under training's)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits (SciPy's)."""
    from scipy.special import softmax as scipy_softmax

    return scipy_softmax(logits, axis=1)


class HeadClassifier:
    """A fitted head of ``training.heads`` (``embed``, ``decision_function``, ``keras_layers``)."""

    kind = "sklearn"

    def __init__(self, head, classes: list[str], history: dict):
        self.head_ = head
        self.classes = list(classes)
        self.history = history

    def embed(self, x: np.ndarray) -> np.ndarray:
        return self.head_.embed(x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.head_.decision_function(x)

    def logits_of_embedding(self, embedding: np.ndarray) -> np.ndarray:
        return self.head_.decision_function(embedding)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))

    def as_keras(self, input_shape):
        keras = quiet_keras()
        from keras import layers

        inputs = keras.Input(tuple(input_shape), name="features")
        x = layers.Flatten(name="flatten")(inputs) if len(input_shape) > 1 else inputs
        embedding, logits = self.head_.keras_layers(x, input_shape)
        return keras.Model(inputs, [embedding, logits], name="head")

    def save(self, folder: Path) -> None:
        import joblib

        joblib.dump(self.head_, folder / "classifier.joblib")

    @classmethod
    def load(cls, folder: Path, meta: dict, history: dict) -> "HeadClassifier":
        import joblib

        return cls(joblib.load(folder / "classifier.joblib"), meta["classes"], history)


def _output_floats(model) -> int:
    """Floats of every layer's output for one row, nested models' layers included (eager calls keep them)."""
    total = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            total += _output_floats(layer)
        elif not isinstance(layer.output, (list, tuple)):
            total += int(np.prod([d or 1 for d in tuple(layer.output.shape)[1:]]))
    return total


class KerasClassifier:
    """A Keras model from the rung's input to class probabilities, its last layer a Dense named ``softmax``."""

    kind = "keras"

    def __init__(self, model, classes: list[str], history: dict):
        self.model_ = model
        self.classes = list(classes)
        self.history = history
        self._embedder = None
        self._row_bytes = None

    @property
    def embedder(self):
        """input -> what the softmax layer sees (dropout is the identity at inference)."""
        if self._embedder is None:
            keras = quiet_keras()
            self._embedder = keras.Model(self.model_.input, self.model_.get_layer("softmax").input)
        return self._embedder

    @property
    def row_bytes(self) -> int:
        """Bytes of every layer's output for one row: what one row of a direct call holds at most."""
        if self._row_bytes is None:
            self._row_bytes = 4 * max(1, _output_floats(self.embedder))
        return self._row_bytes

    def embed(self, x: np.ndarray) -> np.ndarray:
        # Direct calls (predict() would retrace for every new batch size), in slices whose activations,
        # every layer's output counted, stay within CALL_BYTES (a guess of 16x the input was 13x short for
        # EfficientNet-Lite2's top blocks, 14.6 MB a row: 4.8 GB after a 1.1 GB training).
        rows = max(1, CALL_BYTES // self.row_bytes)
        blocks = [np.asarray(self.embedder(np.asarray(x[i:i + rows], np.float32), training=False), np.float32)
                  for i in range(0, len(x), rows)]
        width = self.model_.get_layer("softmax").get_weights()[0].shape[0]
        return np.concatenate(blocks) if blocks else np.zeros((0, width), np.float32)

    def logits_of_embedding(self, embedding: np.ndarray) -> np.ndarray:
        kernel, bias = self.model_.get_layer("softmax").get_weights()
        return embedding.astype(np.float64) @ kernel.astype(np.float64) + bias

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.logits_of_embedding(self.embed(x))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))

    def as_keras(self, input_shape):
        keras = quiet_keras()
        from keras import layers

        kernel, bias = self.model_.get_layer("softmax").get_weights()
        embedding = self.model_.get_layer("softmax").input
        dense = layers.Dense(kernel.shape[1], name="logits")
        logits = dense(embedding)
        dense.set_weights([kernel, bias])
        return keras.Model(self.model_.input, [embedding, logits], name="classifier_logits")

    def save(self, folder: Path) -> None:
        self.model_.save(folder / "classifier.keras")

    @classmethod
    def load(cls, folder: Path, meta: dict, history: dict) -> "KerasClassifier":
        keras = quiet_keras()

        return cls(keras.saving.load_model(folder / "classifier.keras"), meta["classes"], history)


KINDS = {c.kind: c for c in (HeadClassifier, KerasClassifier)}


def save(classifier, meta: dict, folder: Path) -> None:
    """Into an empty folder: the classifier, ``history.json`` and ``model.json`` (its provenance)."""
    classifier.save(folder)
    (folder / "history.json").write_text(json.dumps(classifier.history, indent=2))
    (folder / "model.json").write_text(json.dumps({**meta, "classifier": classifier.kind}, indent=2))


def load(folder: Path):
    """A saved classifier, ready for ``logits`` and ``predict_proba``."""
    meta = json.loads((folder / "model.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    return KINDS[meta["classifier"]].load(folder, meta, history)
