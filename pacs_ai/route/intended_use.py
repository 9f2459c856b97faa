"""The model card's ``intended_use`` section as routing criteria.

Card section (all keys optional)::

    "intended_use": {
      "description": "Adult hand, leg, hip and shoulder radiographs (FracAtlas)",
      "modalities": ["CR", "DX"],
      "body_parts": ["HAND", "FINGER", "WRIST", "LEG", ...],   # resolved terms, see route.body_part
      "min_age_years": 18,
      "max_age_years": null
    }

Each present key becomes one criterion rule, applied in the order modality, body part, age, and named
``intended_use.modality``, ``intended_use.body_part``, ``intended_use.age``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pacs_ai.errors import ModelError
from pacs_ai.route.rules import ANALYSE, RoutingRule

__all__ = ["KEYS", "intended_use_rules"]

KEYS = ("description", "modalities", "body_parts", "min_age_years", "max_age_years")


def _strings(section: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = section.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ModelError(f"model card: intended_use.{key}: must be a list of non-empty strings")
    return tuple(v.strip().upper() for v in value)


def _age(section: Mapping[str, Any], key: str) -> float | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ModelError(f"model card: intended_use.{key}: must be a non-negative number of years")
    return float(value)


def intended_use_rules(section: Mapping[str, Any] | None) -> tuple[RoutingRule, ...]:
    """Criterion rules from a card's ``intended_use`` section (empty for an empty section).

    Raises ModelError naming the key when the section is malformed.
    """
    if not section:
        return ()
    unknown = sorted(set(section) - set(KEYS))
    if unknown:
        raise ModelError(f"model card: intended_use.{unknown[0]}: unknown key (known: {', '.join(KEYS)})")
    rules = []
    modalities = _strings(section, "modalities")
    if modalities:
        rules.append(RoutingRule("intended_use.modality", ANALYSE, modality=modalities, origin="model card"))
    body_parts = _strings(section, "body_parts")
    if body_parts:
        rules.append(RoutingRule("intended_use.body_part", ANALYSE, body_part=body_parts, origin="model card"))
    lo, hi = _age(section, "min_age_years"), _age(section, "max_age_years")
    if lo is not None or hi is not None:
        rules.append(RoutingRule("intended_use.age", ANALYSE, min_age_years=lo, max_age_years=hi, origin="model card"))
    return tuple(rules)
