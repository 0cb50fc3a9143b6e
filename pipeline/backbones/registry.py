"""The backbones on offer, as plain data: importing this does not import TensorFlow."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "lite": EfficientNet-Lite built here; "keras": keras.applications; "tiny": tests
    input_size: int  # default square input size in pixels
    preprocessing: str  # what happens to RGB 0..255 inside the model
    default_weights: str  # what weights: default resolves to
    keras_name: str = ""  # class name in keras.applications


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("efficientnet_lite0", "lite", 224, "(x - 127) / 128", "imagenet"),
        BackboneSpec("efficientnet_lite1", "lite", 240, "(x - 127) / 128", "imagenet"),
        BackboneSpec("efficientnet_lite2", "lite", 260, "(x - 127) / 128", "imagenet"),
        BackboneSpec("mobilenet_v2", "keras", 224, "x / 127.5 - 1", "imagenet", "MobileNetV2"),
        BackboneSpec("mobilenet_v3_small", "keras", 224, "inside the Keras model", "imagenet",
                     "MobileNetV3Small"),
        BackboneSpec("efficientnet_b0", "keras", 224, "inside the Keras model", "imagenet", "EfficientNetB0"),
        BackboneSpec("resnet50", "keras", 224, "RGB->BGR, minus ImageNet mean (caffe)", "imagenet", "ResNet50"),
        # A few-kilobyte random network with fixed seeds: fast tests where real weights are not the point.
        BackboneSpec("tiny", "tiny", 32, "x / 255", "none"),
    ]
}
