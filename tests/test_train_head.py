import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.backbones import keras_models
from pipeline.project import open_project
from pipeline.stages import evaluate, features, train_head
from pipeline.stages.contract import TrainingError
from pipeline.store import batches
from pipeline.store.table import CacheError

from conftest import CLASS_COLOURS, ROOT, cached_table, make_dataset, make_image, make_params


@pytest.fixture
def featurised(project):
    features.run(open_project(make_params(project), project))
    return project


def run(project, **sections):
    return train_head.run(open_project(make_params(project, **sections), project))


def forbid_backbone(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("train_head built the backbone")
    monkeypatch.setattr(keras_models, "build", refuse)


def test_without_features_it_says_what_to_run(project):
    with pytest.raises(CacheError, match=r"no cached features at .*; run 'make features' first"):
        run(project)


def test_cache_contract(featurised, monkeypatch, caplog):
    forbid_backbone(monkeypatch)
    caplog.set_level("INFO")
    first = run(featurised)
    assert first.trained_now and (first.folder / "model.json").is_file() and (first.folder / "history.json").is_file()
    second = run(featurised)
    assert not second.trained_now and second.folder == first.folder  # twice: a hit
    assert "train_head: cache hit" in caplog.text
    other_stage = run(featurised, evaluate={"top_k": 1}, features={"batch_size": 3}, train_top={"epochs": 2})
    assert not other_stage.trained_now  # another stage's param: a hit
    caplog.clear()
    own = run(featurised, train_head={"C": 0.05})
    assert own.trained_now and own.folder != first.folder  # its own param: a miss, naming the change
    assert "train_head: recomputing (train_head.C: auto -> 0.05)" in caplog.text
    import dataclasses

    bumped = dataclasses.replace(train_head.RUNG, version=train_head.VERSION + 1)
    assert bumped.train(open_project(make_params(featurised), featurised)).trained_now  # a VERSION bump: a miss


def test_new_features_content_retrains_the_head(featurised, caplog):
    first = run(featurised)
    (featurised / "photos" / "misty" / "misty_00.png").unlink()
    features.run(open_project(make_params(featurised), featurised))
    caplog.set_level("INFO")
    assert run(featurised).key != first.key
    assert "train_head: recomputing (inputs.pooled: " in caplog.text


def test_logreg_train_head_never_imports_tensorflow(featurised):
    code = ("import sys; from pipeline import params; from pipeline.project import open_project; "
            "from pipeline.stages import train_head; "
            "p = params.build({'features': {'backbone': 'tiny'}, 'data': {'root': 'photos', 'train_fraction': 0.6, "
            "'val_fraction': 0.2, 'test_fraction': 0.2}}, 'test'); "
            "train_head.run(open_project(p, '.')); print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=featurised, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_only_fitting_a_head_imports_scikit_learn(featurised):
    """About a second of every process: ``--help``, ``features`` (a cache hit here) and ``predict`` run without
    scikit-learn; ``train-head`` fits with scikit-learn's LogisticRegression, and the head it saves answers
    with numpy alone."""
    code = ("import runpy, sys\n"
            "sys.argv = ['pipeline', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('pipeline', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('SKLEARN', 'sklearn' in sys.modules)\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"]}
    (featurised / "params.yaml").write_text("features: {backbone: tiny}\n"
                                            "data: {root: photos, train_fraction: 0.6, val_fraction: 0.2, "
                                            "test_fraction: 0.2}\n")
    seen = {}
    photo = str(featurised / "photos" / "misty" / "misty_00.png")
    for command in (["--help"], ["features"], ["train-head"], ["predict", photo]):
        out = subprocess.run([sys.executable, "-c", code, *command], cwd=featurised, capture_output=True, text=True,
                             env=env)
        assert "SKLEARN" in out.stdout, out.stderr
        seen[command[0]] = out.stdout.strip().splitlines()[-1]
    assert seen == {"--help": "SKLEARN False", "features": "SKLEARN False", "train-head": "SKLEARN True",
                    "predict": "SKLEARN False"}


def test_softmax_head_learns_and_streams_the_cache(featurised, monkeypatch):
    forbid_backbone(monkeypatch)
    largest = []
    real_read = batches.FeatureReader.read

    def read(self, positions):
        largest.append(len(positions))
        return real_read(self, positions)

    monkeypatch.setattr(batches.FeatureReader, "read", read)
    result = run(featurised, train_head={"model": "softmax", "learning_rate": 0.05, "epochs": 30, "batch_size": 4})
    history = json.loads((result.folder / "history.json").read_text())
    assert history["val_accuracy"] >= 0.9 and history["epochs"]["accuracy"][-1] >= 0.9
    assert max(largest) <= 64  # batches of 4 in training, of 64 for the val accuracy; never the table
    loaded = train_head.RUNG.load(open_project(make_params(featurised, train_head={"model": "softmax", "learning_rate": 0.05,
                                                                      "epochs": 30, "batch_size": 4}), featurised))
    table = cached_table(make_params(featurised), featurised)
    np.testing.assert_allclose(loaded.classifier.predict_proba(table.features),
                               result.classifier.predict_proba(table.features), atol=1e-6)


def test_softmax_stops_early_on_the_validation_split(tmp_path, monkeypatch):
    # The val split has the colours of the two classes swapped: the better the head fits train,
    # the worse its val loss, so early stopping must end training after `patience` epochs.
    make_dataset(tmp_path / "photos" / "train", per_class=10, classes=("misty", "tigger"))
    for i in range(6):
        make_image(tmp_path / "photos" / "val" / "misty" / f"{i}.png", CLASS_COLOURS["tigger"], 50_000 + i)
        make_image(tmp_path / "photos" / "val" / "tigger" / f"{i}.png", CLASS_COLOURS["misty"], 60_000 + i)
        make_image(tmp_path / "photos" / "test" / "misty" / f"{i}.png", CLASS_COLOURS["misty"], 70_000 + i)
    params = make_params(tmp_path, train_head={"model": "softmax", "learning_rate": 0.05, "epochs": 100,
                                               "patience": 3})
    features.run(open_project(params, tmp_path))
    forbid_backbone(monkeypatch)
    history = train_head.run(open_project(params, tmp_path)).classifier.history
    val_loss = history["epochs"]["val_loss"]
    assert history["epochs_run"] < 100
    best = int(np.argmin(val_loss))
    assert history["epochs_run"] == best + 1 + 3  # stopped `patience` epochs after the best epoch
    assert history["val_accuracy"] <= 0.5  # it restored the best weights, which are still bad on swapped val


def test_search_c_uses_only_the_train_split_and_picks_the_best(featurised, monkeypatch):
    from pipeline.training.heads import LogRegHead

    seen = []
    real_fit = LogRegHead._regression

    def fit(self, C, tol, x, y, start=None):
        seen.append(len(y))
        return real_fit(self, C, tol, x, y, start)

    monkeypatch.setattr(LogRegHead, "_regression", fit)
    grid = [1e-4, 0.01, 1.0]
    result = run(featurised, train_head={"search_C": True, "C_grid": grid, "cv_folds": 3})
    # the folds of the search, the final fit on the whole train split, the calibration's out-of-fold refits
    # (val is small here): never a val or test photo
    n_train, searched = result.meta["n_train"], 3 * len(grid)
    assert all(n < n_train for n in seen[:searched]) and seen[searched] == n_train
    assert len(seen) > searched + 1 and all(n < n_train for n in seen[searched + 1:])
    # the same cross-validation with scikit-learn's own pipeline, computed independently: same scores
    from sklearn import model_selection
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    params = make_params(featurised)
    table = cached_table(params, featurised)
    x, y = table.features[table.splits == "train"], table.labels[table.splits == "train"]
    folds = model_selection.StratifiedKFold(3, shuffle=True, random_state=0)
    expected = [real_cross_val(make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced",
                                                                                  max_iter=2000)), x, y, folds)
                for c in grid]
    scores = result.classifier.history["cv_balanced_accuracy"]
    assert [scores[repr(c)] for c in grid] == pytest.approx(expected)
    assert scores[repr(result.classifier.history["chosen_C"])] == pytest.approx(max(expected))


