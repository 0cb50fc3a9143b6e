"""Stage `finetune`: the top rung. Train the whole network from its pretrained start, on the images.

With lots of data, the pretrained weights are only the starting point. Two phases, as the Keras
transfer-learning guide does it:
1. the backbone frozen, only the new softmax trains (warm-started from train-head's head when there
   is one), so that large random gradients never reach the pretrained layers;
2. every layer trains at a low learning rate, BatchNormalization layers kept frozen in inference
   mode.
Images are decoded and resized exactly as in the features stage, on threads, batch by batch
(memory does not grow with the dataset), with online augmentation (flips, zoom, brightness and
contrast) that is active only while training. Early stopping on val; every epoch is backed up so
that an interrupted run continues.
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

STAGE = "finetune"
# Bump when a model trained with the same params and images would come out different.
VERSION = 1

log = logging.getLogger("pipeline.finetune")


@dataclass(frozen=True)
class FinetuneResult:
    path: Path
    key: str
    trained: bool
    model: object  # FinetunedModel


def pooled_params(params: Params) -> Params:
    return dataclasses.replace(params, features=dataclasses.replace(params.features, layer="pooled"))


def cache_key(params: Params, pooled_attrs: dict, warm) -> tuple[str, dict]:
    """The pooled cache's content hash names the images, labels, splits and backbone configuration."""
    upstream_ids = {"features": pooled_attrs["content_hash"], "warm_head": warm[0] if warm else None}
    return stage_key(STAGE, VERSION, key_fields(params.finetune), upstream_ids), upstream_ids


def model_dir(params: Params, base: Path, key: str) -> Path:
    return base / params.paths.cache_dir / "finetuned" / key[:16]


def find(params: Params, base: Path) -> Path | None:
    from pipeline import train_top

    try:
        attrs = feature_store.read_attrs(features.cache_file(pooled_params(params), base))
    except feature_store.CacheError:
        return None
    warm = train_top.warm_head(params, base) if params.finetune.warm_start else None
    folder = model_dir(params, base, cache_key(params, attrs, warm)[0])
    return folder if (folder / "head.json").is_file() else None


class FinetunedModel:
    """The fine-tuned network: (N, S, S, 3) float32 0..255 (after FitToSize) -> probabilities."""

    def __init__(self, model, classes: list[str], history: dict, input_size: int, resize: str):
        self.model_ = model
        self.classes = classes
        self.history = history
        self.input_size = input_size
        self.resize = resize

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        blocks = [np.asarray(self.model_(images[i:i + 32], training=False), dtype=np.float64)
                  for i in range(0, len(images), 32)]
        return np.concatenate(blocks) if blocks else np.zeros((0, len(self.classes)))

    def predict_files(self, paths) -> np.ndarray:
        """(N, n_classes) for image files, decoded and resized as in the features stage."""
        from pipeline.images import decode_rgb
        from pipeline.preprocessing import single_image_resizer

        resize = single_image_resizer(self.input_size, self.resize)
        rows = []
        for start in range(0, len(paths), 32):
            batch = np.stack([resize(decode_rgb(p, self.input_size)) for p in paths[start:start + 32]])
            rows.append(self.predict_images(batch))
        return np.concatenate(rows) if rows else np.zeros((0, len(self.classes)))

    def image_model(self):
        """The Keras model over resized images (augmentation layers are inactive at inference)."""
        return self.model_

    def save(self, folder: Path) -> None:
        self.model_.save(folder / "finetuned.keras")

    @classmethod
    def load(cls, folder: Path, meta: dict, history: dict) -> "FinetunedModel":
        from pipeline.tf_import import keras

        model = keras().saving.load_model(folder / "finetuned.keras")
        return cls(model, meta["classes"], history, meta["input_size"], meta["resize"])


def _batches(keras, paths, labels, size: int, resize: str, batch_size: int, shuffle: bool, seed: int):
    """A keras PyDataset that decodes one batch at a time on 2 threads."""
    from pipeline.images import ImageError, decode_rgb
    from pipeline.preprocessing import single_image_resizer

    to_input = single_image_resizer(size, resize)

    class ImageBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=2, use_multiprocessing=False)
            self.order = np.arange(len(paths))
            self.rng = np.random.default_rng(seed)
            if shuffle:
                self.rng.shuffle(self.order)

        def __len__(self):
            return int(np.ceil(len(paths) / batch_size))

        def __getitem__(self, index):
            chosen = self.order[index * batch_size:(index + 1) * batch_size]
            try:
                images = np.stack([to_input(decode_rgb(paths[i], size)) for i in chosen])
            except ImageError as error:
                raise TrainingError(f"an image changed since 'make features' ({error}); run it again") from None
            return images, labels[chosen]

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

    return ImageBatches()


