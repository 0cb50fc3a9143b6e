"""Build a frozen backbone as a Keras model: RGB float 0..255 in, the chosen layer's activations out.

TensorFlow is imported inside ``build`` only: computing a cache key needs no TensorFlow.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.backbones import efficientnet_lite
from pipeline.backbones.registry import BACKBONES, BackboneError, BackboneSpec
from pipeline.errors import ParamsError
from pipeline.fingerprint import file_sha256

log = logging.getLogger("pipeline.backbones")

# ImageNet channel means in BGR order, for ResNet50's "caffe" preprocessing.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class Backbone:
    model: object  # keras.Model: (N, S, S, 3) float32 0..255 -> (N, D) or (N, H, W, C)
    spec: BackboneSpec
    input_size: int
    layer: str
    weights: str  # what was loaded: "imagenet", "none" or a file path
    weights_sha256: str  # sha256 over the backbone's weight tensors, as loaded
    infer: object  # compiled inference call: (N, S, S, 3) float32 tensor -> activations tensor
    feature_shape: tuple = ()  # the activations of one image

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Activations of a batch, in inference mode (BatchNorm uses its moving statistics)."""
        return np.asarray(self.infer(images))


def input_size(spec: BackboneSpec, requested: int) -> int:
    return requested or spec.input_size


def resolve_weights(spec: BackboneSpec, weights: str) -> str:
    return spec.default_weights if weights == "default" else weights


@functools.lru_cache(maxsize=16)
def _cached_file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def _weights_file_sha256(path: Path) -> str:
    stat = path.stat()
    return _cached_file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def weights_fingerprint(spec: BackboneSpec, weights: str) -> str:
    """What identifies the weights, without TensorFlow: a file's sha256, or the source's name."""
    weights = resolve_weights(spec, weights)
    if weights == "none":
        return "none"
    if weights == "imagenet" and spec.family == "lite":
        return "sha256:" + _weights_file_sha256(efficientnet_lite.packaged_weights_path(spec.name))
    if weights == "imagenet":
        import importlib.metadata

        return f"keras-applications-imagenet:{importlib.metadata.version('keras')}"
    path = Path(weights)
    if not path.is_file():
        raise ParamsError(f"features.weights: no weights file at {path}; use default, imagenet, none or a path")
    return "sha256:" + _weights_file_sha256(path)


def build(backbone: str, weights: str = "default", layer: str = "pooled", size: int = 0,
          weights_dir: str | Path = "cache/weights") -> Backbone:
    """The frozen backbone, with its weights loaded and checked, cut at ``layer``. A torch checkpoint is
    converted once into ``weights_dir``."""
    from pipeline.tf_import import keras as _quiet_keras
    keras = _quiet_keras()

    spec = BACKBONES[backbone]
    size = input_size(spec, size)
    weights = resolve_weights(spec, weights)
    if spec.family == "lite":
        full = _build_lite(spec, weights, size, Path(weights_dir))
    elif spec.family == "keras":
        full = _build_keras_application(spec, weights, size)
    else:
        full = _build_tiny(size, weights)
    full.trainable = False
    if layer not in [l.name for l in full.layers]:
        raise ParamsError(f"features.layer: {backbone} has no layer {layer!r}; valid: {', '.join(cut_points(full))}")
    model = keras.Model(full.input, full.get_layer(layer).output, name=f"{backbone}_to_{layer}")
    model.trainable = False
    import tensorflow as tf

    # A traced call avoids predict()'s per-batch set-up; retraced only for a short last batch.
    infer = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    return Backbone(model, spec, size, layer, weights, weights_checksum(model), infer,
                    tuple(int(d) for d in model.output_shape[1:]))


def cut_points(model) -> list[str]:
    """Layer names where the frozen part may end: block outputs and the pooled features."""
    names = [l.name for l in model.layers]
    blocks = [n for n in names if n.startswith("block") and n[5:].isdigit()]
    blocks += [n for n in names if n.endswith("_add") or n.endswith("_out")]
    return blocks + [n for n in ("top_activation", "pooled") if n in names]


def weights_checksum(model) -> str:
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def keras_to_numpy(variable) -> np.ndarray:
    return np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable)


