"""Head ``ncm``: nearest class mean (SimpleShot, "CL2N"). Features centred on the train mean and L2-normalised;
a photo's logit for a class is ``-NCM_SCALE`` times its squared distance to the class's mean. No training:
adding photos costs their features and a mean."""
from __future__ import annotations

from typing import Literal

import numpy as np

from pipeline.training.heads.base import Head, HeadParams, centred_unit, dense_logits, register
from pipeline.vectors import unit_rows

NCM_SCALE = 10.0  # logits = -scale * squared distance to a class mean; calibration rescales them anyway


class NCMParams(HeadParams):
    model: Literal["ncm"] = "ncm"


@register
class NCMHead(Head):
    Params = NCMParams
    summary = "nearest class mean: no training, seconds to add photos or classes"

    def fit(self, X, y, log=None):
        X = self.embed(X).astype(np.float64)
        self.mean_ = X.mean(axis=0)
        unit = unit_rows(X - self.mean_)
        self.n_classes_ = int(y.max()) + 1
        self.centroids_ = np.stack([unit[y == k].mean(axis=0) for k in range(self.n_classes_)])
        self.history_ = {"photos_per_class": np.bincount(y, minlength=self.n_classes_).tolist()}
        return self

    def _linear(self) -> tuple[np.ndarray, np.ndarray]:
        # -s * |u - c|^2 = 2s u.c - s|c|^2 - s (|u| = 1: the same for every class, so dropped)
        return 2 * NCM_SCALE * self.centroids_.T, -NCM_SCALE * np.sum(self.centroids_ ** 2, axis=1)

    def decision_function(self, X) -> np.ndarray:
        kernel, bias = self._linear()
        return unit_rows(self.embed(X).astype(np.float64) - self.mean_) @ kernel + bias

    def keras_layers(self, x, input_shape):
        return x, dense_logits(centred_unit(x, self.mean_), *self._linear())
