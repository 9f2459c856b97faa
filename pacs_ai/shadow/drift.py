"""Probability distributions and their drift: histograms on fixed bin edges and the population stability
index (PSI).

``PSI = sum_b (a_b - e_b) * ln(a_b / e_b)`` over bins ``b``, with ``e_b`` the reference share (the model
card's validation distribution) and ``a_b`` the observed share; shares are floored at ``EPSILON`` so an
empty bin does not make it infinite. Usual reading (Siddiqi, *Credit Risk Scorecards*, 2006): below 0.1
no real shift, 0.1-0.25 a moderate shift worth watching, above 0.25 a significant shift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["EPSILON", "histogram", "psi", "psi_reading", "quantile_edges"]

EPSILON = 1e-4


def quantile_edges(values: Sequence[float], n_bins: int = 10) -> list[float]:
    """Bin edges at the quantiles of ``values`` (first edge 0, last 1), duplicates merged.

    Quantile bins give each bin about the same reference share, which keeps PSI sensitive where the
    reference distribution has its mass (calibrated probabilities crowd near 0).
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no values to take quantiles of")
    inner = np.quantile(arr, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    edges = [0.0] + [float(v) for v in inner] + [1.0]
    out: list[float] = []
    for e in edges:
        if not out or e > out[-1]:
            out.append(e)
    return out


def histogram(values: Sequence[float] | np.ndarray, edges: Sequence[float]) -> list[int]:
    """Counts of ``values`` per bin ``[edges[i], edges[i+1])`` (the last bin includes 1.0)."""
    arr = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(arr, bins=np.asarray(edges, dtype=np.float64))
    return [int(c) for c in counts]


def psi(expected_counts: Sequence[int], actual_counts: Sequence[int]) -> float:
    """Population stability index of ``actual_counts`` against ``expected_counts`` (same bins).

    Raises ValueError when the bin counts differ in length or either side is empty.
    """
    if len(expected_counts) != len(actual_counts):
        raise ValueError(f"{len(expected_counts)} reference bins but {len(actual_counts)} observed bins")
    e_total, a_total = sum(expected_counts), sum(actual_counts)
    if e_total <= 0 or a_total <= 0:
        raise ValueError("PSI needs at least one value on each side")
    total = 0.0
    for e, a in zip(expected_counts, actual_counts, strict=True):
        es = max(e / e_total, EPSILON)
        as_ = max(a / a_total, EPSILON)
        total += (as_ - es) * math.log(as_ / es)
    return total


def psi_reading(value: float) -> str:
    """``stable`` (< 0.1), ``moderate shift`` (0.1-0.25) or ``significant shift`` (> 0.25)."""
    if value < 0.1:
        return "stable"
    if value <= 0.25:
        return "moderate shift"
    return "significant shift"
