"""Head ``knn``: the ``k`` nearest training photos by cosine similarity (centred features) vote, each with its
similarity (so that ties are rare), ``k`` at most the smallest class's photos (more neighbours than that
would outvote a small class by its size alone); probabilities are the votes with add-half smoothing, so
that no class is ever exactly 0."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from pipeline.training.heads.base import Head, HeadParams, centred_unit, register
from pipeline.vectors import nearest, unit_rows


class KNNParams(HeadParams):
    model: Literal["knn"] = "knn"
    k: int = Field(10, gt=0, description="neighbours that vote (cosine similarity of centred features)")


@register
class KNNHead(Head):
    Params = KNNParams
    summary = "the k nearest train photos vote"

    def __init__(self, k=10):
        self.k = k

    def fit(self, X, y, log=None):
        X = self.embed(X).astype(np.float64)
        self.mean_ = X.mean(axis=0)
        self.bank_ = unit_rows(X - self.mean_).astype(np.float32)  # (N, D)
        self.labels_ = np.asarray(y, np.int32)
        self.n_classes_ = int(y.max()) + 1
        self.k_ = int(min(self.k, np.min(np.bincount(y, minlength=self.n_classes_))))
        self.history_ = {"k": self.k_}
        return self

    def decision_function(self, X) -> np.ndarray:
        unit = unit_rows(self.embed(X).astype(np.float64) - self.mean_).astype(np.float32)
        k = self.k_
        neighbours, similarities = nearest(unit, self.bank_, k)
        votes = np.zeros((len(unit), self.n_classes_))
        rows = np.repeat(np.arange(len(unit)), neighbours.shape[1])
        np.add.at(votes, (rows, self.labels_[neighbours].ravel()), np.maximum(similarities, 0).ravel())
        return np.log((votes + 0.5) / (k + 0.5 * self.n_classes_))

    def keras_layers(self, x, input_shape):
        from pipeline.training.layers import NeighbourVotes

        unit = centred_unit(x, self.mean_)
        logits = NeighbourVotes(self.bank_, self.labels_, self.n_classes_, self.k_, name="logits")(unit)
        return x, logits
