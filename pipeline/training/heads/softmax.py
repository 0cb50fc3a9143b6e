"""Head ``softmax``: [Dropout -> Dense(relu)] per new hidden layer -> Dropout -> Dense(softmax), L2 on every
kernel, Adam, early stopping on val (the best epoch's weights kept). Its rung streams it from the cache a
batch at a time (``fit_inputs``), so memory is flat in the number of photos."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from pipeline.training.heads.base import Head, HeadParams, register


class SoftmaxParams(HeadParams):
    model: Literal["softmax"] = "softmax"
    exclusive: ClassVar[tuple[str, ...]] = ("hidden_units",)  # hidden layers are this head's alone
    learning_rate: float = Field(0.001, gt=0, description="Adam learning rate")
    epochs: int = Field(100, gt=0, description="upper bound; early stopping usually ends sooner")
    batch_size: int = Field(32, gt=0, description="examples per gradient step")
    l2: float = Field(0.0001, ge=0, description="L2 penalty on the Dense kernels")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout before each Dense layer")
    patience: int = Field(10, ge=0, description="epochs without val-loss improvement before stopping (0: never)")
    hidden_units: tuple[int, ...] = Field((), description="new hidden layers before the softmax, e.g. [256]")

    @model_validator(mode="after")
    def _check(self):
        if any(u <= 0 for u in self.hidden_units):
            raise ValueError("hidden_units must be positive layer widths, e.g. [256]")
        return self


@dataclass(frozen=True)
class Steps:
    """How the softmax head's gradient steps go (its ``train_head`` keys of the same names)."""

    learning_rate: float = 0.001
    epochs: int = 100
    batch_size: int = 32
    patience: int = 10


@register
class SoftmaxHead(Head):
    Params = SoftmaxParams
    summary = "a Keras Dense softmax layer, streamed from the cache"
    kind = "keras"
    uses_val = True
    streams = True

    def __init__(self, hidden_units=(), dropout=0.2, l2=0.0001, steps=None, class_weight="balanced", seed=0):
        self.hidden_units, self.dropout, self.l2 = hidden_units, dropout, l2
        self.steps = steps  # Steps (None: its defaults)
        self.class_weight, self.seed = class_weight, seed

    @classmethod
    def from_section(cls, params: SoftmaxParams, class_weight: str, seed: int) -> "SoftmaxHead":
        steps = Steps(params.learning_rate, params.epochs, params.batch_size, params.patience)
        return cls(params.hidden_units, params.dropout, params.l2, steps, class_weight, seed)

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
        from pipeline.training.keras_fit import Phase, Schedule, fit

        model = self.build(inputs.shape, len(inputs.classes))
        steps = self.steps or Steps()
        schedule = Schedule([Phase("head", steps.epochs, steps.learning_rate, lambda model: None)], steps.batch_size,
                            steps.patience, self.class_weight, self.seed)
        self.history_ = fit(model, inputs, train, val, schedule, backup, log)
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
