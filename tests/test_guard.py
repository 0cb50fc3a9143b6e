"""The heads' estimator contract, calibration and "none of these": unit level and through the stages."""
import json

import numpy as np
import pytest
from sklearn.base import clone

from pipeline.params import ParamsError
from pipeline.project import open_project
from pipeline.stages import evaluate, features, train_head
from pipeline.stages.contract import TrainingError
from pipeline.training import guard as guard_mod
from pipeline.training.classifiers import HeadClassifier
from pipeline.training.heads import HEADS, KNNHead, NCMHead
from pipeline.use import export, predict
from pipeline.vectors import unit_rows as normalise

from conftest import CLASS_COLOURS, make_dataset, make_image, make_params


def blobs(n_per_class=60, classes=3, dim=16, spread=1.0, seed=0, centres_seed=0):
    """Gaussian classes around random centres (the same classes for one ``centres_seed``), photos drawn
    with ``seed``: (X (N, dim) float32, y (N,))."""
    centres = np.random.default_rng(centres_seed).normal(0, 3, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return (centres[y] + np.random.default_rng(seed).normal(0, spread, (len(y), dim))).astype(np.float32), y


@pytest.mark.parametrize("name", [n for n in HEADS if n != "softmax"])
def test_every_head_follows_the_estimator_contract(name):
    X, y = blobs()
    head = HEADS[name]()
    assert head.fit(X, y) is head
    params = head.get_params()
    assert clone(head).get_params() == params  # __init__ only stores what get_params reports
    logits = head.decision_function(X)
    assert logits.shape == (len(X), 3)
    np.testing.assert_allclose(head.predict_proba(X).sum(axis=1), 1.0)
    assert np.mean(head.predict(X) == y) > 0.9


@pytest.mark.parametrize("name", [n for n in HEADS if n != "softmax"])
def test_every_head_exports_the_same_logits(name):
    import keras

    X, y = blobs(seed=1)
    head = HEADS[name]().fit(X, y)
    model = HeadClassifier(head, ["a", "b", "c"], {}).as_keras((16,))
    embedding, logits = model(X)
    np.testing.assert_allclose(np.asarray(logits), head.decision_function(X), rtol=1e-4, atol=1e-4)
    assert isinstance(model, keras.Model)


def test_ncm_is_simpleshot_nearest_centroid():
    X, y = blobs(spread=3.0, seed=2)
    head = NCMHead().fit(X, y)
    # independently: centre on the train mean, L2-normalise, Euclidean distance to each class's mean
    unit = X - X.mean(axis=0)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    centroids = np.stack([unit[y == k].mean(axis=0) for k in range(3)])
    expected = np.argmin(((unit[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(head.predict(X), expected)
    assert (expected != y).any()  # a spread that makes mistakes: the comparison means something


def test_knn_votes_like_scikit_learns_neighbours():
    from sklearn.neighbors import KNeighborsClassifier

    X, y = blobs(spread=3.0, seed=3)
    test, _ = blobs(n_per_class=20, spread=3.0, seed=4)
    head = KNNHead(k=5).fit(X, y)
    centred = X - X.mean(axis=0)
    # scikit-learn's neighbours, each voting with its cosine similarity (1 - its cosine distance)
    reference = KNeighborsClassifier(5, metric="cosine", weights=lambda d: 1 - d).fit(centred, y)
    distances, neighbours = reference.kneighbors(test - X.mean(axis=0))
    votes = np.zeros((len(test), 3))
    for row, (d, n) in enumerate(zip(distances, neighbours)):
        np.add.at(votes[row], y[n], np.maximum(1 - d, 0))
    np.testing.assert_allclose(np.exp(head.decision_function(test)) * (5 + 1.5) - 0.5, votes, atol=1e-5)
    assert np.mean(head.predict(test) == reference.predict(test - X.mean(axis=0))) > 0.97
    assert KNNHead(k=50).fit(X[:40], np.r_[np.zeros(30, int), np.ones(10, int)]).k_ == 10  # at most the smallest class


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 4, (20_000, 4))
    probabilities = guard_mod.softmax(logits / 2.5)
    labels = np.array([rng.choice(4, p=p) for p in probabilities])
    assert guard_mod.fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


class OverConfident(HeadClassifier):
    """A head whose logits are three times what they should be: probabilities near 0 and 1 far too often."""

    def logits_of_embedding(self, embedding):
        return 3.0 * super().logits_of_embedding(embedding)

    def logits(self, x):
        return self.logits_of_embedding(self.embed(x))


def test_calibrated_confidence_of_0_8_is_right_about_80_percent_of_the_time():
    """An over-confident head on overlapping classes, calibrated on 3,000 val photos, then 30,000 test
    photos: those answered with a confidence near 0.8 are right about 80% of the time, and the ECE falls."""
    X, y = blobs(n_per_class=500, classes=3, dim=32, spread=8.0, seed=6)
    val_x, val_y = blobs(n_per_class=1000, classes=3, dim=32, spread=8.0, seed=7)
    test_x, test_y = blobs(n_per_class=10_000, classes=3, dim=32, spread=8.0, seed=8)
    head = HEADS["logreg"]().fit(X, y)
    classifier = OverConfident(head, ["a", "b", "c"], {})
    reject = make_params(__import__("pathlib").Path(".")).reject
    guard = guard_mod.fit_guard(classifier, X, y, val_x, val_y, reject)
    assert guard.calibrated_on == "val" and guard.temperature > 1.5  # it was over-confident
    logits = classifier.logits(test_x)
    before, after = guard_mod.softmax(logits), guard_mod.softmax(logits / guard.temperature)
    confidence, correct = after.max(axis=1), after.argmax(axis=1) == test_y
    near = (confidence > 0.75) & (confidence < 0.85)
    assert near.sum() > 1000
    assert correct[near].mean() == pytest.approx(0.8, abs=0.03)
    assert guard_mod.expected_calibration_error(after, test_y)["ece"] < \
        0.5 * guard_mod.expected_calibration_error(before, test_y)["ece"]


def test_the_threshold_keeps_the_asked_share_of_val_photos():
    X, y = blobs(n_per_class=100, seed=7)
    val_x, val_y = blobs(n_per_class=40, seed=8)
    classifier = HeadClassifier(HEADS["logreg"]().fit(X, y), ["a", "b", "c"], {})
    for keep in (0.5, 0.9, 0.95):
        reject = make_params(__import__("pathlib").Path("."), reject={"keep": keep}).reject
        guard = guard_mod.fit_guard(classifier, X, y, val_x, val_y, reject)
        kept = guard.accepted(guard.scores(classifier.embed(val_x), classifier.logits(val_x))).mean()
        assert kept == pytest.approx(keep, abs=1 / len(val_y) + 1e-9)


def test_knn_score_separates_far_photos_and_a_small_bank_is_k_means_centres():
    X, y = blobs(n_per_class=200, seed=9)
    val_x, val_y = blobs(n_per_class=40, seed=10)
    far, _ = blobs(n_per_class=34, seed=42, centres_seed=42)  # three other classes: directions no train photo has
    classifier = HeadClassifier(HEADS["logreg"]().fit(X, y), ["a", "b", "c"], {})
    for bank_size, kind in ((10_000, "photos"), (60, "k-means centres")):
        reject = make_params(__import__("pathlib").Path("."), reject={"bank_size": bank_size}).reject
        guard = guard_mod.fit_guard(classifier, X, y, val_x, val_y, reject)
        assert guard.bank_kind == kind and guard.bank_rows <= bank_size
        known = guard.scores(classifier.embed(val_x), classifier.logits(val_x))
        unknown = guard.scores(classifier.embed(far), classifier.logits(far))
        assert guard_mod.auroc(known, unknown) > 0.95


def test_leave_one_out_scores_exclude_the_photo_itself():
    X, y = blobs(n_per_class=30, seed=12)
    classifier = HeadClassifier(HEADS["logreg"]().fit(X, y), ["a", "b", "c"], {})
    reject = make_params(__import__("pathlib").Path("."), reject={"k": 1}).reject
    guard = guard_mod.fit_guard(classifier, X, y, X[:0], y[:0], reject)  # no val: leave-one-out
    assert guard.threshold_from == "leave-one-out"
    own = guard.scores(X, None)  # with themselves in the bank: each photo's nearest is itself
    assert np.allclose(own, 0, atol=1e-5)
    loo = guard.scores(X, None, exclude_self=True)
    unit = normalise(X)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    np.testing.assert_allclose(loo, 1 - similarity.max(axis=1), atol=1e-5)


# ---- through the stages --------------------------------------------------------------------------------

def odd_photos(folder, n=6):
    """Photos unlike every class: stripes of saturated colours no class has."""
    rng = np.random.default_rng(99)
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        stripes = np.zeros((40, 48, 3), np.uint8)
        stripes[:, ::4] = (255, 255, 0)
        stripes[:, 1::4] = (255, 0, 255)
        stripes = np.clip(stripes + rng.normal(0, 10, stripes.shape), 0, 255).astype(np.uint8)
        Image.fromarray(stripes).save(folder / f"odd_{i}.png")
    return folder


@pytest.fixture
def larger_project(tmp_path):
    make_dataset(tmp_path / "photos", per_class=50)  # 150 photos: enough val photos (>= 20) to set the threshold
    return tmp_path


@pytest.mark.parametrize("model", ["logreg", "ncm", "knn"])
def test_predict_answers_unknown_for_photos_unlike_the_training_photos(larger_project, model):
    params = make_params(larger_project, train_head={"model": model})
    features.run(open_project(params, larger_project))
    trained = train_head.run(open_project(params, larger_project))
    # every val photo is right here: the threshold is val's, and no temperature is claimed
    assert trained.guard.threshold_from == "val" and trained.guard.calibrated_on == "none (every val photo right)"
    results = predict.run(open_project(params, larger_project), [odd_photos(larger_project / "odd")])
    assert [r.answer for r in results] == ["unknown"] * 6
    assert all(r.score > r.threshold for r in results)
    known = [make_image(larger_project / "new" / f"{name}.png", colour, 77_000 + i)
             for i, (name, colour) in enumerate(CLASS_COLOURS.items())]
    answers = {r.path.split("/")[-1]: r.answer for r in predict.run(open_project(params, larger_project), known)}
    assert answers == {"misty.png": "misty", "tigger.png": "tigger", "neither.png": "neither"}
    table = predict.format_predictions(results, "table")
    assert "unknown (score" in table and "closest:" in table
    parsed = json.loads(predict.format_predictions(results, "json"))
    assert parsed[0]["answer"] == "unknown" and parsed[0]["accepted"] is False
    assert parsed[0]["threshold"] == pytest.approx(trained.guard.threshold, abs=1e-6)


def test_evaluate_reports_rejection_and_calibration(larger_project):
    params = make_params(larger_project)
    features.run(open_project(params, larger_project))
    train_head.run(open_project(params, larger_project))
    result = evaluate.run(open_project(params, larger_project))
    r, c = result.metrics["rejection"], result.metrics["calibration"]
    assert 0 <= r["rejected_share"] <= 0.5 and r["keep"] == 0.95
    assert set(c) == {"temperature", "ece_before", "ece_after", "brier_before", "brier_after"}
    assert result.metrics["accuracy"] == pytest.approx(json.loads(
        (larger_project / "reports" / "metrics.json").read_text())["accuracy"])
    page = (larger_project / "reports" / "index.html").read_text()
    assert "reliability diagram" in page and 'data-metric="rejected_share"' in page
    rejected = round(r["rejected_share"] * result.metrics["n_test"])
    assert rejected > 0  # the threshold keeps 95% of val: a few test photos fall beyond it here
    assert page.count('would answer "unknown"') == 1 and page.count("score ") >= rejected
    assert "calibration: none (the held-out photos all answered right)" in result.table


def test_changing_reject_keep_refits_only_the_guard(larger_project, caplog):
    params = make_params(larger_project)
    features.run(open_project(params, larger_project))
    first = train_head.run(open_project(params, larger_project))
    caplog.clear()
    with caplog.at_level("INFO"):
        second = train_head.run(open_project(make_params(larger_project, reject={"keep": 0.8}), larger_project))
    assert second.folder == first.folder and not second.trained_now
    assert "cache hit" in caplog.text and "recomputing" not in caplog.text
    assert second.guard.threshold < first.guard.threshold


def test_with_a_tiny_val_split_calibration_is_out_of_fold_and_said(tmp_path, caplog):
    project = overlapping_project(tmp_path, per_class=24)  # about 7 val photos in all; classes that overlap
    params = make_params(project)
    features.run(open_project(params, project))
    with caplog.at_level("INFO"):
        trained = train_head.run(open_project(params, project))
    # the knn score's threshold: each train photo's distance to the others (its own bank row left out)
    assert trained.guard.calibrated_on == "out-of-fold" and trained.guard.threshold_from == "leave-one-out"
    assert "fewer than 20" in caplog.text and "out-of-fold" in caplog.text


@pytest.mark.parametrize("score", ["energy", "msp"])
def test_with_a_tiny_val_split_a_logit_score_is_thresholded_on_out_of_fold_logits(project, score, monkeypatch):
    """Not on the train photos' own logits, which the head fitted: their scores are too confident."""
    from pipeline.stages import contract

    seen = {}
    real = contract.fit_guard

    def recording(classifier, train_x, train_y, val_x, val_y, reject, oof_logits=None, say=None):
        def oof():
            seen["logits"], seen["labels"] = oof_logits()
            return seen["logits"], seen["labels"]

        return real(classifier, train_x, train_y, val_x, val_y, reject, oof, say)

    monkeypatch.setattr(contract, "fit_guard", recording)
    params = make_params(project, reject={"score": score})
    features.run(open_project(params, project))
    trained = train_head.run(open_project(params, project))
    assert trained.guard.threshold_from == "out-of-fold"
    expected = np.quantile(trained.guard.scores(np.zeros((len(seen["labels"]), 0)), seen["logits"]), trained.guard.keep)
    assert trained.guard.threshold == pytest.approx(float(expected))


@pytest.mark.parametrize("keep", [0, -0.1, 1.5])
def test_reject_keep_outside_0_1_is_a_one_line_error(tmp_path, keep):
    with pytest.raises(ParamsError, match=r"reject\.keep"):
        make_params(tmp_path, reject={"keep": keep})


@pytest.mark.parametrize("folder, label, key", [("unknown", "unknown", "reserved"),
                                                ("unknown", "none of these", "reserved"),
                                                ("other", "other", "reject.label")])
def test_a_class_named_like_the_rejection_answer_is_refused(tmp_path, folder, label, key):
    make_dataset(tmp_path / "photos", per_class=6)
    for i in range(6):
        make_image(tmp_path / "photos" / folder / f"{i}.png", (128, 128, 128), 500 + i)
    params = make_params(tmp_path, reject={"label": label})
    with pytest.raises(TrainingError, match=key) as error:
        features.run(open_project(params, tmp_path))
    assert f"named {folder!r}" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "cache" / "features").exists() or not any((tmp_path / "cache" / "features").glob("*.h5"))


@pytest.mark.parametrize("model", ["ncm", "knn"])
def test_heads_without_training_export_with_parity(larger_project, model):
    params = make_params(larger_project, train_head={"model": model})
    features.run(open_project(params, larger_project))
    train_head.run(open_project(params, larger_project))
    result = export.run(open_project(params, larger_project))
    for name in ("model.keras", "saved_model", "model.tflite"):
        assert result.parity[name]["max_abs_diff"] <= 1e-4 and result.parity[name]["score_max_abs_diff"] <= 1e-4
    meta = json.loads((result.folder / "model.json").read_text())
    assert meta["rejection"]["label"] == "unknown" and "score > threshold" in meta["rejection"]["rule"]


def test_predict_and_evaluate_give_the_calibrated_probabilities(tmp_path):
    larger_project = overlapping_project(tmp_path)  # classes that overlap: a temperature is fitted
    params = make_params(larger_project)
    features.run(open_project(params, larger_project))
    trained = train_head.run(open_project(params, larger_project))
    temperature = trained.guard.temperature
    assert abs(temperature - 1) > 0.05  # calibration changes these numbers: the comparison means something
    inputs = trained.inputs
    rows = inputs.rows("test")
    x = inputs.read(rows.positions)
    expected = guard_mod.softmax(trained.classifier.classifier.logits(x) / temperature)
    paths = inputs.paths(rows.positions)
    got = predict.run(open_project(params, larger_project), [larger_project / "photos" / p for p in paths], top_k=3)
    for row, prediction in zip(expected, got):
        by_label = dict(zip(prediction.labels, prediction.probabilities))
        assert [by_label[c] for c in trained.classes] == pytest.approx(row.tolist(), abs=1e-6)
    result = evaluate.run(open_project(params, larger_project))
    before = guard_mod.expected_calibration_error(guard_mod.softmax(trained.classifier.classifier.logits(x)),
                                                  rows.labels)["ece"]
    assert result.metrics["calibration"]["ece_before"] == pytest.approx(before)
    assert result.metrics["calibration"]["ece_after"] == pytest.approx(
        guard_mod.expected_calibration_error(expected, rows.labels)["ece"])


def test_c_auto_is_the_best_c_on_val_and_cv_when_val_is_small():
    """C auto picks the C of C_grid with the best val balanced accuracy (ties: lower log loss), computed
    here with a fresh fit per C; with too few val photos, by k-fold CV on train (recorded as such)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, log_loss
    from sklearn.preprocessing import StandardScaler

    X, y = blobs(n_per_class=40, dim=16, spread=5.0, seed=20)
    val_x, val_y = blobs(n_per_class=30, dim=16, spread=5.0, seed=21)
    grid = (0.001, 0.01, 0.1, 1.0, 10.0)
    head = HEADS["logreg"](C="auto", C_grid=grid).fit(X, y, X_val=val_x, y_val=val_y)
    scaler = StandardScaler().fit(X)
    scores = []
    for c in grid:
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(scaler.transform(X), y)
        p = model.predict_proba(scaler.transform(val_x))
        scores.append((round(balanced_accuracy_score(val_y, p.argmax(axis=1)), 6), -log_loss(val_y, p)))
    assert head.history_["chosen_C"] == grid[max(range(len(grid)), key=lambda i: scores[i])]
    assert head.history_["chosen_C_by"] == "on 90 val photos"
    assert len({round(s[0], 3) for s in scores}) > 1  # the grid's Cs score differently: the choice means something
    small = HEADS["logreg"](C="auto", C_grid=grid).fit(X, y, X_val=val_x[:10], y_val=val_y[:10])
    assert small.history_["chosen_C_by"].startswith("by 5-fold CV on train")


def overlapping_project(folder, per_class=60):
    """Two classes of nearly the same colour under heavy noise: the tiny backbone's features overlap, the
    head is wrong on a good share of photos, and the best temperature differs from split to split."""
    rng = np.random.default_rng(60)
    for c, (name, grey) in enumerate({"misty": 118, "tigger": 126}.items()):
        for i in range(per_class):  # each photo's own brightness, drawn around its class's
            colour = tuple(int(v) for v in np.clip(grey + rng.normal(0, 8) + rng.normal(0, 3, 3), 0, 255))
            make_image(folder / "photos" / name / f"{name}_{i:02d}.png", colour, 60_000 + 1000 * c + i)
    return folder


def _split_temperature(trained, split):
    answers = evaluate.answer_split(trained.classifier, trained.inputs, split)
    return guard_mod.fit_temperature(np.log(np.maximum(answers["uncalibrated"], 1e-300)), answers["labels"])


def test_the_temperature_is_fitted_on_val_alone(tmp_path):
    """On classes that overlap, the temperature is the one that fits val, not test's or train's (a leak of
    the test split into calibration would change it), and the demo-like 'calibrated' line is not an artefact."""
    overlapping_project(tmp_path)
    params = make_params(tmp_path)
    features.run(open_project(params, tmp_path))
    trained = train_head.run(open_project(params, tmp_path))
    with trained:
        assert trained.guard.calibrated_on == "val"
        val = evaluate.answer_split(trained.classifier, trained.inputs, "val")
        accuracy = np.mean(val["probabilities"].argmax(1) == val["labels"])
        assert 0.55 < accuracy < 0.97  # overlapping: calibration means something here
        on_val, on_test, on_train = (_split_temperature(trained, s) for s in ("val", "test", "train"))
        assert trained.guard.temperature == pytest.approx(on_val, rel=1e-3)
        assert abs(on_test - on_val) > 0.05 * on_val and abs(on_train - on_val) > 0.05 * on_val  # a leak would show


def test_on_separable_val_photos_no_temperature_is_claimed(larger_project, caplog):
    """The suite's well-separated photos: every val photo right, the log loss flat near 0 for any small T, so
    no temperature can be fitted from them. The tool keeps T = 1 and says why, instead of an artefact."""
    params = make_params(larger_project)
    features.run(open_project(params, larger_project))
    with caplog.at_level("INFO"):
        trained = train_head.run(open_project(params, larger_project))
    assert trained.guard.temperature == 1.0 and trained.guard.calibrated_on.startswith("none")
    assert "no temperature" in caplog.text and "every val photo" in caplog.text
    metrics = evaluate.run(open_project(params, larger_project)).metrics
    assert metrics["calibration"]["temperature"] == 1.0


def test_reject_k_is_the_neighbour_whose_similarity_makes_the_score(larger_project):
    """The kNN score is 1 - the cosine similarity of the k-th nearest row of the guard's bank: k = 1 and
    k = 10 give different scores, each the one computed here from the bank and the photos' embeddings."""
    photos = [odd_photos(larger_project / "odd", n=4),
              *(make_image(larger_project / "new" / f"{n}.png", c, 78_000 + i)
                for i, (n, c) in enumerate(CLASS_COLOURS.items()))]
    scores = {}
    for k in (1, 10):
        project = open_project(make_params(larger_project, reject={"k": k, "score": "knn"}), larger_project)
        features.run(project)
        with train_head.run(project) as trained:
            results = predict.answer_files(project, trained, photos, keep_rows=True)
            embedding = trained.classifier.classifier.embed(np.stack([r.row for r in results]))
            similarity = normalise(embedding) @ normalise(trained.guard.arrays["bank"]).T
        scores[k] = np.array([r.score for r in results])
        np.testing.assert_allclose(scores[k], 1 - np.sort(similarity, axis=1)[:, -k], atol=1e-5)
    assert len(scores[1]) == 7 and np.all(scores[10] > scores[1] + 1e-6)  # the 10th nearest is farther
