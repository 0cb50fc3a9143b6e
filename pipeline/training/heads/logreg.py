"""Head ``logreg``: standardised features and scikit-learn's ``LogisticRegression`` (lbfgs).

``C: auto`` chooses C from ``C_grid``: the best balanced accuracy on the val split (ties: the lower log
loss) along a warm-started path, each fit starting from the last; with fewer than ``MIN_VAL_FOR_C``
val photos, by k-fold CV on train. ``search_C``: by k-fold CV on train over the whole grid. The fitted
standardisation and regression are kept as plain arrays, so predict, the app and export answer with
numpy alone. BLAS runs on one thread while fitting: NumPy's and SciPy's OpenBLAS pools fight over two
cores otherwise (a fit was 4x slower here at 700 photos).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from pipeline.training.classifiers import softmax
from pipeline.training.heads.base import Head, HeadError, HeadParams, dense_logits, folds, register

MIN_VAL_FOR_C = 20  # fewer val photos than this: C auto is chosen by k-fold CV on train instead
PATH_PATIENCE = 2  # C auto on val: the path stops after this many larger Cs without a better val score
PATH_TOL = 1e-3  # lbfgs tolerance along the path (the final fit at the chosen C uses scikit-learn's 1e-4)
TOL = 1e-4  # scikit-learn's default
GRID = (0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0, 31.6, 100.0)


class LogRegParams(HeadParams):
    model: Literal["logreg"] = "logreg"
    C: float | Literal["auto"] = Field("auto", description=(
        "inverse L2 strength; auto: chosen from C_grid on the val split along a warm-started path (k-fold CV on "
        "train with fewer than 20 val photos)"))
    search_C: bool = Field(False, description="true: choose C from C_grid by k-fold CV on the train split (slower)")
    C_grid: tuple[float, ...] = Field(GRID, min_length=1, description="candidates for C: auto and search_C")
    cv_folds: int = Field(5, ge=2, description="folds for search_C (capped by the smallest class)")
    max_iter: int = Field(2000, gt=0, description="lbfgs iterations")

    @model_validator(mode="after")
    def _check(self):
        if not isinstance(self.C, str) and self.C <= 0:
            raise ValueError(f"C must be > 0 or auto, got {self.C}")
        if any(c <= 0 for c in self.C_grid):
            raise ValueError("C_grid values must be > 0")
        return self


@register
class LogRegHead(Head):
    Params = LogRegParams
    summary = "logistic regression on standardised features"
    uses_val = True

    def __init__(self, C="auto", class_weight="balanced", max_iter=2000, search_C=False, C_grid=GRID, cv_folds=5,
                 seed=0):
        self.C, self.class_weight, self.max_iter = C, class_weight, max_iter
        self.search_C, self.C_grid, self.cv_folds, self.seed = search_C, C_grid, cv_folds, seed

    def fit(self, X, y, log=None, X_val=None, y_val=None):
        from sklearn.preprocessing import StandardScaler

        X = self.embed(X).astype(np.float64)
        y = np.asarray(y)
        if np.count_nonzero(np.bincount(y)) < 2:
            raise HeadError("train_head: logistic regression needs photos of at least 2 classes")
        self.history_: dict = {}
        scaler = StandardScaler().fit(X)
        self.mean_, self.scale_ = scaler.mean_, scaler.scale_
        x = self._standard(X)
        C, start = self.C, None
        if self.search_C:
            C = self._cv_C(X, y, log)
        elif C == "auto":
            C, start = self._auto_C(X, x, y, X_val, y_val, log)
        model = self._regression(float(C), TOL, x, y, start)
        self.coef_, self.intercept_ = model.coef_.copy(), model.intercept_.copy()
        self.history_["iterations"] = int(np.max(model.n_iter_))
        self.n_classes_ = int(y.max()) + 1
        return self

    def _regression(self, C: float, tol: float, x, y, start=None):
        """A ``LogisticRegression`` at ``C`` fitted on standardised rows (``start``: a fitted one to warm-start
        from)."""
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        model = LogisticRegression(C=C, class_weight="balanced" if self.class_weight == "balanced" else None,
                                   max_iter=self.max_iter, tol=tol, warm_start=start is not None)
        if start is not None:
            model.coef_, model.intercept_ = start.coef_.copy(), start.intercept_.copy()
        with threadpool_limits(1, user_api="blas"):
            return model.fit(x, y)

    def _standard(self, X) -> np.ndarray:
        return (np.asarray(X, np.float64) - self.mean_) / self.scale_

    def _choose(self, scores: list, how: str, log) -> float:
        """The C of the best (balanced accuracy, -log loss) among the Cs tried; recorded in ``history_``."""
        tried = [i for i in range(len(self.C_grid)) if scores[i] is not None]
        best = max(tried, key=lambda i: (round(scores[i][0], 6), -scores[i][1]))
        chosen = float(self.C_grid[best])
        self.history_.update({"chosen_C": chosen, "chosen_C_by": how})
        if log is not None:
            log(f"C={chosen:g} chosen {how} (balanced accuracy {scores[best][0]:.4f})")
        return chosen

    def _cv_scores(self, X, y, tol: float, error: str) -> tuple[list, int]:
        """Each C's (balanced accuracy, log loss) averaged over stratified k-fold CV on (X, y)."""
        from sklearn.preprocessing import StandardScaler

        splits, per_fold = folds(y, self.cv_folds, self.seed, error), []
        for a, b in splits:  # each fold standardised on its own train rows
            scaler = StandardScaler().fit(X[a])
            per_fold.append(self._path_scores(scaler.transform(X[a]), y[a], scaler.transform(X[b]), y[b], tol)[0])
        return [tuple(np.mean([fold[i][j] for fold in per_fold]) for j in range(2))
                for i in range(len(self.C_grid))], len(splits)

    def _cv_C(self, X, y, log) -> float:
        scores, k = self._cv_scores(X, y, TOL, "train_head.search_C needs at least 2 train photos per class; add "
                                              "photos or set train_head.search_C: false")
        self.history_["cv_folds"] = k
        self.history_["cv_balanced_accuracy"] = {repr(c): float(s[0]) for c, s in zip(self.C_grid, scores)}
        return self._choose(scores, f"by {k}-fold CV on train", log)

    def _auto_C(self, X, x, y, X_val, y_val, log):
        """C from ``C_grid`` (on val along a warm-started path, or by k-fold CV on train when val is small),
        and the path's fit at that C on the whole train split (a start for the final fit) when there is one."""
        if X_val is not None and len(y_val) >= MIN_VAL_FOR_C:
            scores, fits = self._path_scores(x, y, self._standard(self.embed(X_val)), np.asarray(y_val), PATH_TOL,
                                             patience=PATH_PATIENCE)
            how = f"on {len(y_val)} val photos"
        else:
            fits = {}
            try:
                scores, k = self._cv_scores(X, y, PATH_TOL, "fewer than 2 train photos in a class")
            except HeadError:
                self.history_["chosen_C_by"] = "none: fewer than 2 train photos in a class; C = 1"
                return 1.0, None
            how = f"by {k}-fold CV on train ({0 if y_val is None else len(y_val)} val photos)"
        chosen = self._choose(scores, how, log)
        self.history_["C_path"] = {repr(c): {"balanced_accuracy": float(s[0]), "log_loss": float(s[1])}
                                   for c, s in zip(self.C_grid, scores) if s is not None}
        return chosen, fits.get(chosen)

    def _path_scores(self, x, y, x_val, y_val, tol: float, patience: int | None = None) -> tuple[list, dict]:
        """(balanced accuracy, log loss) on (x_val, y_val) of a fit on (x, y) at each C of ``C_grid``, in
        increasing C, each fit starting from the previous one's weights; and those fits by C. ``patience``: stop
        once that many Cs in a row did not beat the best so far (the larger Cs are the slow fits: None)."""
        from sklearn.metrics import balanced_accuracy_score, log_loss

        out, fits, best, since, fitted = {}, {}, None, 0, None
        classes = np.arange(int(y.max()) + 1)
        for c in sorted(self.C_grid):
            fitted = fits[c] = self._regression(c, tol, x, y, fitted)
            p = softmax(_logits(fitted.coef_, fitted.intercept_, x_val))
            out[c] = (float(balanced_accuracy_score(y_val, p.argmax(axis=1))), float(log_loss(y_val, p, labels=classes)))
            key = (round(out[c][0], 6), -out[c][1])
            best, since = (key, 0) if best is None or key > best else (best, since + 1)
            if patience is not None and since >= patience:
                break
        return [out.get(c) for c in self.C_grid], fits

    def _linear(self) -> tuple[np.ndarray, np.ndarray]:
        """The standardisation and the regression as one affine map: (kernel (D, K), bias (K,)), float64
        (a binary regression's one row becomes the columns [0, z]: the same softmax)."""
        coef, intercept = self.coef_, self.intercept_
        if coef.shape[0] == 1:
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.array([0.0, intercept[0]])
        kernel = (coef / self.scale_).T
        bias = intercept - (self.mean_ / self.scale_) @ coef.T
        return kernel, bias

    def decision_function(self, X) -> np.ndarray:
        kernel, bias = self._linear()
        return self.embed(X).astype(np.float64) @ kernel + bias

    def keras_layers(self, x, input_shape):
        return x, dense_logits(x, *self._linear())


def _logits(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(N, K) logits of standardised rows; two classes: [0, z] (the same softmax as scikit-learn's)."""
    z = np.asarray(x, np.float64) @ coef.T + intercept
    return np.hstack([np.zeros_like(z), z]) if coef.shape[0] == 1 else z
