"""Study-level probability from the probabilities of a study's images.

Three rules, each a function of the image probabilities ``p_1..p_n`` (calibrated P(fracture), in [0, 1]):

- ``max``: ``max(p_i)``; the study is positive when any image is (with the image threshold, a study is
  flagged exactly when at least one of its images is);
- ``mean``: ``mean(p_i)`` (MURA's study rule: Rajpurkar et al., 2017);
- ``noisy_or``: ``1 - prod(1 - p_i)``: the probability that at least one image shows a fracture if the
  images were independent evidence (they are not: views of one region are correlated, so it over-counts).

The rule the daemon uses is chosen on validation data (``pacs-ai-train study-rule``, see
docs/studies.md) and recorded in the model card's ``study`` section with its threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["RULES", "aggregate"]

RULES: tuple[str, ...] = ("max", "mean", "noisy_or")


def aggregate(rule: str, probabilities: Sequence[float]) -> float:
    """The study probability of ``probabilities`` under ``rule`` (one of :data:`RULES`).

    Raises ValueError for an unknown rule, no probabilities, or a value outside [0, 1].
    """
    values = [float(p) for p in probabilities]
    if not values:
        raise ValueError("a study needs at least one image probability")
    if any(not (0.0 <= p <= 1.0) or math.isnan(p) for p in values):
        raise ValueError(f"probabilities must lie in [0, 1], got {values}")
    if rule == "max":
        return max(values)
    if rule == "mean":
        return sum(values) / len(values)
    if rule == "noisy_or":
        return 1.0 - math.prod(1.0 - p for p in values)
    raise ValueError(f"unknown study rule {rule!r} (known: {', '.join(RULES)})")
