"""The heads of the first rung, one class each, behind scikit-learn's estimator contract.

``__init__`` only stores hyperparameters (``get_params`` / ``set_params`` come from
``BaseEstimator``), ``fit(X, y)`` returns ``self``, learned state ends in ``_``:

    fit(X, y)                X: (N, D) float32 features, y: (N,) class numbers 0..K-1
    decision_function(X)     (N, K) float64 logits; ``predict_proba`` is their softmax
    embed(X)                 (N, E) float32: what the head sees last (the features, or its last hidden layer)
    keras_layers(x, shape)   the same computation as Keras layers: x -> (embedding, logits), for export

``HEADS`` maps ``train_head.model`` to its class; a new head is one class here and one line there
(plus its hyperparameters in ``TrainHeadParams``, marked with ``model="..."``).

- ``logreg``: StandardScaler + LogisticRegression (optionally C by cross-validation on train);
- ``softmax``: a Keras Dense softmax layer (optionally after new hidden layers), trained with Adam;
  its rung streams it from the cache a batch at a time (``fit_inputs``);
- ``ncm``: nearest class mean on centred, L2-normalised features (SimpleShot): no training, a mean
  per class; adding photos costs their features and a mean;
- ``knn``: the k nearest training photos by cosine similarity vote (add-half smoothing).
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator

from pipeline.errors import PipelineError
from pipeline.training.classifiers import normalise, softmax

NCM_SCALE = 10.0  # logits = -scale * squared distance to a class mean; calibration rescales them anyway


class HeadError(PipelineError, ValueError):
    """Data a head cannot fit on (too few photos per class for the folds asked, ...)."""


def _dense_logits(x, kernel: np.ndarray, bias: np.ndarray):
    """A Keras Dense layer named ``logits`` holding a fitted affine map (float64 -> float32 weights)."""
    from keras import layers

    dense = layers.Dense(kernel.shape[1], name="logits")
    logits = dense(x)
    dense.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return logits


def _centred_unit(x, mean: np.ndarray):
    """Keras layers: ``x`` minus the train mean, scaled to unit L2 norm (what ncm and knn compare)."""
    from keras import layers

    centred = layers.Normalization(mean=mean.astype(np.float32), variance=np.ones_like(mean), name="centre")(x)
    return layers.UnitNormalization(name="unit")(centred)


class Head(BaseEstimator):
    """What every head shares: flattened inputs, probabilities as the softmax of the logits."""

    kind = "sklearn"  # how the classifier is saved (classifiers.KINDS)

    def embed(self, X) -> np.ndarray:
        return np.asarray(X, np.float32).reshape(len(X), -1)

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        return np.argmax(self.decision_function(X), axis=1)

    @staticmethod
    def from_params(p) -> "Head":
        """The head ``train_head.model`` names, with its hyperparameters from ``TrainHeadParams``."""
        cls = HEADS[p.model]
        return cls(**{name: getattr(p, name) for name in cls._get_param_names()})


MIN_VAL_FOR_C = 20  # fewer val photos than this: C auto is chosen by k-fold CV on train instead
PATH_PATIENCE = 2  # C auto on val: the path stops after this many larger Cs without a better val score
PATH_TOL = 1e-3  # lbfgs tolerance along the path (the final fit at the chosen C uses scikit-learn's 1e-4)


class LogRegHead(Head):
    """StandardScaler + LogisticRegression. ``C="auto"``: C from ``C_grid``, the best balanced accuracy on
    the val split (ties: the lower log loss) along a warm-started path, each fit starting from the last;
    with fewer than ``MIN_VAL_FOR_C`` val photos, by k-fold CV on train. ``search_C``: by k-fold CV."""

    def __init__(self, C="auto", class_weight="balanced", max_iter=2000, search_C=False,
                 C_grid=(0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0, 31.6, 100.0), cv_folds=5, seed=0):
        self.C, self.class_weight, self.max_iter = C, class_weight, max_iter
        self.search_C, self.C_grid, self.cv_folds, self.seed = search_C, C_grid, cv_folds, seed

    def fit(self, X, y, log=None, X_val=None, y_val=None):
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X = self.embed(X)
        self.history_: dict = {}
        C = self.C
        if C == "auto" and not self.search_C:
            C = self._auto_C(X, y, X_val, y_val, log)
        model = make_pipeline(StandardScaler(), LogisticRegression(
            C=1.0 if C == "auto" else C, class_weight="balanced" if self.class_weight == "balanced" else None,
            max_iter=self.max_iter))
        start = getattr(self, "_path_weights", {}).pop(C, None)
        if start is not None:  # the path's fit at this C on the same rows: the final fit starts from it
            model[-1].set_params(warm_start=True)
            model[-1].coef_, model[-1].intercept_ = start
        self._path_weights = {}
        if self.search_C:
            folds = min(self.cv_folds, int(np.min(np.bincount(y))))
            if folds < 2:
                raise HeadError("train_head.search_C needs at least 2 train images per class")
            grid = GridSearchCV(model, {"logisticregression__C": list(self.C_grid)}, scoring="balanced_accuracy",
                                cv=StratifiedKFold(folds, shuffle=True, random_state=self.seed), n_jobs=1)
            grid.fit(X, y)
            model = grid.best_estimator_
            self.history_["cv_folds"] = folds
            self.history_["cv_balanced_accuracy"] = {
                repr(c): float(s) for c, s in zip(self.C_grid, grid.cv_results_["mean_test_score"])}
            self.history_["chosen_C"] = float(grid.best_params_["logisticregression__C"])
            if log is not None:
                log(f"C={self.history_['chosen_C']:g} chosen by {folds}-fold CV on train")
        else:
            model.fit(X, y)
        self.pipeline_ = model
        self.n_classes_ = int(y.max()) + 1
        return self

    def _auto_C(self, X, y, X_val, y_val, log) -> float:
        """C from ``C_grid``: on val along a warm-started path, or by k-fold CV on train when val is small."""
        from sklearn.model_selection import StratifiedKFold

        if X_val is not None and len(y_val) >= MIN_VAL_FOR_C:
            scores = self._path_scores(X, y, self.embed(X_val), y_val, patience=PATH_PATIENCE)
            how = f"on {len(y_val)} val photos"
        else:
            folds = min(self.cv_folds, int(np.min(np.bincount(y))))
            if folds < 2:
                self.history_["chosen_C_by"] = "none: fewer than 2 train photos in a class; C = 1"
                return 1.0
            per_fold = [self._path_scores(X[a], y[a], X[b], y[b]) for a, b in
                        StratifiedKFold(folds, shuffle=True, random_state=self.seed).split(X, y)]
            scores = [tuple(np.mean([fold[i][j] for fold in per_fold]) for j in range(2)) for i in range(len(self.C_grid))]
            how = f"by {folds}-fold CV on train ({0 if y_val is None else len(y_val)} val photos)"
        tried = [i for i in range(len(self.C_grid)) if scores[i] is not None]
        best = max(tried, key=lambda i: (round(scores[i][0], 6), -scores[i][1]))
        chosen = float(self.C_grid[best])
        self.history_.update({"chosen_C": chosen, "chosen_C_by": how, "C_path": {
            repr(c): {"balanced_accuracy": float(s[0]), "log_loss": float(s[1])}
            for c, s in zip(self.C_grid, scores) if s is not None}})
        if log is not None:
            log(f"C={chosen:g} chosen {how} (balanced accuracy {scores[best][0]:.4f})")
        return chosen

    def _path_scores(self, X, y, X_val, y_val, patience: int | None = None) -> list:
        """(balanced accuracy, log loss) on (X_val, y_val) of a fit on (X, y) at each C of ``C_grid``, in
        increasing C, each fit starting from the previous one's weights. ``patience``: stop once that many
        Cs in a row did not beat the best so far (the larger Cs are the slow fits; theirs are None)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import balanced_accuracy_score, log_loss
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        x, x_val = scaler.transform(X), scaler.transform(X_val)
        # a looser tolerance than the final fit's: the path only ranks the Cs (it halves the path's time, and
        # chose the same C on the bench sets)
        regression = LogisticRegression(class_weight="balanced" if self.class_weight == "balanced" else None,
                                        max_iter=self.max_iter, warm_start=True, tol=PATH_TOL)
        labels = np.arange(int(y.max()) + 1)
        out, best, since = {}, None, 0
        self._path_weights = {}
        for c in sorted(self.C_grid):
            regression.set_params(C=c).fit(x, y)
            if patience is not None:  # fitted on the whole train split: a start for the final fit
                self._path_weights[c] = (regression.coef_.copy(), regression.intercept_.copy())
            p = regression.predict_proba(x_val)
            out[c] = (balanced_accuracy_score(y_val, regression.classes_[p.argmax(axis=1)]),
                      log_loss(y_val, p, labels=labels))
            key = (round(out[c][0], 6), -out[c][1])
            best, since = (key, 0) if best is None or key > best else (best, since + 1)
            if patience is not None and since >= patience:
                break
        return [out.get(c) for c in self.C_grid]

    def _linear(self) -> tuple[np.ndarray, np.ndarray]:
        """The scaler and the regression as one affine map: (kernel (D, K), bias (K,)), float64, columns in
        class order (a binary regression's one column becomes [0, z]: the same softmax)."""
        scaler = self.pipeline_.named_steps["standardscaler"]
        regression = self.pipeline_.named_steps["logisticregression"]
        coef, intercept = regression.coef_.astype(np.float64), regression.intercept_.astype(np.float64)
        if coef.shape[0] == 1:
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.array([0.0, intercept[0]])
        scale = scaler.scale_.astype(np.float64)
        kernel = (coef / scale).T
        bias = intercept - (scaler.mean_ / scale) @ coef.T
        order = np.argsort(regression.classes_)  # classes_ are 0..K-1, sorted: identity, kept for safety
        return kernel[:, order], bias[order]

    def decision_function(self, X) -> np.ndarray:
        kernel, bias = self._linear()
        return self.embed(X).astype(np.float64) @ kernel + bias

    def keras_layers(self, x, input_shape):
        return x, _dense_logits(x, *self._linear())


