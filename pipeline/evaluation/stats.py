"""Statistics shared by the evaluation stages: Spearman rank correlation over many map pairs at
once and bootstrap confidence intervals.

Spearman's rho is the Pearson correlation of the ranks, ties given their average rank (the
definition ``scipy.stats.spearmanr`` uses); a map whose cells are all equal has no ranking, so
its correlation is undefined (NaN) and counted apart by the callers, never scored as 0.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties sharing their average rank (1-based)."""
    return rankdata(np.asarray(x, dtype=np.float64), method="average", axis=-1)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between ``a[i]`` and ``b[i]`` for every row (N x K each, or broadcastable);
    NaN where either row is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = np.broadcast_arrays(ra, rb)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(-1) / denominator
    return np.where(denominator > 0, rho, np.nan)


def has_ties(x: np.ndarray) -> np.ndarray:
    """Whether each row (last axis) holds at least one repeated value."""
    s = np.sort(np.asarray(x), axis=-1)
    return (np.diff(s, axis=-1) == 0).any(-1)


def is_constant(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return (x == x[..., :1]).all(-1)


def bootstrap_ci(values: np.ndarray, samples: int = 1000, confidence: float = 0.95,
                 seed: int = 0, statistic=np.mean) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (1-D, NaNs dropped):
    ``samples`` resamples with replacement from a generator seeded with ``seed``, so the same
    seed gives the same interval. (NaN, NaN) for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(v), size=(int(samples), len(v)))
    stats = statistic(v[draws], axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def summarise(values: np.ndarray, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """n, mean and bootstrap interval of the finite ``values`` (the rows of every table)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo, hi = bootstrap_ci(finite, samples, confidence, seed)
    return {"n": int(len(finite)), "mean": float(finite.mean()) if len(finite) else float("nan"),
            "ci_low": lo, "ci_high": hi}
