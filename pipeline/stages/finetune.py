"""Stage `finetune`: the top rung. The whole network, trained from its pretrained start on the photos.

With lots of data the pretrained weights are only the starting point. Two phases, as the Keras
transfer-learning guide does it:
1. the backbone frozen, only the new softmax learns, so that large random gradients never reach
   the pretrained layers;
2. every layer learns at a low learning rate, BatchNormalization layers kept frozen in inference mode.
The photos are those the features stage listed (its rows, labels and splits), decoded and resized
exactly as there, a batch at a time on threads (memory does not grow with the dataset), with
online augmentation (flips, zoom, brightness and contrast) active only while training. Early
stopping on val, a backup of every epoch.
"""
from __future__ import annotations

from pipeline import runtime
from pipeline.stages.contract import FitJob, Rung, TrainingError
from pipeline.tf_import import keras as quiet_keras
from pipeline.training import keras_fit
from pipeline.training.classifiers import KerasClassifier
from pipeline.training.inputs import ImageInputs

# Bump when a model trained with the same params and photos would come out different.
VERSION = 2


def open_inputs(project) -> ImageInputs:
    path = project.features_file()
    f = project.params.features
    size = runtime.input_size(f)
    return ImageInputs(path, project.labels_file(path), project.data_root, size, runtime.resizer(f, size),
                       (runtime.draft_size(f), f.max_pixels),
                       workers=f.workers,
                       missing=f"no cached features at {path}; run 'make features' first (finetune trains on the "
                               "photos it lists)")


def fit(inputs: ImageInputs, job: FitJob):
    from pipeline.backbones import keras_models

    keras = quiet_keras()
    from keras import layers

    p, f = job.params.finetune, job.params.features
    keras.utils.set_random_seed(p.seed)
    backbone = keras_models.build(f.backbone, f.weights, "pooled", f.image_size, job.weights_dir)
    if inputs.attrs["weights_sha256"] != backbone.weights_sha256 and inputs.attrs["layer"] == "pooled":
        raise TrainingError(f"the backbone's weights differ from those of {inputs.path.name}; run 'make features' again")
    network = backbone.model
    x_in = keras.Input(inputs.shape, name="image")
    x = x_in
    if p.flip:
        x = layers.RandomFlip("horizontal", seed=p.seed, name="augment_flip")(x)
    if p.zoom:
        x = layers.RandomZoom((-p.zoom, 0.0), seed=p.seed, name="augment_zoom")(x)  # crops in, up to `zoom`
    if p.color:
        x = layers.RandomBrightness(p.color, value_range=(0, 255), seed=p.seed, name="augment_brightness")(x)
        x = layers.RandomContrast(p.color, seed=p.seed, name="augment_contrast")(x)
    x = network(x)
    x = layers.Dropout(p.dropout, name="dropout")(x)
    model = keras.Model(x_in, layers.Dense(len(inputs.classes), activation="softmax", name="softmax")(x),
                        name="finetuned")
    phases = keras_fit.pretrained_phases(network, p.epochs_head, p.learning_rate_head, p.epochs_all,
                                         p.learning_rate_all)
    schedule = keras_fit.Schedule(phases, p.batch_size, p.patience, p.class_weight, p.seed)
    history = keras_fit.fit(model, inputs, job.train, job.val, schedule, job.backup, job.log)
    return KerasClassifier(model, inputs.classes, history)


RUNG = Rung(name="finetune", stage="finetune", section="finetune", version=VERSION,
            summary="train every layer from the pretrained start on the photos (two phases, augmentation)",
            input_stage="features", open_inputs=open_inputs, fit=fit)
run = RUNG.train
