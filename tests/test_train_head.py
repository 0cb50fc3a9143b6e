import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline import backbones, evaluate, feature_store, features, train_head
from pipeline.feature_store import CacheError

from conftest import CLASS_COLOURS, ROOT, make_dataset, make_image, make_params


@pytest.fixture
def featurised(project):
    features.run(make_params(project), project)
    return project


def run(project, **sections):
    return train_head.run(make_params(project, **sections), project)


def forbid_backbone(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("train_head built the backbone")
    monkeypatch.setattr(backbones, "build", refuse)


def test_without_features_it_says_what_to_run(project):
    with pytest.raises(CacheError, match=r"no cached features at .*; run 'make features' first"):
        run(project)


def test_cache_contract(featurised, monkeypatch, caplog):
    forbid_backbone(monkeypatch)
    caplog.set_level("INFO")
    first = run(featurised)
    assert first.trained and (first.path / "head.json").is_file() and (first.path / "history.json").is_file()
    second = run(featurised)
    assert not second.trained and second.path == first.path  # twice: a hit
    assert "train_head: cache hit" in caplog.text
    other_stage = run(featurised, evaluate={"top_k": 1}, features={"batch_size": 3})
    assert not other_stage.trained  # another stage's param: a hit
    caplog.clear()
    own = run(featurised, train_head={"C": 0.05})
    assert own.trained and own.path != first.path  # its own param: a miss, naming the change
    assert "train_head: recomputing (train_head.C: 1.0 -> 0.05)" in caplog.text
    monkeypatch.setattr(train_head, "VERSION", train_head.VERSION + 1)
    assert run(featurised).trained  # a VERSION bump: a miss


def test_new_features_content_retrains_the_head(featurised):
    first = run(featurised)
    (featurised / "photos" / "misty" / "misty_00.png").unlink()
    features.run(make_params(featurised), featurised)
    assert run(featurised).key != first.key


def test_logreg_train_head_never_imports_tensorflow(featurised):
    code = ("import sys; from pipeline import params, train_head; "
            "p = params.build({'features': {'backbone': 'tiny'}, 'data': {'root': 'photos', 'train_fraction': 0.6, "
            "'val_fraction': 0.2, 'test_fraction': 0.2}}, 'test'); "
            "train_head.run(p, '.'); print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=featurised, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_softmax_head_learns(featurised, monkeypatch):
    forbid_backbone(monkeypatch)
    result = run(featurised, train_head={"model": "softmax", "learning_rate": 0.05, "epochs": 30})
    history = json.loads((result.path / "history.json").read_text())
    assert history["train_accuracy"] >= 0.9 and history["val_accuracy"] >= 0.9
    loaded = train_head.load(result.path)
    table = feature_store.read_table(features.cache_file(make_params(featurised), featurised))
    np.testing.assert_allclose(loaded.predict_proba(table.features), result.head.predict_proba(table.features),
                               atol=1e-6)


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
    features.run(params, tmp_path)
    forbid_backbone(monkeypatch)
    result = train_head.run(params, tmp_path)
    history = result.head.history
    val_loss = history["epochs"]["val_loss"]
    assert history["epochs_run"] < 100
    best = int(np.argmin(val_loss))
    assert history["epochs_run"] == best + 1 + 3  # stopped `patience` epochs after the best epoch
    assert history["val_accuracy"] <= 0.5  # it restored the best weights, which are still bad on swapped val


def test_search_c_uses_only_the_train_split(featurised, monkeypatch):
    from sklearn import model_selection

    seen = []
    real_fit = model_selection.GridSearchCV.fit

    def fit(self, x, y, **kwargs):
        seen.append(len(y))
        return real_fit(self, x, y, **kwargs)

    monkeypatch.setattr(model_selection.GridSearchCV, "fit", fit)
    result = run(featurised, train_head={"search_C": True, "C_grid": [0.1, 1.0], "cv_folds": 3})
    n_train = json.loads((result.path / "head.json").read_text())["n_train"]
    assert seen == [n_train]
    assert result.head.history["chosen_C"] in (0.1, 1.0)


def test_missing_class_in_train_split(project):
    # With a tiny train fraction, some class ends up without training images.
    params = make_params(project, data={"train_fraction": 0.01, "val_fraction": 0.49, "test_fraction": 0.5})
    features.run(params, project)
    with pytest.raises(train_head.TrainingError, match="no images in the train split"):
        train_head.run(params, project)


def test_evaluate_writes_metrics_and_misclassified(featurised):
    params = make_params(featurised)
    result = evaluate.run(params, featurised)
    metrics = json.loads((featurised / "reports" / "metrics.json").read_text())
    for name in ("accuracy", "balanced_accuracy", "n_test", "classes", "per_class", "confusion_matrix"):
        assert name in metrics
    table = feature_store.read_table(features.cache_file(params, featurised))
    n_test = int((table.splits == "test").sum())
    assert metrics["n_test"] == n_test == sum(map(sum, metrics["confusion_matrix"]))
    assert metrics["classes"] == ["misty", "neither", "tigger"]
    assert metrics["accuracy"] >= 0.8  # colours are easy even for a random tiny network
    assert set(metrics["per_class"]["misty"]) == {"precision", "recall", "f1", "support"}
    lines = (featurised / "reports" / "misclassified.csv").read_text().splitlines()
    assert lines[0].startswith("path,true,predicted,p_predicted,p_true")
    wrong = n_test - round(metrics["accuracy"] * n_test)
    assert len(lines) - 1 == wrong
    assert "balanced accuracy" in result.table


def test_evaluate_retrains_the_head_when_its_params_changed(featurised, caplog):
    evaluate.run(make_params(featurised), featurised)
    caplog.set_level("INFO")
    evaluate.run(make_params(featurised, train_head={"C": 0.3}), featurised)
    assert "train_head: recomputing (train_head.C: 1.0 -> 0.3)" in caplog.text


def test_metrics_match_hand_computed_values():
    y = np.array(["a", "a", "b", "b", "b"])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    metrics = evaluate.compute_metrics(y, proba, ["a", "b"])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert metrics["confusion_matrix"] == [[1, 1], [1, 2]]
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(2 / 3)


def test_empty_test_split_is_an_error(project):
    params = make_params(project, data={"train_fraction": 0.8, "val_fraction": 0.2, "test_fraction": 0.0})
    features.run(params, project)
    with pytest.raises(evaluate.EvaluationError, match="test split is empty"):
        evaluate.run(params, project)
