"""The Keras layers inside an exported model besides Keras' own, registered for ``model.keras``.

``import pipeline.training.layers`` before loading a ``model.keras`` (it also registers the resize,
``data.resize_layer.FitToSize``). SavedModel and LiteRT files need no import.

- ``NeighbourVotes``: the knn head: (N, E) unit vectors -> (N, K) log of the k nearest training
  photos' smoothed votes (the same numbers as ``heads.KNNHead``);
- ``OpenSetScore``: the rejection score of ``training.guard`` from (embedding, logits): how unlike
  the training photos a photo is (higher: less like them).
"""
from __future__ import annotations

import numpy as np

from pipeline.data.resize_layer import FitToSize, keras  # noqa: F401  (registers FitToSize too)

ops = keras.ops


def _constant(layer, name: str, values: np.ndarray, dtype="float32"):
    weight = layer.add_weight(name=name, shape=values.shape, dtype=dtype, trainable=False, initializer="zeros")
    weight.assign(values.astype(dtype))
    return weight


@keras.saving.register_keras_serializable(package="pipeline")
class NeighbourVotes(keras.layers.Layer):
    """Unit vectors (N, E) -> (N, K): log((votes + 0.5) / (k + 0.5 K)) of the ``k`` most similar rows of
    ``bank`` (M, E), each voting for its label with its similarity (0 when negative)."""

    def __init__(self, bank=None, labels=None, n_classes: int = 2, k: int = 10, bank_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.n_classes, self.k = int(n_classes), int(k)
        self.bank_shape = tuple(bank_shape) if bank_shape is not None else tuple(np.shape(bank))
        self._initial = (bank, labels)

    def build(self, input_shape):
        bank, labels = self._initial
        rows, width = self.bank_shape
        self.bank = _constant(self, "bank", np.zeros((rows, width)) if bank is None else np.asarray(bank))
        one_hot = np.zeros((rows, self.n_classes), np.float32)
        if labels is not None:
            one_hot[np.arange(rows), np.asarray(labels)] = 1.0
        self.one_hot = _constant(self, "one_hot", one_hot)

    def call(self, unit):
        similarity = ops.matmul(unit, ops.transpose(self.bank))  # (N, M)
        values, indices = ops.top_k(similarity, self.k)
        weights = ops.maximum(values, 0.0)[:, :, None]  # each neighbour votes with its similarity
        votes = ops.sum(ops.take(self.one_hot, indices, axis=0) * weights, axis=1)  # (N, K)
        return ops.log((votes + 0.5) / (self.k + 0.5 * self.n_classes))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes, "k": self.k, "bank_shape": list(self.bank_shape)}


@keras.saving.register_keras_serializable(package="pipeline")
class OpenSetScore(keras.layers.Layer):
    """[embedding (N, E), logits (N, K)] -> (N,) score, higher for photos less like the training photos.

    kind ``knn``: 1 - the k-th largest cosine similarity to ``bank`` (unit rows);
    ``mahalanobis``: the smallest squared distance to a class mean after ``projection`` (the inverse
    square root of the shared covariance; ``bank`` holds the projected class means);
    ``energy``: -logsumexp(logits); ``msp``: 1 - the largest probability (logits / temperature)."""

    def __init__(self, kind: str = "knn", k: int = 1, temperature: float = 1.0, bank=None, projection=None,
                 bank_shape=None, projection_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.k, self.temperature = kind, int(k), float(temperature)
        self.bank_shape = tuple(bank_shape) if bank_shape is not None else \
            (tuple(np.shape(bank)) if bank is not None else None)
        self.projection_shape = tuple(projection_shape) if projection_shape is not None else \
            (tuple(np.shape(projection)) if projection is not None else None)
        self._initial = (bank, projection)

    def build(self, input_shape):
        bank, projection = self._initial
        if self.bank_shape:
            self.bank = _constant(self, "bank", np.zeros(self.bank_shape) if bank is None else np.asarray(bank))
        if self.projection_shape:
            self.projection = _constant(self, "projection", np.zeros(self.projection_shape) if projection is None
                                        else np.asarray(projection))

    def call(self, inputs):
        embedding, logits = inputs
        if self.kind == "knn":
            unit = embedding / ops.maximum(ops.norm(embedding, axis=1, keepdims=True), 1e-12)
            similarity = ops.matmul(unit, ops.transpose(self.bank))
            values, _ = ops.top_k(similarity, self.k)
            return 1.0 - values[:, self.k - 1]
        if self.kind == "mahalanobis":
            z = ops.matmul(embedding, self.projection)
            squared = (ops.sum(z * z, axis=1, keepdims=True) - 2.0 * ops.matmul(z, ops.transpose(self.bank))
                       + ops.sum(self.bank * self.bank, axis=1)[None, :])
            return ops.min(squared, axis=1)
        if self.kind == "energy":
            return -ops.logsumexp(logits, axis=1)
        return 1.0 - ops.max(ops.softmax(logits / self.temperature, axis=1), axis=1)  # msp

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0],)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "k": self.k, "temperature": self.temperature,
                "bank_shape": list(self.bank_shape) if self.bank_shape else None,
                "projection_shape": list(self.projection_shape) if self.projection_shape else None}
