"""The heads of the first rung, one class each, following scikit-learn's estimator conventions.

``__init__`` only stores hyperparameters (``get_params`` / ``set_params`` / ``clone`` read its
signature, so ``sklearn.base.clone`` works on a head too), ``fit(X, y)`` returns ``self``, learned state
ends in ``_``:

    fit(X, y)                X: (N, D) float32 features, y: (N,) class numbers 0..K-1
    decision_function(X)     (N, K) float64 logits; ``predict_proba`` is their softmax
    embed(X)                 (N, E) float32: what the head sees last (the features, or its last hidden layer)
    keras_layers(x, shape)   the same computation as Keras layers: x -> (embedding, logits), for export

``HEADS`` maps ``train_head.model`` to its class; a new head is one class here and one line there
(plus its hyperparameters in ``TrainHeadParams``, marked with ``model="..."``).

- ``logreg``: standardised features and a logistic regression (``training.logistic``: scikit-learn's
  objective and solver, without the second it takes to import scikit-learn); C chosen on val by default;
- ``softmax``: a Keras Dense softmax layer (optionally after new hidden layers), trained with Adam;
  its rung streams it from the cache a batch at a time (``fit_inputs``);
- ``ncm``: nearest class mean on centred, L2-normalised features (SimpleShot): no training, a mean
  per class; adding photos costs their features and a mean;
- ``knn``: the k nearest training photos by cosine similarity vote (add-half smoothing).

Fitting and loading a logreg, ncm or knn head imports neither scikit-learn nor TensorFlow.
"""
from __future__ import annotations

import inspect

import numpy as np

from pipeline.errors import PipelineError
from pipeline.training import logistic
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


def folds(y: np.ndarray, wanted: int, seed: int, error: str) -> list:
    """Stratified, shuffled k-fold (train rows, held-out rows), k at most the smallest class's photos;
    ``error`` when that is fewer than 2."""
    from sklearn.model_selection import StratifiedKFold  # only with few val photos, or search_C

    k = min(wanted, int(np.min(np.bincount(y))))
    if k < 2:
        raise HeadError(error)
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


class Head:
    """What every head shares: hyperparameters as ``__init__``'s arguments, flattened inputs, probabilities
    as the softmax of the logits."""

    kind = "sklearn"  # how the classifier is saved (classifiers.KINDS): pickled by joblib

    @classmethod
    def _get_param_names(cls) -> list[str]:
        if cls.__init__ is object.__init__:
            return []
        return sorted(name for name, p in inspect.signature(cls.__init__).parameters.items()
                      if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params) -> "Head":
        unknown = sorted(set(params) - set(self._get_param_names()))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no hyperparameter {', '.join(unknown)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def clone(self) -> "Head":
        """The same hyperparameters, unfitted."""
        return type(self)(**self.get_params())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

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
    """Standardised features and a logistic regression (``training.logistic``). ``C="auto"``: C from
    ``C_grid``, the best balanced accuracy on the val split (ties: the lower log loss) along a warm-started
    path, each fit starting from the last; with fewer than ``MIN_VAL_FOR_C`` val photos, by k-fold CV on
    train. ``search_C``: by k-fold CV on train over the whole grid, each fold's path to scikit-learn's
    tolerance."""

    def __init__(self, C="auto", class_weight="balanced", max_iter=2000, search_C=False,
                 C_grid=(0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0, 31.6, 100.0), cv_folds=5, seed=0):
        self.C, self.class_weight, self.max_iter = C, class_weight, max_iter
        self.search_C, self.C_grid, self.cv_folds, self.seed = search_C, C_grid, cv_folds, seed

    def fit(self, X, y, log=None, X_val=None, y_val=None):
        X = self.embed(X)
        y = np.asarray(y)
        self.history_: dict = {}
        self.mean_, self.scale_ = logistic.standardise(X)
        x = self._standard(X)
        C, start = self.C, None
        if self.search_C:
            C = self._cv_C(X, y, log)
        elif C == "auto":
            C, start = self._auto_C(X, x, y, X_val, y_val, log)
        try:
            self.fitted_ = logistic.fit(x, y, float(C), balanced=self.class_weight == "balanced",
                                        max_iter=self.max_iter, start=start)
        except ValueError as error:
            raise HeadError(f"train_head: {error}") from None
        self.history_["iterations"] = self.fitted_.n_iter
        self.n_classes_ = int(y.max()) + 1
        return self

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
        splits, per_fold = folds(y, self.cv_folds, self.seed, error), []
        for a, b in splits:  # each fold standardised on its own train rows
            mean, scale = logistic.standardise(X[a])
            per_fold.append(self._path_scores((X[a] - mean) / scale, y[a], (X[b] - mean) / scale, y[b], tol=tol)[0])
        return [tuple(np.mean([fold[i][j] for fold in per_fold]) for j in range(2))
                for i in range(len(self.C_grid))], len(splits)

    def _cv_C(self, X, y, log) -> float:
        scores, k = self._cv_scores(X, y, logistic.TOL, "train_head.search_C needs at least 2 train photos per "
                                    "class; add photos or set train_head.search_C: false")
        self.history_["cv_folds"] = k
        self.history_["cv_balanced_accuracy"] = {repr(c): float(s[0]) for c, s in zip(self.C_grid, scores)}
        return self._choose(scores, f"by {k}-fold CV on train", log)

    def _auto_C(self, X, x, y, X_val, y_val, log) -> tuple[float, logistic.Fitted | None]:
        """C from ``C_grid`` (on val along a warm-started path, or by k-fold CV on train when val is small),
        and the path's fit at that C on the whole train split (a start for the final fit) when there is one.
        ``x``: ``X`` standardised."""
        if X_val is not None and len(y_val) >= MIN_VAL_FOR_C:
            scores, fits = self._path_scores(x, y, self._standard(self.embed(X_val)), np.asarray(y_val),
                                             tol=PATH_TOL, patience=PATH_PATIENCE)
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
        """(balanced accuracy, log loss) on (x_val, y_val) of a fit on (x, y) (both standardised on the fit's
        rows) at each C of ``C_grid``, in increasing C, each fit starting from the previous one's weights; and
        those fits by C. ``patience``: stop once that many Cs in a row did not beat the best so far (the larger
        Cs are the slow fits; their scores are None)."""
        balanced = self.class_weight == "balanced"
        out, fits, best, since, fitted = {}, {}, None, 0, None
        for c in sorted(self.C_grid):
            fitted = fits[c] = logistic.fit(x, y, c, balanced=balanced, tol=tol, max_iter=self.max_iter, start=fitted)
            p = softmax(logistic.logits(fitted, x_val))
            out[c] = (logistic.balanced_accuracy(y_val, p.argmax(axis=1)), logistic.log_loss(y_val, p))
            key = (round(out[c][0], 6), -out[c][1])
            best, since = (key, 0) if best is None or key > best else (best, since + 1)
            if patience is not None and since >= patience:
                break
        return [out.get(c) for c in self.C_grid], fits

    def _linear(self) -> tuple[np.ndarray, np.ndarray]:
        """The standardisation and the regression as one affine map: (kernel (D, K), bias (K,)), float64
        (a binary regression's one row becomes the columns [0, z]: the same softmax)."""
        coef, intercept = self.fitted_.coef, self.fitted_.intercept
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
