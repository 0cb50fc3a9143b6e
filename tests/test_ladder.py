"""The ladder: cut-point caches, train-top, finetune, hidden layers, advice, the strategy, comparison."""
import json
import shutil

import h5py
import keras
import numpy as np
import pytest

from pipeline import params as params_mod
from pipeline import runtime
from pipeline.backbones import keras_models
from pipeline.params import ParamsError
from pipeline.project import open_project
from pipeline.stages import evaluate, features, finetune, ladder, train_head, train_top
from pipeline.training import advise, keras_fit
from pipeline.use import compare, export, predict

from conftest import CountingBackbone, cli, make_dataset, make_params, shared_dataset, table_of


def test_cut_point_cache_is_float16_spatial_and_switching_is_free(project, monkeypatch):
    params = make_params(project, train_top={"cut_point": "block0"})
    pooled = features.run(open_project(params, project))
    cut = features.run_top(open_project(params, project))
    assert cut.path != pooled.path
    with h5py.File(cut.path) as f:
        assert f["features"].shape == (36, 16, 16, 8)
        assert f["features"].dtype == np.float16 and f["features"].compression == "gzip"
    counter = CountingBackbone(monkeypatch)
    features.run(open_project(params, project))
    features.run_top(open_project(params, project))
    assert counter.builds == 0  # back and forth: both caches are hits


def test_top_layers_on_the_cut_cache_give_the_pooled_features(project):
    params = make_params(project, train_top={"cut_point": "block0"})
    pooled = table_of(features.run(open_project(params, project)))
    cut = table_of(features.run_top(open_project(params, project)))
    full = keras_models.build("tiny", layer="pooled", weights_dir=project / "cache" / "weights")
    top = train_top.build_top(full.model, "block0")
    assert "block0" not in [l.name for l in top.layers[1:]] and "normalize" not in [l.name for l in top.layers]
    np.testing.assert_allclose(np.asarray(top(cut.features)), pooled.features, rtol=1e-2, atol=1e-3)


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
                       train_top={"cut_point": "block14", "epochs_head": 1, "epochs": 3, "patience": 0,
                                  "learning_rate": 0.001, **top})


@pytest.mark.slow
def test_lite0_top_blocks_reproduce_the_pooled_features(lite_project):
    params = lite_params(lite_project)
    pooled = table_of(features.run(open_project(params, lite_project)))
    cut = table_of(features.run_top(open_project(params, lite_project)))
    full = keras_models.build("efficientnet_lite0", layer="pooled", weights_dir=lite_project / "cache" / "weights")
    top = train_top.build_top(full.model, "block14")
    from_cut = np.asarray(top(cut.features, training=False))
    assert np.abs(from_cut - pooled.features).max() < 0.02 * np.abs(pooled.features).max()  # float16 input


@pytest.mark.slow
def test_train_top_keeps_batchnorm_statistics_and_never_runs_the_frozen_layers(lite_project, monkeypatch):
    params = lite_params(lite_project)
    features.run_top(open_project(params, lite_project))  # the cut-point cache exists before training

    def no_backbone_runs(*args, **kwargs):
        raise AssertionError("train-top ran the frozen backbone over photos")

    monkeypatch.setattr(runtime, "featurise_files", no_backbone_runs)
    monkeypatch.setattr(runtime, "open_backbone", no_backbone_runs)
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
    real_fit = keras_fit.fit

    def fit_and_watch(model, *args, **kwargs):
        top = model.get_layer("top")
        for layer in top.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                before[layer.name] = [np.array(w) for w in layer.get_weights()]
        before["conv"] = np.array(top.get_layer("top_conv").kernel)
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(keras_fit, "fit", fit_and_watch)
    result = train_top.run(open_project(params, lite_project))
    top = result.classifier.classifier.model_.get_layer("top")
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
    chosen = make_params(lite_project, features={"backbone": "efficientnet_lite0", "batch_size": 16},
                         data={"train_fraction": 0.6, "val_fraction": 0.2, "test_fraction": 0.2},
                         train_top={"cut_point": "block14", "epochs_head": 1, "epochs": 3, "patience": 0,
                                    "learning_rate": 0.001}, train={"strategy": "top"})
    features.run(open_project(params, lite_project))
    train_head.run(open_project(params, lite_project))
    features.run_top(open_project(params, lite_project))
    result = train_top.run(open_project(params, lite_project))
    assert result.classifier.history["epochs_run"] == 4  # 1 + 3
    assert not train_top.run(open_project(params, lite_project)).trained_now
    assert evaluate.run(open_project(params, lite_project)).run["rung"] == "head"  # train.strategy: head decides, not what ran last
    metrics = evaluate.run(open_project(chosen, lite_project))
    assert metrics.run["rung"] == "top" and metrics.run["features"]["layer"] == "block14"
    table = compare.run(open_project(chosen, lite_project))
    lines = {line.split()[0]: line for line in table.splitlines()[1:-1]}
    assert "pooled" in lines["head"] and "block14" in lines["top*"]
    assert "not trained for these params ('make finetune')" in lines["finetune"]
    exported = export.run(open_project(chosen, lite_project))
    assert exported.parity["model.tflite"]["n_images"] == metrics.metrics["n_test"]


