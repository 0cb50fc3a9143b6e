"""The middle rung: cut-point caches, train-top, hidden layers, advice, comparison."""
import json
import shutil

import keras
import numpy as np
import pytest

from pipeline import advise, backbones, evaluate, feature_store, features, params as params_mod, train_head, \
    train_top, trained
from pipeline.params import ParamsError

from conftest import make_params, shared_dataset
from test_features import CountingBuild


def test_cut_point_cache_is_float16_spatial_and_switching_is_free(project, monkeypatch):
    pooled = features.run(make_params(project), project)
    cut = features.run(make_params(project, features={"layer": "block0", "dtype": "float16"}), project)
    assert cut.path != pooled.path
    table = feature_store.read_table(cut.path)
    assert table.features.shape == (36, 16, 16, 8)
    import h5py

    with h5py.File(cut.path) as f:
        assert f["features"].dtype == np.float16 and f["features"].compression == "gzip"
    counter = CountingBuild(monkeypatch)
    features.run(make_params(project), project)
    features.run(make_params(project, features={"layer": "block0", "dtype": "float16"}), project)
    assert counter.builds == 0  # back and forth: both caches are hits


def test_top_layers_on_the_cut_cache_give_the_pooled_features(project):
    pooled = feature_store.read_table(features.run(make_params(project), project).path)
    cut = feature_store.read_table(
        features.run(make_params(project, features={"layer": "block0", "dtype": "float16"}), project).path)
    full = backbones.build("tiny", layer="pooled", cache_dir=project / "cache")
    top = train_top.build_top(full.model, "block0")
    assert "block0" not in [l.name for l in top.layers[1:]] and "normalize" not in [l.name for l in top.layers]
    from_cut = np.asarray(top(cut.features))
    np.testing.assert_allclose(from_cut, pooled.features, rtol=1e-2, atol=1e-3)


@pytest.fixture(scope="module")
def lite_project(tmp_path_factory):
    """20 photos in each of two classes, with EfficientNet-Lite0 (real BatchNorm layers above the cut)."""
    project = tmp_path_factory.mktemp("lite")
    source = shared_dataset("dogs_vs_cats_1k")
    for label in ("cats", "dogs"):
        (project / "photos" / label).mkdir(parents=True)
        for path in sorted((source / label).iterdir())[:20]:
            shutil.copy(path, project / "photos" / label / path.name)
    return project


def lite_params(project, **top):
    return make_params(project, features={"backbone": "efficientnet_lite0", "batch_size": 16},
                       data={"train_fraction": 0.6, "val_fraction": 0.2, "test_fraction": 0.2},
                       train_top={"cut_point": "block14", "epochs": 3, "patience": 0, "learning_rate": 0.001,
                                  **top})


@pytest.mark.slow
def test_lite0_top_blocks_reproduce_the_pooled_features(lite_project):
    params = lite_params(lite_project)
    pooled = feature_store.read_table(features.run(params, lite_project).path)
    cut = feature_store.read_table(features.run(train_top.cut_params(params), lite_project).path)
    full = backbones.build("efficientnet_lite0", layer="pooled", cache_dir=lite_project / "cache")
    top = train_top.build_top(full.model, "block14")
    from_cut = np.asarray(top(cut.features, training=False))
    assert np.abs(from_cut - pooled.features).max() < 0.02 * np.abs(pooled.features).max()  # float16 input


