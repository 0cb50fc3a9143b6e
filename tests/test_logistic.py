"""The logreg head's regression against scikit-learn's LogisticRegression: the same weights, the same answers."""
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.preprocessing import StandardScaler

from pipeline.training import logistic
from pipeline.training.classifiers import softmax
from pipeline.training.heads import HeadError, LogRegHead

from conftest import ROOT


def overlapping(classes: int, n_per_class=(80, 40, 25, 60), dim=40, seed=0, noise=1.5):
    """Classes that overlap (so C matters), of unequal sizes (so the class weights matter)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (classes, dim))
    y = np.concatenate([np.full(n_per_class[k % len(n_per_class)], k) for k in range(classes)])
    x = centres[y] + rng.normal(0, noise, (len(y), dim)) * rng.uniform(0.2, 3.0, dim)  # columns of unequal scale
    return x.astype(np.float32), y


def scikit_learn(x, y, C, balanced):
    scaler = StandardScaler().fit(x.astype(np.float64))
    model = LogisticRegression(C=C, class_weight="balanced" if balanced else None, max_iter=2000, tol=1e-8)
    return scaler, model.fit(scaler.transform(x.astype(np.float64)), y)


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("C", [0.003, 0.1, 10.0])
def test_the_weights_are_scikit_learns(classes, balanced, C):
    x, y = overlapping(classes)
    scaler, reference = scikit_learn(x, y, C, balanced)
    mean, scale = logistic.standardise(x)
    np.testing.assert_allclose(mean, scaler.mean_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(scale, scaler.scale_, rtol=1e-6)
    fitted = logistic.fit((x - mean) / scale, y, C, balanced=balanced, tol=1e-8)
    size = np.abs(reference.coef_).max()
    np.testing.assert_allclose(fitted.coef, reference.coef_, atol=2e-4 * size)
    np.testing.assert_allclose(fitted.intercept, reference.intercept_, atol=2e-4 * max(size, 1.0))
    np.testing.assert_allclose(softmax(logistic.logits(fitted, (x - mean) / scale)),
                               reference.predict_proba(scaler.transform(x)), atol=1e-4)


def test_the_class_weights_change_the_fit():
    """A check that can fail: balanced and unweighted differ on unequal classes, so the test above tells them apart."""
    x, y = overlapping(3)
    mean, scale = logistic.standardise(x)
    a = logistic.fit((x - mean) / scale, y, 0.1, balanced=True)
    b = logistic.fit((x - mean) / scale, y, 0.1, balanced=False)
    assert np.abs(a.intercept - b.intercept).max() > 0.05


def test_a_warm_start_reaches_the_same_weights_in_fewer_iterations():
    x, y = overlapping(4)
    mean, scale = logistic.standardise(x)
    xs = (x - mean) / scale
    near = logistic.fit(xs, y, 0.3, tol=1e-3)
    cold = logistic.fit(xs, y, 0.316, tol=1e-7)
    warm = logistic.fit(xs, y, 0.316, tol=1e-7, start=near)
    np.testing.assert_allclose(warm.coef, cold.coef, atol=1e-4 * np.abs(cold.coef).max())
    assert warm.n_iter < cold.n_iter


def test_the_path_scores_are_scikit_learns():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 300)
    y[:4] = np.arange(4)
    p = rng.dirichlet(np.ones(4), 300)
    predicted = np.where(rng.random(300) < 0.6, y, rng.integers(0, 4, 300))
    assert logistic.balanced_accuracy(y, predicted) == pytest.approx(balanced_accuracy_score(y, predicted))
    assert logistic.log_loss(y, p) == pytest.approx(sk_log_loss(y, p, labels=np.arange(4)))
    p[0, y[0]] = 0.0  # a zero probability: clipped as scikit-learn clips it, not infinite
    p[0] /= p[0].sum()
    assert logistic.log_loss(y, p) == pytest.approx(sk_log_loss(y, p, labels=np.arange(4)))


def test_one_class_is_a_one_line_error():
    x, y = overlapping(2)
    with pytest.raises(HeadError, match="at least 2 classes"):
        LogRegHead(C=1.0).fit(x[y == 0], y[y == 0])


def test_the_head_answers_as_scikit_learn_at_a_fixed_C():
    x, y = overlapping(4, seed=1)
    head = LogRegHead(C=0.05).fit(x, y)
    scaler, reference = scikit_learn(x, y, 0.05, True)
    test_x, _ = overlapping(4, seed=2)
    assert np.mean(head.predict(test_x) == reference.predict(scaler.transform(test_x))) >= 0.99
    np.testing.assert_allclose(head.predict_proba(test_x), reference.predict_proba(scaler.transform(test_x)),
                               atol=5e-3)


def test_fitting_and_loading_a_head_imports_no_scikit_learn(tmp_path):
    """What keeps a head rerun near a second: neither the fit (C auto on val, then the final fit), nor the
    saved head's loading, imports scikit-learn."""
    code = (
        "import sys, joblib, numpy as np\n"
        "from pipeline.training.heads import LogRegHead, NCMHead, KNNHead\n"
        "rng = np.random.default_rng(0); y = np.repeat(np.arange(3), 40); x = rng.normal(0, 1, (120, 8)) + y[:, None]\n"
        "for head in (LogRegHead(), LogRegHead(C=0.1), NCMHead(), KNNHead()):\n"
        "    head.fit(x[:90], y[:90], **({'X_val': x[90:], 'y_val': y[90:]} if isinstance(head, LogRegHead) else {}))\n"
        f"    joblib.dump(head, {str(tmp_path / 'head.joblib')!r})\n"
        f"    joblib.load({str(tmp_path / 'head.joblib')!r}).predict_proba(x)\n"
        "print('sklearn' in sys.modules, 'tensorflow' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_search_C_scores_are_scikit_learns_cross_validation():
    """train_head.search_C's fold scores against scikit-learn's own cross-validation of its own regression,
    on data where the Cs score differently."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline

    x, y = overlapping(3, seed=4, noise=5.0)
    grid = (0.001, 0.01, 0.1, 1.0)
    head = LogRegHead(search_C=True, C_grid=grid, cv_folds=3).fit(x, y)
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    expected = [float(np.mean(cross_val_score(
        make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000)), x, y,
        cv=folds, scoring="balanced_accuracy"))) for c in grid]
    assert max(expected) - min(expected) > 0.03  # the data tells the Cs apart
    got = head.history_["cv_balanced_accuracy"]
    # the folds' fits stop at tol 1e-4 from other starts (warm against cold): a photo on a class boundary may
    # fall either way, and one held-out photo of the smallest class is 0.014 here
    assert [got[repr(c)] for c in grid] == pytest.approx(expected, abs=0.02)
    assert got[repr(head.history_["chosen_C"])] == max(got.values())