@pytest.mark.slow
def test_an_interrupted_train_top_continues_from_its_backup(lite_project, monkeypatch):
    params = lite_params(lite_project, epochs_head=2, epochs=4, seed=7)
    features.run_top(open_project(params, lite_project))
    real_fit = keras.Model.fit
    calls = []

    class StopInPhaseTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if len(calls) == 2 and epoch == 1:
                raise KeyboardInterrupt

    def interrupted(model, *args, callbacks=(), **kwargs):
        calls.append(1)
        return real_fit(model, *args, callbacks=[*callbacks, StopInPhaseTwo()], **kwargs)

    monkeypatch.setattr(keras.Model, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_top.run(open_project(params, lite_project))
    assert list((lite_project / "cache" / "train_top").glob("*.backup"))
    monkeypatch.setattr(keras.Model, "fit", real_fit)
    history = train_top.run(open_project(params, lite_project)).classifier.history
    assert len(history["phases"]["head"]) and len(history["phases"]["head"]["loss"]) == 2  # kept, not rerun
    assert len(history["phases"]["all"]["loss"]) == 2  # epochs 3 and 4 only: 1 and 2 came from the backup
    assert not list((lite_project / "cache" / "train_top").glob("*.backup"))


def test_wrong_cut_point_names_the_valid_ones(project):
    with pytest.raises(ValueError, match="^train_top.cut_point: tiny has no layer 'block99'; valid: block0, block1"):
        features.run_top(open_project(make_params(project, train_top={"cut_point": "block99"}), project))


def test_train_top_before_its_input_says_what_to_run(project):
    features.run(open_project(make_params(project), project))
    from pipeline.store.table import CacheError

    with pytest.raises(CacheError, match="no cached activations at train_top.cut_point 'block0'.*"
                                         "run 'make top-features' first"):
        train_top.run(open_project(make_params(project, train_top={"cut_point": "block0"}), project))


def test_hidden_units_in_the_softmax_head(project):
    params = make_params(project, train_head={"model": "softmax", "hidden_units": [8], "epochs": 5})
    features.run(open_project(params, project))
    head = train_head.run(open_project(params, project)).classifier
    assert [l.name for l in head.classifier.model_.layers if l.name.startswith("hidden")] == ["hidden_0"]
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
    import hashlib

    from pipeline import scan

    params = make_params(project)
    summary = advise.summarise(scan.scan(params.data, project))
    expected = {c: 0 for c in ("misty", "neither", "tigger")}
    for path in (project / "photos").rglob("*.png"):  # the hash split, computed here from the bytes
        position = int(hashlib.sha256(path.read_bytes()).hexdigest()[:16], 16) / 2.0**64
        expected[path.parent.name] += position < params.data.train_fraction
    assert summary.train_per_class == expected
    assert summary.median_short_side == 40
    assert "recommended rung: head" in advise.format_advice(advise.recommend(summary))


def test_finetune_two_phases_on_the_photos(project):
    base_params = make_params(project, finetune={"epochs_head": 2, "epochs_all": 0, "batch_size": 8})
    features.run(open_project(base_params, project))
    head_only = finetune.run(open_project(base_params, project))
    network = head_only.classifier.classifier.model_.get_layer("tiny_to_pooled")
    pretrained = keras_models.build("tiny", weights_dir=project / "cache" / "weights").model
    for a, b in zip(network.get_weights(), pretrained.get_weights()):
        np.testing.assert_array_equal(a, b)  # phase 1 alone leaves the backbone as pretrained
    assert {"augment_flip", "augment_zoom", "augment_brightness", "augment_contrast"} <= \
        {l.name for l in head_only.classifier.classifier.model_.layers}

    params = make_params(project, finetune={"epochs_head": 2, "epochs_all": 3, "batch_size": 8,
                                            "learning_rate_all": 0.01}, train={"strategy": "finetune"})
    result = finetune.run(open_project(params, project))
    assert set(result.classifier.history["phases"]) == {"head", "all"}
    changed = result.classifier.classifier.model_.get_layer("tiny_to_pooled").get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(changed, pretrained.get_weights()))
    assert not finetune.run(open_project(params, project)).trained_now  # a cache hit the second time

    run = evaluate.run(open_project(params, project))
    assert run.run["rung"] == "finetune" and run.metrics["n_test"] > 0
    # predict answers for each test photo what evaluate computed for it
    rows = [line.split(",") for line in (project / "reports" / "predictions.csv").read_text().splitlines()[1:]]
    got = predict.run(open_project(params, project), [project / "photos" / row[0] for row in rows])
    assert [g.labels[0] for g in got] == [row[2] for row in rows]
    assert [g.answer for g in got] == [row[5] for row in rows]  # and the same "unknown" decisions
    exported = export.run(open_project(params, project))
    assert all(v["max_abs_diff"] <= 1e-4 and v["score_max_abs_diff"] <= 1e-4 for v in exported.parity.values())


