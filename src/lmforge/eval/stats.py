"""Confidence intervals for what evaluation reports: Wilson's for a proportion, the bootstrap for any statistic
of per-item values (and for the difference of two models on the same items)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(correct: int, n: int) -> dict[str, Any]:
    """A proportion with its 95% Wilson score interval: {"accuracy", "correct", "n", "ci95": [low, high]}.

    Wilson's interval stays inside [0, 1] and is not degenerate at 0 or n correct, unlike the normal one."""
    if n == 0:
        return {"accuracy": math.nan, "correct": 0, "n": 0, "ci95": [math.nan, math.nan]}
    p, z2 = correct / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At 0 or n correct the bound is exactly 0 or 1 (the formula leaves rounding dust there).
    low = 0.0 if correct == 0 else centre - half
    high = 1.0 if correct == n else centre + half
    return {"accuracy": p, "correct": correct, "n": n, "ci95": [low, high]}


BOOTSTRAP_SAMPLES = 1000


def _resamples(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) item indices drawn with replacement: the same draws for every statistic of one seed."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bootstrap(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] | None = None,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """A statistic of per-item values with its 95% percentile-bootstrap interval: {"value", "ci95", "n"}.

    `values` (n,) or (n, k) rows, one per item; `stat` maps rows to a number (default: the mean of a 1-D array,
    i.e. a rate when the values are 0/1). Items are resampled whole, so a ratio statistic (perplexity: Σ loss /
    Σ tokens over documents) keeps each document's loss with its own token count."""
    data = np.asarray(values, dtype=np.float64)
    n = len(data)
    if n == 0:
        return {"value": math.nan, "ci95": [math.nan, math.nan], "n": 0}
    draws = _resamples(n, samples, seed)
    if stat is None:
        value, dist = float(data.mean()), data[draws].mean(axis=1)  # (samples,)
    else:
        value, dist = float(stat(data)), np.array([stat(data[d]) for d in draws])
    low, high = np.percentile(dist, [2.5, 97.5])
    return {"value": value, "ci95": [float(low), float(high)], "n": n}


def paired_delta(
    base: Sequence[float] | np.ndarray,
    tuned: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] | None = None,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """stat(tuned) - stat(base) on the same items, with a 95% paired-bootstrap interval (both resampled by the
    same draws, so what the items share cancels): {"value", "ci95", "n"}."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return {"value": math.nan, "ci95": [math.nan, math.nan], "n": 0}
    fn = stat or (lambda x: float(x.mean()))
    draws = _resamples(n, samples, seed)
    dist = np.array([fn(b[d]) - fn(a[d]) for d in draws])
    low, high = np.percentile(dist, [2.5, 97.5])
    return {"value": fn(b) - fn(a), "ci95": [float(low), float(high)], "n": n}