@pytest.mark.slow
def test_train_top_keeps_batchnorm_statistics_and_never_runs_the_frozen_layers(lite_project, monkeypatch):
    params = lite_params(lite_project)
    features.run(train_top.cut_params(params), lite_project)  # the cut-point cache exists before training

    def no_backbone_runs(*args, **kwargs):
        raise AssertionError("train-top ran the frozen backbone over images")

    monkeypatch.setattr(features, "featurise_files", no_backbone_runs)
    frozen_calls = []
    real_build_top = train_top.build_top

    def build_top_with_tripwires(full_model, cut_point):
        top = real_build_top(full_model, cut_point)
        inside = {id(layer) for layer in top.layers}
        frozen = [layer for layer in full_model.layers if id(layer) not in inside]
        assert any(layer.name == "stem_conv" for layer in frozen)
        for layer in frozen:  # any call of a layer below the cut is recorded
            layer.call = lambda *args, _name=layer.name, **kwargs: frozen_calls.append(_name)
        return top

    monkeypatch.setattr(train_top, "build_top", build_top_with_tripwires)
    before = {}
    real_fit = train_head.fit_keras

    def fit_and_watch(model, *args, **kwargs):
        top = model.get_layer("top")
        for layer in top.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                before[layer.name] = [np.array(w) for w in layer.get_weights()]
        before["conv"] = np.array(top.get_layer("top_conv").kernel)
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(train_head, "fit_keras", fit_and_watch)
    result = train_top.run(params, lite_project)
    top = result.model.model_.get_layer("top")
    bn_layers = [l for l in top.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bn_layers) >= 3
    for layer in bn_layers:
        assert not layer.trainable
        for old, new in zip(before[layer.name], layer.get_weights()):
            np.testing.assert_array_equal(old, new)  # moving mean/variance, gamma, beta: untouched
    assert not np.allclose(before["conv"], np.array(top.get_layer("top_conv").kernel))  # the top did train
    assert frozen_calls == []  # training and prediction never called a layer below the cut


@pytest.mark.slow
def test_train_top_rung_is_evaluated_compared_and_exported(lite_project):
    params = lite_params(lite_project)
    train_head.run(params, lite_project) if features.run(params, lite_project) else None
    result = train_top.run(params, lite_project)
    assert trained.last_rung(params, lite_project) == "top"
    assert result.model.history["epochs_run"] == 3
    again = train_top.run(params, lite_project)
    assert not again.trained
    metrics = evaluate.run(params, lite_project).metrics
    assert metrics["rung"] == "top" and metrics["features"]["layer"] == "block14"
    table = evaluate.compare(params, lite_project)
    lines = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "pooled" in lines["head"] and "block14" in lines["top"]
    assert "not trained for these params ('make finetune')" in lines["finetune"]
    from pipeline import export

    exported = export.run(params, lite_project)
    # the reference went through float16 activations, so export widens its tolerance to 2e-3
    assert all(v["max_abs_diff"] <= 2e-3 for v in exported.parity.values())


