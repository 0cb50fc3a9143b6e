"""Stage `train-top`: the middle rung. The backbone's layers above a cut point, and a softmax,
trained on the activations cached at the cut point.

The frozen part (input to ``train_top.cut_point``) runs once per photo in the ``top-features``
stage; this stage never runs it again, and streams the cached activations a batch at a time. The
layers above the cut start from their pretrained weights; their BatchNormalization layers stay
frozen in inference mode (fine-tuning a BN layer on a few hundred photos wrecks its statistics).
Two phases, as the Keras transfer-learning guide does it: the new softmax alone
(``epochs_head``), so that large random gradients never reach the pretrained layers, then the
top layers as well at a low learning rate. Early stopping on val, a backup of every epoch.
"""
from __future__ import annotations

from pipeline.stages.contract import FitJob, Rung, TrainingError
from pipeline.tf_import import keras as quiet_keras
from pipeline.training import keras_fit
from pipeline.training.classifiers import KerasClassifier
from pipeline.training.inputs import CachedInputs

# Bump when a model trained with the same params and activations would come out different.
VERSION = 2


def open_inputs(project) -> CachedInputs:
    params = project.params
    path = project.top_features_file()
    inputs = CachedInputs(path, project.labels_file(path),
                          missing=f"no cached activations at train_top.cut_point {params.train_top.cut_point!r} "
                                  f"({path}); run 'make top-features' first")
    if len(inputs.shape) != 3:
        raise TrainingError(f"train_top.cut_point {params.train_top.cut_point!r} is not a spatial block output; "
                            "choose a block name such as block14")
    return inputs


def build_top(backbone_model, cut_point: str):
    """The pretrained layers from ``cut_point`` to the pooled features, as a model of their own:
    (N, H, W, C) activations -> (N, D). The layers before the cut are not part of it."""
    keras = quiet_keras()
    return keras.Model(backbone_model.get_layer(cut_point).output, backbone_model.get_layer("pooled").output,
                       name="top")


def fit(inputs: CachedInputs, job: FitJob):
    from pipeline.backbones import keras_models

    keras = quiet_keras()
    from keras import layers

    p, f = job.params.train_top, job.params.features
    keras.utils.set_random_seed(p.seed)
    full = keras_models.build(f.backbone, f.weights, "pooled", f.image_size, job.weights_dir)
    frozen_part = keras.Model(full.model.input, full.model.get_layer(p.cut_point).output)
    if inputs.attrs["weights_sha256"] != keras_models.weights_checksum(frozen_part):
        raise TrainingError(f"the backbone's weights differ from those of {inputs.path.name}; "
                            "run 'make top-features' again")
    top = build_top(full.model, p.cut_point)
    x_in = keras.Input(inputs.shape, name="activations")
    x = top(x_in)
    for i, units in enumerate(p.hidden_units):
        x = layers.Dropout(p.dropout, name=f"dropout_{i}")(x)
        x = layers.Dense(units, activation="relu", name=f"hidden_{i}")(x)
    x = layers.Dropout(p.dropout, name="dropout")(x)
    model = keras.Model(x_in, layers.Dense(len(inputs.classes), activation="softmax", name="softmax")(x),
                        name="top_and_head")
    phases = keras_fit.pretrained_phases(top, p.epochs_head, p.learning_rate_head, p.epochs, p.learning_rate)
    schedule = keras_fit.Schedule(phases, p.batch_size, p.patience, p.class_weight, p.seed)
    history = keras_fit.fit(model, inputs, job.train, job.val, schedule, job.backup, job.log)
    return KerasClassifier(model, inputs.classes, history)


RUNG = Rung(name="top", stage="train-top", section="train_top", version=VERSION,
            summary="train the backbone's blocks above train_top.cut_point on their cached input",
            input_stage="top-features", open_inputs=open_inputs, fit=fit)
run = RUNG.train
