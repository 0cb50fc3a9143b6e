"""The converted EfficientNet-Lite0 weights are the real ImageNet ones."""
import pickle

import numpy as np
import pytest
from PIL import Image

from pipeline.backbones import efficientnet_lite
from pipeline.backbones import keras_models as backbones
from pipeline.backbones.torch_pickle import load_legacy_state_dict

DOMESTIC_CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    path = efficientnet_lite.packaged_weights_path("efficientnet_lite0")
    model, names = efficientnet_lite.build("efficientnet_lite0", include_top=True)
    efficientnet_lite.load_torch_weights(model, names, path)
    return model, names, path


# ImageNet classes of three photographs scikit-image ships: what any correct set of weights answers.
EXPECTED = {
    "chelsea": ("top1", set(DOMESTIC_CATS)),  # a tabby cat
    "coffee": ("top1", {967, 968, 504}),  # espresso, cup, coffee mug
    "rocket": ("top5", {657, 744, 812}),  # missile, projectile, space shuttle
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_imagenet_answers_on_known_photographs(lite0, name):
    from skimage import data

    model = lite0[0]
    image = np.asarray(Image.fromarray(getattr(data, name)()).resize((224, 224), Image.BILINEAR), np.float32)
    probabilities = np.asarray(model(image[None], training=False))[0]
    ranked = np.argsort(-probabilities)
    where, classes = EXPECTED[name]
    found = {int(ranked[0])} if where == "top1" else set(ranked[:5].tolist())
    assert found & classes, (name, ranked[:5])


def test_legacy_reader_rebuilds_every_tensor(lite0):
    model, names, path = lite0
    state = load_legacy_state_dict(path)
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    # the file's tensors against the network built here from the architecture: every weight of every
    # layer, plus one batch counter per BatchNorm layer, which Keras does not keep
    batch_norms = sum(1 for layer in model.layers if type(layer).__name__ == "BatchNormalization")
    keras_total = sum(int(np.prod(w.shape)) for w in model.weights)
    assert sum(v.size for v in state.values()) == keras_total + batch_norms
    assert round(keras_total / 1e6, 1) == 4.7  # EfficientNet-Lite0's published parameter count


def test_reader_refuses_code_in_the_pickle(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for value in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(value, f, protocol=2)
        pickle.dump(__import__("os").system, f, protocol=2)  # a global outside the allow-list
    with pytest.raises(pickle.UnpicklingError, match="refusing to load 'posix.system'"):
        load_legacy_state_dict(path)


def test_unused_tensor_is_an_error(lite0, tmp_path, monkeypatch):
    model, names, path = lite0
    real = efficientnet_lite.load_legacy_state_dict
    monkeypatch.setattr(efficientnet_lite, "load_legacy_state_dict",
                        lambda p: {**real(p), "_extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="1 tensors were not used"):
        efficientnet_lite.load_torch_weights(model, names, path)


def test_shape_mismatch_is_an_error(lite0, monkeypatch):
    model, names, path = lite0
    real = efficientnet_lite.load_legacy_state_dict

    def broken(p):
        state = real(p)
        state["_fc.bias"] = np.zeros(999, np.float32)
        return state

    monkeypatch.setattr(efficientnet_lite, "load_legacy_state_dict", broken)
    with pytest.raises(ValueError, match="_fc has shapes"):
        efficientnet_lite.load_torch_weights(model, names, path)


def test_converted_weights_are_cached_and_reloaded(tmp_path, lite0, monkeypatch):
    first = backbones.build("efficientnet_lite0", weights_dir=tmp_path)
    assert len(list(tmp_path.glob("efficientnet_lite0-*.weights.h5"))) == 1

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(efficientnet_lite, "load_torch_weights", no_conversion)
    second = backbones.build("efficientnet_lite0", weights_dir=tmp_path)
    assert first.weights_sha256 == second.weights_sha256


def test_wrong_cut_point_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"no layer 'block99'; valid: block0, block1"):
        backbones.build("tiny", layer="block99", weights_dir=tmp_path)


def test_keras_application_download_failure_says_how_to_use_a_local_file(tmp_path, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(keras.applications, "MobileNetV2", offline)
    with pytest.raises(RuntimeError, match=r"could not get ImageNet weights for mobilenet_v2.*features.weights"):
        backbones.build("mobilenet_v2", weights="imagenet", weights_dir=tmp_path)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "resnet50"])
def test_keras_applications_build_without_weights(name, tmp_path):
    backbone = backbones.build(name, weights="none", weights_dir=tmp_path, size=64)
    out = backbone.model.predict_on_batch(np.zeros((1, 64, 64, 3), np.float32))
    assert out.ndim == 2 and out.shape[0] == 1