class NCMHead(Head):
    """Nearest class mean (SimpleShot, "CL2N"): features centred on the train mean and L2-normalised;
    a photo's logit for a class is ``-NCM_SCALE`` times its squared distance to the class's mean."""

    def fit(self, X, y, log=None):
        X = self.embed(X).astype(np.float64)
        self.mean_ = X.mean(axis=0)
        unit = normalise(X - self.mean_)
        self.n_classes_ = int(y.max()) + 1
        self.centroids_ = np.stack([unit[y == k].mean(axis=0) for k in range(self.n_classes_)])
        self.history_ = {"photos_per_class": np.bincount(y, minlength=self.n_classes_).tolist()}
        return self

    def _linear(self) -> tuple[np.ndarray, np.ndarray]:
        # -s * |u - c|^2 = 2s u.c - s|c|^2 - s (|u| = 1: the same for every class, so dropped)
        return 2 * NCM_SCALE * self.centroids_.T, -NCM_SCALE * np.sum(self.centroids_ ** 2, axis=1)

    def decision_function(self, X) -> np.ndarray:
        kernel, bias = self._linear()
        return normalise(self.embed(X).astype(np.float64) - self.mean_) @ kernel + bias

    def keras_layers(self, x, input_shape):
        return x, _dense_logits(_centred_unit(x, self.mean_), *self._linear())


