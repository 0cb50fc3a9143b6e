"""Stage `train_head`: fit a shallow classifier on the cached features, never on the images.

Reads only the feature cache (the backbone is never built). Two models:
- ``logreg``: scikit-learn StandardScaler + LogisticRegression (optionally C by CV on train);
- ``softmax``: a Keras Dense softmax layer (dropout, L2, Adam, early stopping on val).
The test split feeds no choice. The head and its history go to ``cache/heads/<key>/``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import feature_store, features, trained
from pipeline.fingerprint import atomic_write_text, describe_changes, replaced_folder, stage_key
from pipeline.params import Params, as_dict, key_fields
from pipeline.tf_import import keras as _quiet_keras

STAGE = "train_head"
# Bump when a head trained with the same params and features would come out different.
VERSION = 1

log = logging.getLogger("pipeline.train_head")


class TrainingError(ValueError):
    """Data that cannot train a head (a class missing from the train split, ...)."""


@dataclass(frozen=True)
class HeadResult:
    path: Path  # the head's folder
    key: str
    trained: bool  # False on a cache hit
    head: object  # LogRegHead | SoftmaxHead


def upstream(params: Params, base: Path) -> tuple[Path, dict]:
    """The feature cache this stage reads and what identifies its content."""
    path = features.cache_file(params, base)
    attrs = feature_store.read_attrs(path)
    return path, {"features": attrs["content_hash"]}


def cache_key(params: Params, upstream_ids: dict) -> str:
    return stage_key(STAGE, VERSION, key_fields(params.train_head), upstream_ids)


def head_dir(params: Params, base: Path, key: str) -> Path:
    return base / params.paths.cache_dir / "heads" / key[:16]


def reuse(stage: str, rung: str, params: Params, base: Path, folder: Path, key: str, features_file: Path):
    """The model already trained in ``folder`` (recorded as the last trained), or None."""
    if not (folder / "head.json").is_file():
        return None
    log.info("%s: cache hit (%s)", stage, folder.name)
    trained.record(params, base, rung, folder, key, features_file)
    return load(folder)


def find(params: Params, base: Path) -> Path | None:
    """The folder of the head these params would train, if it exists; trains nothing."""
    try:
        _, upstream_ids = upstream(params, base)
    except feature_store.CacheError:
        return None
    folder = head_dir(params, base, cache_key(params, upstream_ids))
    return folder if (folder / "head.json").is_file() else None


def last_run_file(params: Params, base: Path) -> Path:
    return base / params.paths.cache_dir / "heads" / "last.json"


def run(params: Params, base: str | Path = ".") -> HeadResult:
    """Train the head unless one with this key exists; returns it either way."""
    base = Path(base)
    features_path, upstream_ids = upstream(params, base)
    key = cache_key(params, upstream_ids)
    out = head_dir(params, base, key)
    # through JSON, so that it compares equal to the record read back from last.json
    record = json.loads(json.dumps({"params": {"train_head": key_fields(params.train_head)},
                                    "upstream": upstream_ids, "key": key}))
    previous = _read_json(last_run_file(params, base))
    if (out / "head.json").is_file():
        log.info("train_head: cache hit (%s)", out.relative_to(base) if out.is_relative_to(base) else out)
        atomic_write_text(last_run_file(params, base), json.dumps(record, indent=2))
        trained.record(params, base, "head", out, key, features_path)
        return HeadResult(out, key, False, load(out))

    changes = describe_changes(previous and {**previous["params"], "upstream": previous["upstream"]},
                               {**record["params"], "upstream": upstream_ids})
    log.info("train_head: recomputing (%s)", ", ".join(changes) if changes else "no head for these params yet")
    table = feature_store.read_table(features_path)
    classes = list(table.attrs["classes"])
    x_train, y_train, _ = table.select("train")
    x_val, y_val, _ = table.select("val")
    missing = sorted(set(classes) - set(y_train.tolist()))
    if missing:
        raise TrainingError(f"class(es) {', '.join(missing)} have no images in the train split; add images "
                            "or change data.train_fraction")
    p = params.train_head
    started = time.perf_counter()
    if p.model == "logreg":
        head = LogRegHead.fit(x_train, y_train, classes, p)
    else:
        head = SoftmaxHead.fit(x_train, y_train, x_val, y_val, classes, p)
    seconds = time.perf_counter() - started
    head.history["fit_seconds"] = seconds
    head.history["train_accuracy"] = float(np.mean(head.predict(x_train) == y_train))
    if len(y_val):
        head.history["val_accuracy"] = float(np.mean(head.predict(x_val) == y_val))
    meta = {
        "stage": STAGE, "stage_version": VERSION, "key": key, "model": p.model, "classes": classes,
        "params": as_dict(p), "upstream": upstream_ids, "features_file": features_path.name,
        "features_key": table.attrs["key"], "n_train": int(len(y_train)), "n_val": int(len(y_val)),
    }
    _save(head, meta, out)
    atomic_write_text(last_run_file(params, base), json.dumps(record, indent=2))
    trained.record(params, base, "head", out, key, features_path)
    val = head.history.get("val_accuracy")
    log.info("train_head: %s on %d images in %.2f s; train accuracy %.3f%s", p.model, len(y_train), seconds,
             head.history["train_accuracy"], f", val accuracy {val:.3f}" if val is not None else "")
    return HeadResult(out, key, True, head)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _class_weights(y: np.ndarray, classes: list[str], mode: str) -> dict | None:
    if mode == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.array(classes), y=y)
    return dict(zip(classes, weights.tolist()))


class LogRegHead:
    """StandardScaler + LogisticRegression; ``predict_proba`` columns follow ``classes``."""

    def __init__(self, pipeline, classes: list[str], history: dict):
        self.pipeline_ = pipeline
        self.classes = classes
        self.history = history

    @classmethod
    def fit(cls, x, y, classes, p) -> "LogRegHead":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = x.reshape(len(x), -1)
        class_weight = "balanced" if p.class_weight == "balanced" else None
        model = make_pipeline(StandardScaler(), LogisticRegression(C=p.C, class_weight=class_weight,
                                                                   max_iter=p.max_iter))
        history: dict = {}
        if p.search_C:
            smallest = int(np.min(np.unique(y, return_counts=True)[1]))
            folds = min(p.cv_folds, smallest)
            if folds < 2:
                raise TrainingError("train_head.search_C needs at least 2 train images per class")
            search = GridSearchCV(model, {"logisticregression__C": list(p.C_grid)}, scoring="balanced_accuracy",
                                  cv=StratifiedKFold(folds, shuffle=True, random_state=p.seed), n_jobs=1)
            search.fit(x, y)
            model = search.best_estimator_
            history["cv_folds"] = folds
            history["cv_balanced_accuracy"] = {
                repr(c): float(s) for c, s in zip(p.C_grid, search.cv_results_["mean_test_score"])
            }
            history["chosen_C"] = float(search.best_params_["logisticregression__C"])
            log.info("train_head: C=%g chosen by %d-fold CV on train", history["chosen_C"], folds)
        else:
            model.fit(x, y)
        return cls(model, list(classes), history)

    def predict_proba(self, x) -> np.ndarray:
        """(N, n_classes) float64, columns in ``self.classes`` order."""
        proba = self.pipeline_.predict_proba(x.reshape(len(x), -1))
        order = [list(self.pipeline_.classes_).index(c) for c in self.classes]
        return proba[:, order]

    def predict(self, x) -> np.ndarray:
        return np.array(self.classes)[np.argmax(self.predict_proba(x), axis=1)]

    def as_keras(self, feature_shape):
        """An equivalent Keras model: the scaler and the logistic regression folded into one Dense
        softmax layer. (N, *feature_shape) -> (N, n_classes), columns in ``classes`` order."""
        keras = _quiet_keras()
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
        inputs = keras.Input(tuple(feature_shape), name="features")
        x = layers.Flatten(name="flatten")(inputs) if len(feature_shape) > 1 else inputs
        dense = layers.Dense(len(self.classes), activation="softmax", name="softmax")
        outputs = dense(x)
        dense.set_weights([kernel[:, order].astype(np.float32), bias[order].astype(np.float32)])
        return keras.Model(inputs, outputs, name="head")

    def save(self, folder: Path) -> None:
        import joblib

        joblib.dump(self.pipeline_, folder / "head.joblib")

    @classmethod
    def load(cls, folder: Path, meta: dict, history: dict) -> "LogRegHead":
        import joblib

        return cls(joblib.load(folder / "head.joblib"), meta["classes"], history)


def fit_keras(model, x, y, x_val, y_val, classes, p, callbacks=()) -> dict:
    """Adam on sparse cross-entropy, class weights, early stopping on val loss (best weights kept).

    ``p`` needs learning_rate, epochs, batch_size, patience, class_weight. Returns the history."""
    keras = _quiet_keras()
    index = {c: i for i, c in enumerate(classes)}
    model.compile(optimizer=keras.optimizers.Adam(p.learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    weights = _class_weights(y, classes, p.class_weight)
    callbacks = list(callbacks)
    validation = None
    if len(y_val):
        validation = (x_val, np.array([index[c] for c in y_val]))
        if p.patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=p.patience,
                                                           restore_best_weights=True))
    fitted = model.fit(x, np.array([index[c] for c in y]), batch_size=p.batch_size, epochs=p.epochs,
                       validation_data=validation, callbacks=callbacks, verbose=0, shuffle=True,
                       class_weight={index[c]: w for c, w in weights.items()} if weights else None)
    epochs = {name: [float(v) for v in values] for name, values in fitted.history.items()}
    return {"epochs": epochs, "epochs_run": len(epochs.get("loss", []))}


class SoftmaxHead:
    """Keras: [GlobalAveragePooling2D for spatial caches] -> [Dropout -> Dense(relu)] per hidden layer ->
    Dropout -> Dense(softmax), L2 on every kernel."""

    def __init__(self, model, classes: list[str], history: dict):
        self.model_ = model
        self.classes = classes
        self.history = history

    @staticmethod
    def build(feature_shape, n_classes: int, p):
        keras = _quiet_keras()
        from keras import layers

        inputs = keras.Input(tuple(feature_shape), name="features")
        x = layers.GlobalAveragePooling2D(name="pool")(inputs) if len(feature_shape) == 3 else inputs
        regularizer = keras.regularizers.L2(p.l2) if p.l2 else None
        for i, units in enumerate(p.hidden_units):  # new hidden layers, trained from scratch
            x = layers.Dropout(p.dropout, name=f"dropout_{i}")(x)
            x = layers.Dense(units, activation="relu", kernel_regularizer=regularizer, name=f"hidden_{i}")(x)
        x = layers.Dropout(p.dropout, name="dropout")(x)
        outputs = layers.Dense(n_classes, activation="softmax", name="softmax", kernel_regularizer=regularizer)(x)
        return keras.Model(inputs, outputs, name="head")

    @classmethod
    def fit(cls, x, y, x_val, y_val, classes, p) -> "SoftmaxHead":
        keras = _quiet_keras()

        keras.utils.set_random_seed(p.seed)
        model = cls.build(x.shape[1:], len(classes), p)
        history = fit_keras(model, x, y, x_val, y_val, classes, p)
        return cls(model, list(classes), history)

    def predict_proba(self, x) -> np.ndarray:
        """(N, n_classes) float64, columns in ``self.classes`` order."""
        # A direct call: predict() would retrace for every new batch size.
        blocks = [np.asarray(self.model_(x[i:i + 4096].astype(np.float32), training=False), dtype=np.float64)
                  for i in range(0, len(x), 4096)]
        return np.concatenate(blocks) if blocks else np.zeros((0, len(self.classes)))

    def predict(self, x) -> np.ndarray:
        return np.array(self.classes)[np.argmax(self.predict_proba(x), axis=1)]

    def as_keras(self, feature_shape):
        return self.model_

    def save(self, folder: Path) -> None:
        self.model_.save(folder / "head.keras")

    @classmethod
    def load(cls, folder: Path, meta: dict, history: dict) -> "SoftmaxHead":
        keras = _quiet_keras()

        return cls(keras.saving.load_model(folder / "head.keras"), meta["classes"], history)


_HEADS = {"logreg": LogRegHead, "softmax": SoftmaxHead, "top": SoftmaxHead}  # top: see train_top


def _save(head, meta: dict, out: Path) -> None:
    """Write the head folder under a temporary name, then move it into place whole."""
    with replaced_folder(out) as tmp:
        head.save(tmp)
        (tmp / "history.json").write_text(json.dumps(head.history, indent=2))
        (tmp / "head.json").write_text(json.dumps(meta, indent=2))


def load(folder: Path):
    """A saved head, ready for ``predict_proba``."""
    meta = json.loads((folder / "head.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    if meta["model"] == "finetune":
        from pipeline.finetune import FinetunedModel

        return FinetunedModel.load(folder, meta, history)
    return _HEADS[meta["model"]].load(folder, meta, history)