@pytest.mark.parametrize("strategy, rung", [("auto", "head"), ("top", "top")])
def test_make_train_trains_the_rung_the_strategy_chooses(tmp_path, strategy, rung):
    make_dataset(tmp_path / "photos", per_class=10)
    (tmp_path / "params.yaml").write_text(
        "data: {root: photos, train_fraction: 0.6, val_fraction: 0.2, test_fraction: 0.2}\n"
        f"features: {{backbone: tiny}}\ntrain: {{strategy: {strategy}}}\n"
        "train_top: {cut_point: block0, epochs: 2, epochs_head: 1}\n")
    out = cli(tmp_path, "train", "--with-upstream")
    assert out.returncode == 0, out.stderr[-2000:]
    trained = {name for name in ("train_head", "train_top", "finetune")
               if any((tmp_path / "cache" / name).glob("*/model.json"))}
    assert trained == {ladder.RUNGS[rung].section}


def test_params_alone_decide_what_is_evaluated(tmp_path):
    """evaluate, then train-top, then evaluate with the same params: the same model, the same metrics."""
    make_dataset(tmp_path / "photos", per_class=10)
    (tmp_path / "params.yaml").write_text(
        "data: {root: photos, train_fraction: 0.6, val_fraction: 0.2, test_fraction: 0.2}\n"
        "features: {backbone: tiny}\ntrain_top: {cut_point: block0, epochs: 2, epochs_head: 1}\n")
    first = cli(tmp_path, "evaluate", "--with-upstream")
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = (tmp_path / "reports" / "metrics.json").read_text()
    run = json.loads((tmp_path / "reports" / "run.json").read_text())
    top = cli(tmp_path, "train-top", "--with-upstream")
    assert top.returncode == 0, top.stderr[-2000:]
    again = cli(tmp_path, "evaluate", "--with-upstream")
    assert again.returncode == 0
    assert (tmp_path / "reports" / "metrics.json").read_text() == metrics
    assert json.loads((tmp_path / "reports" / "run.json").read_text())["model"]["key"] == run["model"]["key"]
    assert "evaluate: rung head (train-head), chosen by train.strategy: head" in again.stderr
    assert "a train-top model is trained for these params too; evaluate it with train.strategy: top" in again.stderr


@pytest.mark.parametrize("smallest, head", [(1, "ncm"), (10, "ncm"), (11, "logreg"), (299, "logreg"), (300, None)])
def test_advice_names_ncm_for_the_fewest_photos(smallest, head):
    advice = advise.recommend(advise.Summary({"tigger": smallest, "misty": smallest + 500}))
    assert advice.head == head
    assert ("train_head.model: ncm" in advise.format_advice(advice)) == (head == "ncm")
