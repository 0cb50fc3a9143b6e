"""What every head of the first rung is, and the registry that names them.

A head follows scikit-learn's estimator conventions: ``__init__`` only stores hyperparameters,
``fit(X, y)`` returns ``self``, learned state ends in ``_``; ``get_params``, ``set_params`` and
``clone`` are ``sklearn.base.BaseEstimator``'s own, imported when called (so that loading a fitted
head for predict, the app or export imports no scikit-learn):

    fit(X, y)                X: (N, D) float32 features, y: (N,) class numbers 0..K-1
    decision_function(X)     (N, K) float64 logits; ``predict_proba`` is their softmax
    embed(X)                 (N, E) float32: what the head sees last (the features, or its last hidden layer)
    keras_layers(x, shape)   the same computation as Keras layers: x -> (embedding, logits), for export

A head declares what it can do (``uses_val``, ``streams``) and its own hyperparameters (``Params``,
a pydantic model whose ``model`` field names it); ``register`` adds it to ``HEADS`` under that name.
"""
from __future__ import annotations

import contextlib
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.errors import PipelineError
from pipeline.training.classifiers import HeadClassifier, softmax


class HeadError(PipelineError, ValueError):
    """Data a head cannot fit on (too few photos per class for the folds asked, ...)."""


class HeadParams(BaseModel):
    """A head's own hyperparameters (``train_head`` keys besides model, class_weight and seed). Each head
    subclasses it with ``model: Literal["<name>"]`` (the tag of the discriminated union of heads) and its
    fields, each with a ``description`` (the params template's comment)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    model: Literal["base"] = "base"
    # keys that would mislead under another head (set there, they are an error rather than ignored)
    exclusive: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def name(cls) -> str:
        return cls.model_fields["model"].default

    @classmethod
    def keys(cls) -> list[str]:
        """Its ``train_head`` keys (all but ``model``)."""
        return [key for key in cls.model_fields if key != "model"]


class Head:
    """What every head shares: hyperparameters as ``__init__``'s arguments, flattened inputs, probabilities
    as the softmax of the logits."""

    Params: ClassVar[type] = HeadParams
    summary: ClassVar[str] = ""  # what it is, in a few words (the params template's comment)
    kind: ClassVar[str] = "joblib"  # how the fitted head is saved (classifiers.KINDS)
    uses_val: ClassVar[bool] = False  # fit(X, y, X_val=, y_val=) chooses a setting on the val split
    streams: ClassVar[bool] = False  # fit_inputs(inputs, train, val, backup, log) reads the cache in batches

    @classmethod
    def _get_param_names(cls) -> list[str]:
        from sklearn.base import BaseEstimator

        return BaseEstimator._get_param_names.__func__(cls)

    def get_params(self, deep: bool = True) -> dict:
        from sklearn.base import BaseEstimator

        return BaseEstimator.get_params(self, deep)

    def set_params(self, **params) -> "Head":
        from sklearn.base import BaseEstimator

        return BaseEstimator.set_params(self, **params)

    def clone(self) -> "Head":
        """The same hyperparameters, unfitted (``sklearn.base.clone``)."""
        from sklearn.base import clone

        return clone(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    @classmethod
    def from_section(cls, params: HeadParams, class_weight: str, seed: int) -> "Head":
        """The head for its ``train_head`` section: ``class_weight``, ``seed`` and its own keys, each where
        ``__init__`` takes one of that name (a head whose arguments group its keys says how)."""
        values = {"class_weight": class_weight, "seed": seed, **{key: getattr(params, key) for key in params.keys()}}
        return cls(**{name: values[name] for name in cls._get_param_names() if name in values})

    def embed(self, X) -> np.ndarray:
        return np.asarray(X, np.float32).reshape(len(X), -1)

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        return np.argmax(self.decision_function(X), axis=1)

    def face(self, classes: list[str], history: dict):
        """The classifier face of the fitted head (``training.classifiers``)."""
        return HeadClassifier(self, classes, history)


HEADS: dict[str, type[Head]] = {}


def register(cls: type[Head]) -> type[Head]:
    """Add a head under the name its ``Params.model`` declares (a class decorator)."""
    name = cls.Params.name()
    if name in HEADS:
        raise ValueError(f"head {name!r} is registered twice")
    HEADS[name] = cls
    return cls


@contextlib.contextmanager
def registered(cls: type[Head]):
    """``cls`` in the registry for the ``with`` block only (tests, plug-ins)."""
    register(cls)
    try:
        yield cls
    finally:
        HEADS.pop(cls.Params.name(), None)


def from_params(section) -> Head:
    """The head ``train_head.model`` names, with its hyperparameters (``Head.from_section``)."""
    return HEADS[section.model].from_section(section.head, section.class_weight, section.seed)


def folds(y: np.ndarray, wanted: int, seed: int, error: str) -> list:
    """Stratified, shuffled k-fold (train rows, held-out rows), k at most the smallest class's photos;
    ``error`` when that is fewer than 2."""
    from sklearn.model_selection import StratifiedKFold  # only with few val photos, or search_C

    k = min(wanted, int(np.min(np.bincount(y))))
    if k < 2:
        raise HeadError(error)
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def dense_logits(x, kernel: np.ndarray, bias: np.ndarray):
    """A Keras Dense layer named ``logits`` holding a fitted affine map (float64 -> float32 weights)."""
    from keras import layers

    dense = layers.Dense(kernel.shape[1], name="logits")
    logits = dense(x)
    dense.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return logits


def centred_unit(x, mean: np.ndarray):
    """Keras layers: ``x`` minus the train mean, scaled to unit L2 norm (what ncm and knn compare)."""
    from keras import layers

    centred = layers.Rescaling(1.0, offset=(-mean).astype(np.float32).tolist(), name="centre")(x)
    return layers.UnitNormalization(name="unit")(centred)
