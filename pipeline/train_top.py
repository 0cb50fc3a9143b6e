"""Stage `train_top`: train the backbone's layers above a cut point, and a softmax, on cached activations.

The middle rung of the ladder. The frozen part (input to ``train_top.cut_point``) runs once per
image in the features stage, which caches its activations (float16 spatial maps) in a cache of
their own; this stage never runs it again. The layers above the cut start from their pretrained
weights; their BatchNormalization layers stay frozen in inference mode (fine-tuning a BN layer on a
few hundred images wrecks its statistics). The softmax starts from train-head's head on pooled
features when there is one. Low learning rate, early stopping on val, and a backup of every
epoch so that an interrupted run continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import feature_store, features, train_head, trained
from pipeline.fingerprint import stage_key
from pipeline.params import Params, as_dict, key_fields
from pipeline.train_head import TrainingError, _save

STAGE = "train_top"
# Bump when a model trained with the same params and activations would come out different.
VERSION = 1

log = logging.getLogger("pipeline.train_top")


@dataclass(frozen=True)
class TopResult:
    path: Path
    key: str
    trained: bool
    model: object  # train_head.SoftmaxHead over the cut-point activations


def cut_params(params: Params) -> Params:
    """The params of the features cache at the cut point: float16 spatial maps."""
    return dataclasses.replace(params, features=dataclasses.replace(
        params.features, layer=params.train_top.cut_point, dtype="float16"))


def pooled_params(params: Params) -> Params:
    return dataclasses.replace(params, features=dataclasses.replace(params.features, layer="pooled"))


def warm_head(params: Params, base: Path):
    """train-head's head on pooled features for these params, if it was trained: (key, head) or None."""
    pooled = pooled_params(params)
    try:
        _, upstream_ids = train_head.upstream(pooled, base)
    except feature_store.CacheError:
        return None
    key = train_head.cache_key(pooled, upstream_ids)
    folder = train_head.head_dir(pooled, base, key)
    if not (folder / "head.json").is_file():
        return None
    return key, train_head.load(folder)


def cache_key(params: Params, cut_attrs: dict, warm) -> tuple[str, dict]:
    upstream_ids = {"features": cut_attrs["content_hash"], "warm_head": warm[0] if warm else None}
    return stage_key(STAGE, VERSION, key_fields(params.train_top), upstream_ids), upstream_ids


def find(params: Params, base: Path) -> Path | None:
    """The folder of the model these params would train, if it exists; trains and computes nothing."""
    try:
        attrs = feature_store.read_attrs(features.cache_file(cut_params(params), base))
    except feature_store.CacheError:
        return None
    warm = warm_head(params, base) if params.train_top.warm_start else None
    folder = top_dir(params, base, cache_key(params, attrs, warm)[0])
    return folder if (folder / "head.json").is_file() else None


def warm_start(softmax, warm, classes: list[str], width: int, stage: str) -> None:
    """Give a new softmax layer the weights of train-head's head on pooled features (a logistic
    regression folded into a Dense layer, or the softmax itself), when it has the same classes."""
    if not warm or list(warm[1].classes) != classes:
        return
    dense = [layer for layer in warm[1].as_keras((width,)).layers if type(layer).__name__ == "Dense"]
    if len(dense) != 1:  # a head with hidden layers does not fit directly on the pooled features
        return
    softmax.set_weights(dense[0].get_weights())
    log.info("%s: softmax starts from train-head's head %s", stage, warm[0][:16])


def top_dir(params: Params, base: Path, key: str) -> Path:
    return base / params.paths.cache_dir / "tops" / key[:16]


def build_top(backbone_model, cut_point: str):
    """The pretrained layers from ``cut_point`` to the pooled features, as a model of their own:
    (N, H, W, C) activations -> (N, D). The layers before the cut are not part of it."""
    from pipeline.tf_import import keras

    keras = keras()
    top = keras.Model(backbone_model.get_layer(cut_point).output, backbone_model.get_layer("pooled").output,
                      name="top")
    for layer in top.layers:
        # BatchNormalization with trainable=False runs in inference mode: its statistics never move.
        layer.trainable = type(layer).__name__ != "BatchNormalization"
    return top