def real_cross_val(model, x, y, folds) -> float:
    from sklearn.model_selection import cross_val_score

    return float(np.mean(cross_val_score(model, x, y, cv=folds, scoring="balanced_accuracy")))


def test_missing_class_in_train_split(project):
    # With a tiny train fraction, some class ends up without training images.
    params = make_params(project, data={"train_fraction": 0.01, "val_fraction": 0.49, "test_fraction": 0.5})
    features.run(open_project(params, project))
    with pytest.raises(TrainingError, match="no images in the train split"):
        train_head.run(open_project(params, project))


def test_evaluate_writes_numbers_only_metrics_and_the_run(featurised):
    params = make_params(featurised)
    train_head.run(open_project(params, featurised))
    result = evaluate.run(open_project(params, featurised))
    metrics = json.loads((featurised / "reports" / "metrics.json").read_text())

    def leaves(value):
        return [v for x in value.values() for v in leaves(x)] if isinstance(value, dict) else [value]

    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves(metrics))
    assert set(metrics) == {"accuracy", "balanced_accuracy", "macro_f1", "n_test", "per_class", "rejection", "calibration"}
    run_info = json.loads((featurised / "reports" / "run.json").read_text())
    assert run_info["rung"] == "head" and run_info["classes"] == ["misty", "neither", "tigger"]
    table = cached_table(params, featurised)
    n_test = int((table.splits == "test").sum())
    assert metrics["n_test"] == n_test == sum(map(sum, run_info["confusion_matrix"]))
    assert metrics["accuracy"] >= 0.8  # colours are easy even for a random tiny network
    lines = (featurised / "reports" / "misclassified.csv").read_text().splitlines()
    assert lines[0].startswith("path,true,predicted,p_predicted,p_true")
    assert len(lines) - 1 == n_test - round(metrics["accuracy"] * n_test)
    assert "balanced accuracy" in result.table


