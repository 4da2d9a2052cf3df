"""The failure classifier of the failure-prediction study (Goyal et al. 2016, section 4.2): an
L2-regularised logistic regression, stratified k-fold cross-validation with out-of-fold scores,
and ROC-AUC with a bootstrap interval, in numpy/scipy only.

Logistic regression (labels y in {0, 1}, features standardised on the training fold):

    minimise  L(w, b) = sum_i [log(1 + exp(z_i)) - y_i z_i] + l2 / 2 * ||w||^2,   z_i = x_i . w + b

(the intercept b is not penalised), solved with L-BFGS on the exact gradient
dL/dw = X^T (sigmoid(z) - y) + l2 w, dL/db = sum_i (sigmoid(z_i) - y_i).

ROC-AUC is the Mann-Whitney statistic: the probability that a random positive scores above a
random negative, ties counting one half, computed from average ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import rankdata


@dataclass
class LogisticModel:
    """A fitted classifier: the training fold's standardisation and the weights on it."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    intercept: float

    def decision(self, features: np.ndarray) -> np.ndarray:
        return self.standardise(features) @ self.weights + self.intercept

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """P(y = 1 | x) for every row."""
        return expit(self.decision(features))

    def standardise(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) - self.mean) / self.scale


def logistic_objective(params: np.ndarray, x: np.ndarray, y: np.ndarray,
                       l2: float) -> tuple[float, np.ndarray]:
    """L(w, b) and its gradient (module docstring); ``params`` = (w..., b), ``x`` standardised."""
    w, b = params[:-1], params[-1]
    z = x @ w + b
    # log(1 + exp(z)) without overflow: logaddexp(0, z).
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w @ w)
    residual = expit(z) - y
    gradient = np.append(x.T @ residual + l2 * w, residual.sum())
    return loss, gradient


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1.0) -> LogisticModel:
    """Fit on ``features`` (N x D) and ``labels`` (N, 0/1). Standardisation uses these rows only
    (the training fold), so nothing of a held-out fold leaks into the fit; a feature that is
    constant here gets scale 1 (it is then 0 everywhere in this fold and its weight shrinks to 0)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be N x D with one label per row, got {x.shape} and {y.shape}")
    if l2 <= 0:
        # Without a penalty separable data has no finite optimum: the weights would run away.
        raise ValueError(f"failure_prediction.l2 must be > 0, got {l2}")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    xs = (x - mean) / scale
    result = minimize(logistic_objective, np.zeros(x.shape[1] + 1), args=(xs, y, float(l2)),
                      jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-10})
    return LogisticModel(mean=mean, scale=scale, weights=result.x[:-1], intercept=float(result.x[-1]))


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number (0..folds-1) of every row: each class is shuffled with a generator seeded by
    ``seed`` and dealt round-robin, so every fold holds each class in (almost) its overall ratio."""
    labels = np.asarray(labels)
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        rows = rows[rng.permutation(len(rows))]
        assignment[rows] = np.arange(len(rows)) % folds
    return assignment


def out_of_fold_scores(features: np.ndarray, labels: np.ndarray, folds: int, seed: int,
                       l2: float = 1.0) -> np.ndarray:
    """P(y = 1) of every row from the classifier fitted on the other folds."""
    fold_of = stratified_folds(labels, folds, seed)
    scores = np.empty(len(labels), dtype=np.float64)
    for k in range(folds):
        held_out = fold_of == k
        model = fit_logistic(features[~held_out], labels[~held_out], l2)
        scores[held_out] = model.predict_proba(features[held_out])
    return scores


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney U / (n1 n0) (module docstring); NaN without both classes."""
    return float(_auc_rows(np.asarray(labels)[None], np.asarray(scores, dtype=np.float64)[None])[0])


def _auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of every row of ``labels`` / ``scores`` (R x N each)."""
    positive = labels.astype(bool)
    n1 = positive.sum(1)
    n0 = positive.shape[1] - n1
    ranks = rankdata(scores, method="average", axis=1)
    u = (ranks * positive).sum(1) - n1 * (n1 + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


def roc_auc_ci(labels: np.ndarray, scores: np.ndarray, samples: int = 1000, confidence: float = 0.95,
               seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling questions (label and score together);
    a resample that happens to hold one class only has no AUC and is dropped."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if len(labels) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(int(samples), len(labels)))
    aucs = _auc_rows(labels[draws], scores[draws])
    aucs = aucs[np.isfinite(aucs)]
    if len(aucs) < 2:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(aucs, [alpha, 1 - alpha])
    return float(lo), float(hi)


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean of the recall of each class (0.5 for a constant prediction)."""
    labels = np.asarray(labels).astype(bool)
    predictions = np.asarray(predictions).astype(bool)
    recalls = [np.mean(predictions[labels == c] == c) for c in (True, False) if (labels == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")
