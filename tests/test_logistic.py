"""The logreg head: scikit-learn's LogisticRegression, kept as arrays that answer alike without scikit-learn."""
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

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


def test_one_class_is_a_one_line_error():
    x, y = overlapping(2)
    with pytest.raises(HeadError, match="at least 2 classes"):
        LogRegHead(C=1.0).fit(x[y == 0], y[y == 0])


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("balanced", [True, False])
def test_the_head_is_scikit_learns_regression_kept_as_arrays(classes, balanced):
    x, y = overlapping(classes, seed=1)
    head = LogRegHead(C=0.05, class_weight="balanced" if balanced else "none").fit(x, y)
    scaler, reference = scikit_learn(x, y, 0.05, balanced)
    test_x, _ = overlapping(classes, seed=2)
    # the standardisation and the regression folded into one affine map answer as scikit-learn's pipeline
    np.testing.assert_allclose(head.predict_proba(test_x), reference.predict_proba(scaler.transform(test_x)),
                               atol=2e-3)
    np.testing.assert_allclose(softmax(head.decision_function(test_x)), head.predict_proba(test_x))


def test_the_class_weights_change_the_fit():
    """A check that can fail: balanced and unweighted differ on unequal classes, so the test above tells them apart."""
    x, y = overlapping(3)
    a = LogRegHead(C=0.1).fit(x, y)
    b = LogRegHead(C=0.1, class_weight="none").fit(x, y)
    assert np.abs(a.intercept_ - b.intercept_).max() > 0.05


def test_loading_a_fitted_head_and_answering_imports_no_scikit_learn(tmp_path):
    """predict, the app and export answer with numpy alone: the saved heads hold arrays, not estimators."""
    import joblib

    from pipeline.training.heads import KNNHead, NCMHead

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(0, 1, (120, 8)) + y[:, None]
    for i, head in enumerate((LogRegHead(), LogRegHead(C=0.1), NCMHead(), KNNHead())):
        head.fit(x[:90], y[:90], **({"X_val": x[90:], "y_val": y[90:]} if head.uses_val else {}))
        joblib.dump(head, tmp_path / f"head{i}.joblib")
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, joblib, numpy as np\n"
        "import pipeline.training.heads\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"for i in range(4): joblib.load({str(tmp_path)!r} + f'/head{{i}}.joblib').predict_proba(x)\n"
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