@pytest.mark.slow
def test_an_interrupted_train_top_continues_from_its_backup(lite_project, monkeypatch):
    params = lite_params(lite_project, epochs=4, seed=7)
    real_fit = train_head.fit_keras

    class StopAfterTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    def interrupted(model, *args, callbacks=(), **kwargs):
        return real_fit(model, *args, callbacks=[*callbacks, StopAfterTwo()], **kwargs)

    monkeypatch.setattr(train_head, "fit_keras", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_top.run(params, lite_project)
    assert list((lite_project / "cache" / "tops").glob("*.backup"))
    monkeypatch.setattr(train_head, "fit_keras", real_fit)
    result = train_top.run(params, lite_project)
    assert result.model.history["epochs_run"] == 2  # epochs 3 and 4 only: 1 and 2 came from the backup
    assert not list((lite_project / "cache" / "tops").glob("*.backup"))


def test_wrong_cut_point_names_the_valid_ones(project):
    with pytest.raises(ValueError, match="^train_top.cut_point: tiny has no layer 'block99'; valid: block0, block1"):
        train_top.run(make_params(project, train_top={"cut_point": "block99"}), project)


def test_hidden_units_in_the_softmax_head(project):
    params = make_params(project, train_head={"model": "softmax", "hidden_units": [8], "epochs": 5})
    features.run(params, project)
    head = train_head.run(params, project).head
    assert [l.name for l in head.model_.layers if l.name.startswith("hidden")] == ["hidden_0"]
    with pytest.raises(ParamsError, match="hidden_units needs model: softmax"):
        params_mod.load(None, ["train_head.hidden_units=[8]"])


@pytest.mark.parametrize("smallest, rung", [(10, "head"), (299, "head"), (300, "top"), (1999, "top"),
                                            (2000, "finetune"), (50_000, "finetune")])
def test_advice_thresholds(smallest, rung):
    advice = advise.recommend(advise.Summary({"tigger": smallest, "misty": smallest + 500}))
    assert advice.rung == rung
    assert f"the smallest class (tigger) has {smallest}" in advice.reasons[0]


def test_advice_notes_small_images():
    advice = advise.recommend(advise.Summary({"a": 50, "b": 60}, median_short_side=32))
    assert any("images are small" in r for r in advice.reasons)
    assert not any("images are small" in r for r in advise.recommend(advise.Summary({"a": 50, "b": 60}, 300)).reasons)


def test_advice_from_a_scanned_dataset(project):
    from pipeline import dataset

    summary = advise.summarise(dataset.scan(make_params(project).data, project))
    assert set(summary.train_per_class) == {"misty", "tigger", "neither"}
    assert summary.median_short_side == 40
    assert "recommended rung: head" in advise.format_advice(advise.recommend(summary))


def test_finetune_two_phases_on_the_images(project):
    from pipeline import export, finetune, predict

    base_params = make_params(project, finetune={"epochs_head": 2, "epochs_all": 0, "batch_size": 8})
    features.run(base_params, project)
    head_only = finetune.run(base_params, project)
    network = head_only.model.model_.get_layer("tiny_to_pooled")
    pretrained = backbones.build("tiny", cache_dir=project / "cache").model
    for a, b in zip(network.get_weights(), pretrained.get_weights()):
        np.testing.assert_array_equal(a, b)  # phase 1 alone leaves the backbone as pretrained
    assert {"augment_flip", "augment_zoom", "augment_brightness", "augment_contrast"} <= \
        {l.name for l in head_only.model.model_.layers}

    params = make_params(project, finetune={"epochs_head": 2, "epochs_all": 3, "batch_size": 8,
                                            "learning_rate_all": 0.01})
    result = finetune.run(params, project)
    assert set(result.model.history["phases"]) == {"head", "all"}
    changed = result.model.model_.get_layer("tiny_to_pooled").get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(changed, pretrained.get_weights()))
    assert trained.last_rung(params, project) == "finetune"
    assert not finetune.run(params, project).trained  # a cache hit the second time

    metrics = evaluate.run(params, project).metrics
    assert metrics["rung"] == "finetune" and metrics["n_test"] > 0
    assert "finetune" in evaluate.compare(params, project)
    photo = project / "photos" / "misty" / "misty_03.png"
    label = predict.run(params, project, [photo])[0].labels[0]
    assert label in ("misty", "tigger", "neither")
    exported = export.run(params, project)
    assert all(v["max_abs_diff"] <= 1e-4 for v in exported.parity.values())


@pytest.mark.parametrize("strategy, rung", [("auto", "head"), ("top", "top")])
def test_train_strategy(tmp_path, strategy, rung):
    import subprocess
    import sys

    from conftest import ROOT, make_dataset

    make_dataset(tmp_path / "photos", per_class=10)
    (tmp_path / "params.yaml").write_text(
        "data: {root: photos, train_fraction: 0.6, val_fraction: 0.2, test_fraction: 0.2}\n"
        f"features: {{backbone: tiny}}\ntrain: {{strategy: {strategy}}}\ntrain_top: {{cut_point: block0, epochs: 2}}\n")
    out = subprocess.run([sys.executable, "-m", "pipeline", "train"], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("recommended rung: head" in out.stdout) == (strategy == "auto")
    assert json.loads((tmp_path / "cache" / "model.json").read_text())["rung"] == rung