def run(params: Params, base: str | Path = ".") -> TopResult:
    base = Path(base)
    p = params.train_top
    cut = cut_params(params)
    try:
        features_result = features.run(cut, base)  # a cache hit once the cut point is cached
    except ValueError as error:  # the cut point is this stage's setting: name it so
        if str(error).startswith("features.layer:"):
            raise ValueError(str(error).replace("features.layer:", "train_top.cut_point:", 1)) from None
        raise
    attrs = feature_store.read_attrs(features_result.path)
    if len(attrs["feature_shape"]) != 3:
        raise TrainingError(f"train_top.cut_point {p.cut_point!r} is not a spatial block output; "
                            "choose a block name such as block14")
    warm = warm_head(params, base) if p.warm_start else None
    key, upstream_ids = cache_key(params, attrs, warm)
    out = top_dir(params, base, key)
    cached = train_head.reuse(STAGE, "top", params, base, out, key, features_result.path)
    if cached is not None:
        return TopResult(out, key, False, cached)

    from pipeline import backbones
    from pipeline.tf_import import keras as quiet_keras

    keras = quiet_keras()
    from keras import layers

    keras.utils.set_random_seed(p.seed)
    table = feature_store.read_table(features_result.path)
    classes = list(table.attrs["classes"])
    x_train, y_train, _ = table.select("train")
    x_val, y_val, _ = table.select("val")
    missing = sorted(set(classes) - set(y_train.tolist()))
    if missing:
        raise TrainingError(f"class(es) {', '.join(missing)} have no images in the train split")
    f = params.features
    full = backbones.build(f.backbone, f.weights, "pooled", f.image_size, base / params.paths.cache_dir)
    if attrs["weights_sha256"] != backbones.weights_checksum(
            keras.Model(full.model.input, full.model.get_layer(p.cut_point).output)):
        raise TrainingError(f"the backbone's weights differ from those of {features_result.path.name}; "
                            "run 'make features' again")
    top = build_top(full.model, p.cut_point)
    inputs = keras.Input(tuple(attrs["feature_shape"]), name="activations")
    x = top(inputs)
    for i, units in enumerate(p.hidden_units):
        x = layers.Dropout(p.dropout, name=f"dropout_{i}")(x)
        x = layers.Dense(units, activation="relu", name=f"hidden_{i}")(x)
    x = layers.Dropout(p.dropout, name="dropout")(x)
    softmax = layers.Dense(len(classes), activation="softmax", name="softmax")
    model = keras.Model(inputs, softmax(x), name="top_and_head")
    if not p.hidden_units:
        warm_start(softmax, warm, classes, int(top.output.shape[-1]), "train_top")

    backup = out.with_name(out.name + ".backup")
    log.info("train_top: training the layers above %s (%d trainable weights) on %d cached activations",
             p.cut_point, sum(int(np.prod(w.shape)) for w in model.trainable_weights), len(y_train))
    started = time.perf_counter()
    history = train_head.fit_keras(model, x_train, y_train, x_val, y_val, classes, p,
                                   callbacks=[keras.callbacks.BackupAndRestore(str(backup))])
    seconds = time.perf_counter() - started
    head = train_head.SoftmaxHead(model, classes, history)
    history["fit_seconds"] = seconds
    history["seconds_per_epoch"] = seconds / max(1, history["epochs_run"])
    history["train_accuracy"] = float(np.mean(head.predict(x_train) == y_train))
    if len(y_val):
        history["val_accuracy"] = float(np.mean(head.predict(x_val) == y_val))
    meta = {"stage": STAGE, "stage_version": VERSION, "key": key, "model": "top", "classes": classes,
            "params": as_dict(p), "upstream": upstream_ids, "features_file": features_result.path.name,
            "features_key": attrs["key"], "n_train": int(len(y_train)), "n_val": int(len(y_val))}
    _save(head, meta, out)
    shutil.rmtree(backup, ignore_errors=True)
    trained.record(params, base, "top", out, key, features_result.path)
    log.info("train_top: %d epochs in %.1f s (%.2f s/epoch); train accuracy %.3f%s", history["epochs_run"],
             seconds, history["seconds_per_epoch"], history["train_accuracy"],
             f", val accuracy {history['val_accuracy']:.3f}" if "val_accuracy" in history else "")
    return TopResult(out, key, True, head)