class KNNHead(Head):
    """The ``k`` nearest training photos by cosine similarity (centred features) vote, each with its
    similarity (so that ties are rare), ``k`` at most the smallest class's photos (more neighbours than
    that would outvote a small class by its size alone); probabilities are the votes with add-half
    smoothing, so that no class is ever exactly 0."""

    def __init__(self, k=10):
        self.k = k

    def fit(self, X, y, log=None):
        X = self.embed(X).astype(np.float64)
        self.mean_ = X.mean(axis=0)
        self.bank_ = normalise(X - self.mean_).astype(np.float32)  # (N, D)
        self.labels_ = np.asarray(y, np.int32)
        self.n_classes_ = int(y.max()) + 1
        self.k_ = int(min(self.k, np.min(np.bincount(y, minlength=self.n_classes_))))
        self.history_ = {"k": self.k_}
        return self

    def decision_function(self, X) -> np.ndarray:
        unit = normalise(self.embed(X).astype(np.float64) - self.mean_).astype(np.float32)
        k = self.k_
        votes = np.zeros((len(unit), self.n_classes_))
        for start in range(0, len(unit), 256):  # (256, N) similarities at a time
            similarity = unit[start:start + 256] @ self.bank_.T
            nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
            for row, neighbours in enumerate(nearest):
                np.add.at(votes[start + row], self.labels_[neighbours], np.maximum(similarity[row, neighbours], 0))
        return np.log((votes + 0.5) / (k + 0.5 * self.n_classes_))

    def keras_layers(self, x, input_shape):
        from pipeline.training.layers import NeighbourVotes

        unit = _centred_unit(x, self.mean_)
        logits = NeighbourVotes(self.bank_, self.labels_, self.n_classes_, self.k_, name="logits")(unit)
        return x, logits