def test_evaluate_trains_nothing_and_says_what_to_run(featurised):
    with pytest.raises(CacheError, match=r"no train-head model for these params .*run 'make train-head' first"):
        evaluate.run(open_project(make_params(featurised, train_head={"C": 0.3}), featurised))


def test_metrics_match_hand_computed_values():
    y = np.array([0, 0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    metrics, confusion = evaluate.compute_metrics(y, proba, ["a", "b"])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert confusion == [[1, 1], [1, 2]]
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(2 / 3)


def test_empty_test_split_is_an_error(project):
    params = make_params(project, data={"train_fraction": 0.8, "val_fraction": 0.2, "test_fraction": 0.0})
    features.run(open_project(params, project))
    train_head.run(open_project(params, project))
    with pytest.raises(evaluate.EvaluationError, match="test split is empty"):
        evaluate.run(open_project(params, project))


def test_keras_probabilities_are_computed_in_calls_bounded_by_bytes(monkeypatch):
    """A spatial input (a cut-point cache) is never handed to the model whole: each call is sized so
    its activations stay near CALL_BYTES, and the slices come back in order."""
    from pipeline.training import classifiers

    calls = []

    import keras

    inputs = keras.Input((7, 7, 8))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="softmax")(pooled))
    classifier = classifiers.KerasClassifier(model, ["a", "b"], {})
    # every output of the embedder (up to the softmax) for a row: the input (7, 7, 8) and the pooled 8
    assert classifier.row_bytes == 4 * (7 * 7 * 8 + 8)
    monkeypatch.setattr(classifiers, "CALL_BYTES", 10 * classifier.row_bytes)  # room for 10 rows
    embedder = classifier.embedder

    def counted(x, training=False):
        calls.append(len(x))
        return embedder(x, training=training)

    classifier._embedder = counted
    x = np.random.default_rng(0).random((95, 7, 7, 8), dtype=np.float32)
    probabilities = classifier.predict_proba(x)
    assert calls == [10] * 9 + [5]
    np.testing.assert_allclose(probabilities, np.asarray(model(x)), rtol=1e-5, atol=1e-6)
