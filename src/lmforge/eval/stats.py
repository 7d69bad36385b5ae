"""Confidence intervals for the rates evaluation reports."""

from __future__ import annotations

import math
from typing import Any

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