def run(params: Params, base: str | Path = ".") -> FinetuneResult:
    from pipeline import train_top

    base = Path(base)
    p = params.finetune
    pooled = pooled_params(params)
    features_result = features.run(pooled, base)  # the list of images and their splits; a hit when cached
    attrs = feature_store.read_attrs(features_result.path)
    warm = train_top.warm_head(params, base) if p.warm_start else None
    key, upstream_ids = cache_key(params, attrs, warm)
    out = model_dir(params, base, key)
    cached = train_head.reuse(STAGE, "finetune", params, base, out, key, features_result.path)
    if cached is not None:
        return FinetuneResult(out, key, False, cached)

    from pipeline import backbones
    from pipeline.tf_import import keras as quiet_keras

    keras = quiet_keras()
    from keras import layers

    keras.utils.set_random_seed(p.seed)
    table = feature_store.read_table(features_result.path)
    classes = list(table.attrs["classes"])
    root = base / params.data.root
    split_data = {}
    for split in ("train", "val"):
        mask = table.splits == split
        split_data[split] = ([root / path for path in table.paths[mask]],
                             np.array([classes.index(c) for c in table.labels[mask]]))
    missing = sorted(set(classes) - set(table.labels[table.splits == "train"].tolist()))
    if missing:
        raise TrainingError(f"class(es) {', '.join(missing)} have no images in the train split")
    f = params.features
    backbone = backbones.build(f.backbone, f.weights, "pooled", f.image_size, base / params.paths.cache_dir)
    size = backbone.input_size
    network = backbone.model

    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    if p.flip:
        x = layers.RandomFlip("horizontal", seed=p.seed, name="augment_flip")(x)
    if p.zoom:
        x = layers.RandomZoom((-p.zoom, 0.0), seed=p.seed, name="augment_zoom")(x)  # crops in, up to `zoom`
    if p.color:
        x = layers.RandomBrightness(p.color, value_range=(0, 255), seed=p.seed, name="augment_brightness")(x)
        x = layers.RandomContrast(p.color, seed=p.seed, name="augment_contrast")(x)
    x = network(x)
    x = layers.Dropout(p.dropout, name="dropout")(x)
    softmax = layers.Dense(len(classes), activation="softmax", name="softmax")
    model = keras.Model(inputs, softmax(x), name="finetuned")
    train_top.warm_start(softmax, warm, classes, int(network.output.shape[-1]), "finetune")

    train = _batches(keras, *split_data["train"], size, f.resize, p.batch_size, True, p.seed)
    has_val = len(split_data["val"][0]) > 0
    val = _batches(keras, *split_data["val"], size, f.resize, p.batch_size, False, p.seed) if has_val else None
    weights = train_head._class_weights(table.labels[table.splits == "train"], classes, p.class_weight)
    class_weight = {classes.index(c): w for c, w in weights.items()} if weights else None
    backup = out.with_name(out.name + ".backup")
    history: dict = {"phases": {}}
    started = time.perf_counter()
    for phase, epochs, rate in (("head", p.epochs_head, p.learning_rate_head),
                                ("all", p.epochs_all, p.learning_rate_all)):
        if not epochs:
            continue
        network.trainable = phase == "all"
        for layer in network.layers:
            if type(layer).__name__ == "BatchNormalization":
                layer.trainable = False  # inference mode, statistics kept, in both phases
        model.compile(optimizer=keras.optimizers.Adam(rate), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        callbacks = [keras.callbacks.BackupAndRestore(str(backup / phase))]
        if has_val and p.patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=p.patience,
                                                           restore_best_weights=True))
        log.info("finetune: phase %s, %d trainable weights, up to %d epochs", phase,
                 sum(int(np.prod(w.shape)) for w in model.trainable_weights), epochs)
        fitted = model.fit(train, validation_data=val, epochs=epochs, class_weight=class_weight,
                           callbacks=callbacks, verbose=0)
        history["phases"][phase] = {k: [float(v) for v in values] for k, values in fitted.history.items()}
    seconds = time.perf_counter() - started
    history["epochs"] = {k: sum((h.get(k, []) for h in history["phases"].values()), [])
                         for k in ("loss", "val_loss", "accuracy", "val_accuracy")}
    history["epochs_run"] = len(history["epochs"]["loss"])
    history["fit_seconds"] = seconds
    result = FinetunedModel(model, classes, history, size, f.resize)
    if has_val:
        predicted = np.argmax(result.predict_files(split_data["val"][0]), axis=1)
        history["val_accuracy"] = float(np.mean(predicted == split_data["val"][1]))
    meta = {"stage": STAGE, "stage_version": VERSION, "key": key, "model": "finetune", "classes": classes,
            "params": as_dict(p), "upstream": upstream_ids, "features_file": features_result.path.name,
            "features_key": attrs["key"], "input_size": size, "resize": f.resize,
            "n_train": int(len(split_data["train"][0])), "n_val": int(len(split_data["val"][0]))}
    _save(result, meta, out)
    shutil.rmtree(backup, ignore_errors=True)
    trained.record(params, base, "finetune", out, key, features_result.path)
    log.info("finetune: %d epochs in %.1f s%s", history["epochs_run"], seconds,
             f"; val accuracy {history['val_accuracy']:.3f}" if has_val else "")
    return FinetuneResult(out, key, True, result)