def _build_lite(spec: BackboneSpec, weights: str, size: int, weights_dir: Path):
    full, names = efficientnet_lite.build(spec.name, include_top=True, input_size=size)
    if weights == "none":
        return full
    source = efficientnet_lite.packaged_weights_path(spec.name) if weights == "imagenet" else Path(weights)
    if not source.is_file():
        raise ParamsError(f"features.weights: no weights file at {source}")
    if source.name.endswith(".weights.h5"):
        full.load_weights(source)
        return full
    # Convert the torch checkpoint once; later runs load the Keras weights from the cache.
    converted = weights_dir / f"{spec.name}-{file_sha256(source)[:16]}.weights.h5"
    if converted.is_file():
        try:
            full.load_weights(converted)
            return full
        except (OSError, ValueError) as error:  # a damaged conversion (h5py, a shape mismatch) is redone
            log.warning("backbone: converted weights %s unreadable (%s); converting again", converted, error)
    log.info("backbone: converting %s to Keras weights (once)", source.name)
    efficientnet_lite.load_torch_weights(full, names, source)
    converted.parent.mkdir(parents=True, exist_ok=True)
    tmp = converted.with_name(f".{converted.name}.tmp.weights.h5")
    full.save_weights(tmp)
    tmp.replace(converted)
    return full


def _build_keras_application(spec: BackboneSpec, weights: str, size: int):
    from pipeline.tf_import import keras as _quiet_keras
    keras = _quiet_keras()
    from keras import layers

    constructor = getattr(keras.applications, spec.keras_name)
    keras_weights = None if weights == "none" else weights
    if keras_weights not in (None, "imagenet") and not Path(keras_weights).is_file():
        raise ParamsError(f"features.weights: no weights file at {keras_weights}")
    try:
        base = constructor(include_top=False, weights=keras_weights, input_shape=(size, size, 3))
    except (OSError, ValueError) as error:  # no network (URLError is an OSError), or weights of another shape
        if weights != "imagenet":
            raise ParamsError(f"features.weights: {weights} does not fit {spec.name} ({error})") from None
        raise BackboneError(
            f"could not get ImageNet weights for {spec.name} ({type(error).__name__}: {str(error)[:120]}); "
            f"where a network exists, Keras downloads them to ~/.keras/models; copy that file here and "
            f"set features.weights: /path/to/it.h5"
        ) from None
    inputs = keras.Input((size, size, 3), name="image")
    x = NORMALIZERS[spec.normalizer](inputs)
    x = base(x, training=False)
    x = layers.Identity(name="top_activation")(x)
    x = layers.GlobalAveragePooling2D(name="pooled")(x)
    return keras.Model(inputs, x, name=spec.name)


def _symmetric(inputs):
    from keras import layers

    return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)


def _caffe(inputs):
    """RGB -> BGR and mean subtraction as one fixed 1x1 convolution."""
    from keras import layers

    permute = np.zeros((1, 1, 3, 3), np.float32)
    permute[0, 0, [0, 1, 2], [2, 1, 0]] = 1.0
    normalize = layers.Conv2D(3, 1, name="normalize", trainable=False)
    x = normalize(inputs)
    normalize.set_weights([permute, -np.array(_CAFFE_MEAN_BGR, np.float32)])
    return x


# BackboneSpec.normalizer -> the layers put before a keras.applications network
NORMALIZERS = {"symmetric": _symmetric, "caffe": _caffe, "none": lambda inputs: inputs}


def _build_tiny(size: int, weights: str):
    from pipeline.tf_import import keras as _quiet_keras
    keras = _quiet_keras()
    from keras import layers

    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="normalize")(inputs)
    for i, filters in enumerate((8, 16)):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name=f"block{i}",
                          kernel_initializer=keras.initializers.GlorotUniform(seed=i + 1))(x)
    x = layers.Identity(name="top_activation")(x)
    x = layers.GlobalAveragePooling2D(name="pooled")(x)
    model = keras.Model(inputs, x, name="tiny")
    if weights not in ("none", "imagenet"):
        model.load_weights(weights)
    return model