class SoftmaxHead(Head):
    """[Dropout -> Dense(relu)] per hidden layer -> Dropout -> Dense(softmax), L2 on every kernel, Adam,
    early stopping on val (the best epoch's weights kept). ``fit_inputs`` streams from a cache."""

    kind = "keras"

    def __init__(self, learning_rate=0.001, epochs=100, batch_size=32, l2=0.0001, dropout=0.2, patience=10,
                 hidden_units=(), class_weight="balanced", seed=0):
        self.learning_rate, self.epochs, self.batch_size, self.l2 = learning_rate, epochs, batch_size, l2
        self.dropout, self.patience, self.hidden_units = dropout, patience, hidden_units
        self.class_weight, self.seed = class_weight, seed

    def build(self, input_shape, n_classes: int):
        from pipeline.tf_import import keras as quiet_keras

        keras = quiet_keras()
        from keras import layers

        keras.utils.set_random_seed(self.seed)
        inputs = keras.Input(tuple(input_shape), name="features")
        x = layers.GlobalAveragePooling2D(name="pool")(inputs) if len(input_shape) == 3 else inputs
        regularizer = keras.regularizers.L2(self.l2) if self.l2 else None
        for i, units in enumerate(self.hidden_units):  # new hidden layers, trained from scratch
            x = layers.Dropout(self.dropout, name=f"dropout_{i}")(x)
            x = layers.Dense(units, activation="relu", kernel_regularizer=regularizer, name=f"hidden_{i}")(x)
        x = layers.Dropout(self.dropout, name="dropout")(x)
        outputs = layers.Dense(n_classes, activation="softmax", name="softmax", kernel_regularizer=regularizer)(x)
        return keras.Model(inputs, outputs, name="head")

    def fit_inputs(self, inputs, train, val, backup, log=None):
        """Train on the rows ``train`` of a rung's ``inputs``, streamed; early stopping on ``val``."""
        from pipeline.training import keras_fit

        model = self.build(inputs.shape, len(inputs.classes))
        phases = [keras_fit.Phase("head", self.epochs, self.learning_rate, lambda model: None)]
        self.history_ = keras_fit.fit(model, inputs, train, val, phases, batch_size=self.batch_size,
                                      patience=self.patience, class_weight=self.class_weight, seed=self.seed,
                                      backup=backup, log=log)
        self.model_ = model
        self.n_classes_ = len(inputs.classes)
        return self

    def fit(self, X, y, log=None, X_val=None, y_val=None, backup=None):
        import tempfile
        from pathlib import Path

        from pipeline.training.inputs import ArrayInputs

        n_classes = int(y.max()) + 1
        x_all = X if X_val is None else np.concatenate([X, X_val])
        y_all = y if y_val is None else np.concatenate([y, y_val])
        inputs = ArrayInputs(x_all, y_all, [str(k) for k in range(n_classes)])
        train, val = inputs.split_rows(len(X))
        with tempfile.TemporaryDirectory() as tmp:
            return self.fit_inputs(inputs, train, val, Path(backup or tmp) / "backup", log)

    def face(self, classes, history):
        from pipeline.training.classifiers import KerasClassifier

        return KerasClassifier(self.model_, classes, history)

    def embed(self, X) -> np.ndarray:
        return self.face([], {}).embed(np.asarray(X, np.float32))

    def decision_function(self, X) -> np.ndarray:
        return self.face([], {}).logits(np.asarray(X, np.float32))


HEADS: dict[str, type[Head]] = {"logreg": LogRegHead, "softmax": SoftmaxHead, "ncm": NCMHead, "knn": KNNHead}
