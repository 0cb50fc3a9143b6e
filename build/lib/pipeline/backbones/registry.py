"""The backbones on offer, as plain data: importing this does not import TensorFlow."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import PipelineError


class BackboneError(PipelineError, RuntimeError):
    """A backbone that cannot be built or used: missing weights, a wrong layer, a conversion that
    does not answer like Keras."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "lite": EfficientNet-Lite built here; "keras": keras.applications; "tiny": tests
    input_size: int  # default square input size in pixels
    preprocessing: str  # what happens to RGB 0..255 inside the model, in words (recorded in caches and exports)
    default_weights: str  # what weights: default resolves to
    keras_name: str = ""  # class name in keras.applications
    # the normalisation layer the builder puts before a keras.applications network (keras_models.NORMALIZERS):
    # "symmetric" x / 127.5 - 1, "caffe" RGB->BGR minus the ImageNet mean, "none" (the network normalises inside)
    normalizer: str = "none"


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("efficientnet_lite0", "lite", 224, "(x - 127) / 128", "imagenet"),
        BackboneSpec("efficientnet_lite1", "lite", 240, "(x - 127) / 128", "imagenet"),
        BackboneSpec("efficientnet_lite2", "lite", 260, "(x - 127) / 128", "imagenet"),
        BackboneSpec("mobilenet_v2", "keras", 224, "x / 127.5 - 1", "imagenet", "MobileNetV2", "symmetric"),
        BackboneSpec("mobilenet_v3_small", "keras", 224, "inside the Keras model", "imagenet",
                     "MobileNetV3Small"),
        BackboneSpec("efficientnet_b0", "keras", 224, "inside the Keras model", "imagenet", "EfficientNetB0"),
        BackboneSpec("resnet50", "keras", 224, "RGB->BGR, minus ImageNet mean (caffe)", "imagenet", "ResNet50",
                     "caffe"),
        # A few-kilobyte random network with fixed seeds: fast tests where real weights are not the point.
        BackboneSpec("tiny", "tiny", 32, "x / 255", "none"),
    ]
}
