"""The logreg head's regression: scikit-learn's ``LogisticRegression(solver="lbfgs")``, without importing it.

It minimises the same objective with the same optimiser and stopping rule as scikit-learn 1.9:

    (1 / sum w) sum_i w_i loss_i  +  |W|^2 / (2 C sum w)     (intercepts not penalised)

``loss_i`` the cross-entropy of the softmax of ``x_i W^T + b`` (two classes: one row, the logistic loss),
``w_i`` the class weights (``balanced``: n / (K n_k), else 1), minimised by SciPy's L-BFGS-B with
``gtol = tol``, ``ftol = 64 eps`` and ``maxls = 50``. Why not scikit-learn's own: importing it takes about
1 s (it imports ``scipy.stats`` and pandas), most of what a head rerun costs; this needs ``scipy.optimize``,
which the temperature fit imports anyway. tests/test_logistic.py holds the weights to scikit-learn's.

BLAS runs on one thread during the fit: NumPy and SciPy each bring an OpenBLAS whose idle threads spin,
and on two cores the two fight; one thread is 4x faster here at 700 photos and 1.7x at 10,000.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOL = 1e-4  # scikit-learn's default


@dataclass(frozen=True)
class Fitted:
    coef: np.ndarray  # (K, D), or (1, D) for two classes (the second class's logit minus the first's)
    intercept: np.ndarray  # (K,) or (1,)
    n_iter: int


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The column means and standard deviations of ``x`` (float64; a constant column's scale is 1)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    return mean, scale


def sample_weights(y: np.ndarray, balanced: bool) -> np.ndarray:
    """Each row's weight: ``balanced``, n / (K n_k) over the K classes present; else 1."""
    if not balanced:
        return np.ones(len(y))
    counts = np.bincount(y)
    present = np.count_nonzero(counts)
    return (len(y) / (present * counts.astype(np.float64)))[y]


def fit(x: np.ndarray, y: np.ndarray, C: float, balanced: bool = True, tol: float = TOL, max_iter: int = 2000,
        start: Fitted | None = None) -> Fitted:
    """Fit on standardised rows ``x`` (N, D) and class numbers ``y`` 0..K-1; ``start``: a previous fit's weights
    (a warm start, as scikit-learn's ``warm_start``)."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, np.float64)
    n, d = x.shape
    n_classes = int(y.max()) + 1
    if np.count_nonzero(np.bincount(y)) < 2:
        raise ValueError("logistic regression needs photos of at least 2 classes")
    weights = sample_weights(y, balanced)
    l2 = 1.0 / (C * weights.sum())
    weights = weights / weights.sum()  # the loss's 1 / sum w
    binary = n_classes == 2
    rows = 1 if binary else n_classes
    target = (y == 1).astype(np.float64) if binary else np.eye(n_classes)[y]

    def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta.reshape(rows, d + 1)
        z = x @ w[:, :d].T + w[:, d]
        if binary:
            z = z[:, 0]
            pointwise = np.logaddexp(0.0, z) - target * z
            residual = (0.5 * (1.0 + np.tanh(0.5 * z)) - target)[:, None]  # the sigmoid, without overflow
        else:
            top = z.max(axis=1, keepdims=True)
            e = np.exp(z - top)
            total = e.sum(axis=1, keepdims=True)
            pointwise = top[:, 0] + np.log(total[:, 0]) - z[np.arange(n), y]
            residual = e / total - target
        residual *= weights[:, None]
        value = float(weights @ pointwise) + 0.5 * l2 * float(np.sum(w[:, :d] ** 2))
        gradient = np.empty_like(w)
        gradient[:, :d] = residual.T @ x + l2 * w[:, :d]
        gradient[:, d] = residual.sum(axis=0)
        return value, gradient.ravel()

    theta = np.zeros(rows * (d + 1)) if start is None else np.hstack([start.coef, start.intercept[:, None]]).ravel()
    with threadpool_limits(1, user_api="blas"):
        result = minimize(loss_and_gradient, theta, method="L-BFGS-B", jac=True,
                          options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    w = result.x.reshape(rows, d + 1)
    return Fitted(coef=w[:, :d].copy(), intercept=w[:, d].copy(), n_iter=int(result.nit))


def logits(fitted: Fitted, x: np.ndarray) -> np.ndarray:
    """(N, K) logits of standardised rows; two classes: [0, z] (the same softmax as scikit-learn's)."""
    z = np.asarray(x, np.float64) @ fitted.coef.T + fitted.intercept
    return np.hstack([np.zeros_like(z), z]) if fitted.coef.shape[0] == 1 else z


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """The mean over the classes present in ``y`` of the share of their photos predicted right."""
    classes = np.unique(y)
    return float(np.mean([np.mean(predicted[y == k] == k) for k in classes]))


def log_loss(y: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log probability of the true class (clipped at the float's eps, as scikit-learn does)."""
    eps = np.finfo(probabilities.dtype).eps
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y)), y], eps, 1.0))))
