"""Routing: does pacs-ai analyse this image, and which rule says so.

A :class:`Router` holds, in order:

1. the configured rules (``[[routing.rules]]``): the first rule all of whose conditions hold decides
   (``action = "analyse"`` or ``"skip"``). A condition left out always holds; a rule without any
   condition matches every image (e.g. a final ``skip`` rule for allow-list routing);
2. when no configured rule matched and ``[routing] intended_use = true``, the primary model card's
   intended use (:mod:`pacs_ai.route.intended_use`): every criterion must hold, the first that fails
   skips the image, named ``intended_use.<criterion>``;
3. otherwise the image is analysed (rule ``default``).

Conditions (each a list; a value matches when it equals one of the entries, case-insensitively):
``modality``, ``sop_class`` (UIDs or pydicom keywords such as ``DigitalXRayImageStorageForPresentation``),
``body_part`` (resolved terms, see :mod:`pacs_ai.route.body_part`; ``UNKNOWN`` matches an image whose body
part is not known), ``view_position``, ``laterality``, ``calling_aet``, ``series_description`` and
``protocol_name`` (shell-style patterns, ``*`` and ``?``, case-insensitive), and ``min_age_years``
(inclusive) / ``max_age_years`` (exclusive). A condition on an attribute the image lacks does not hold
(except ``body_part = ["UNKNOWN"]``), so a ``skip`` rule never fires on a missing value by accident.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pacs_ai.config import RoutingRuleConfig

if TYPE_CHECKING:  # config validation imports this module; the facts (and pydicom) only the worker
    from pacs_ai.route.facts import ImageFacts

__all__ = ["ANALYSE", "SKIP", "UNKNOWN", "Check", "Decision", "Router", "RoutingRule", "resolve_sop_class"]

ANALYSE = "analyse"
SKIP = "skip"
UNKNOWN = "UNKNOWN"


def resolve_sop_class(value: str) -> str:
    """A SOP Class UID from a UID or a pydicom keyword; raises ValueError for anything else."""
    from pydicom.uid import UID_dictionary

    text = value.strip()
    if text in UID_dictionary:
        return text
    for uid, entry in UID_dictionary.items():
        if entry[4] == text:
            return str(uid)
    if text and all(part.isdigit() for part in text.split(".")):
        return text  # a UID pydicom does not know (private SOP class)
    raise ValueError(f"{value!r} is neither a UID nor a pydicom SOP class keyword")


@dataclass(frozen=True)
class Check:
    """One condition's outcome, for explanations: ``holds`` and a sentence saying why."""

    name: str
    holds: bool
    detail: str
    missing: bool = False
    """The image has no (usable) value for the attribute the condition tests."""


@dataclass(frozen=True)
class RoutingRule(RoutingRuleConfig):
    """One rule: the conditions of a ``[[routing.rules]]`` entry (``name``, ``action`` analyse or skip, then
    the attributes it matches; empty tuples and None mean "no condition on this attribute") and its origin."""

    origin: str = "config"
    """Where the rule comes from: ``config`` or ``model card``."""

    def checks(self, facts: ImageFacts) -> list[Check]:
        """The outcome of every condition this rule has, in a fixed order."""
        out: list[Check] = []

        def one_of(name: str, wanted: tuple[str, ...], value: str | None, label: str) -> None:
            if not wanted:
                return
            if value is None:
                out.append(Check(name, False, f"{label} is missing (rule wants {', '.join(wanted)})", True))
                return
            holds = value.upper() in {w.upper() for w in wanted}
            out.append(Check(name, holds, f"{label} {value!r} {'is' if holds else 'is not'} one of {', '.join(wanted)}"))

        def pattern(name: str, patterns: tuple[str, ...], value: str | None, label: str) -> None:
            if not patterns:
                return
            if value is None:
                out.append(Check(name, False, f"{label} is missing (rule wants {', '.join(patterns)})", True))
                return
            hit = next((p for p in patterns if fnmatch.fnmatchcase(value.upper(), p.upper())), None)
            out.append(
                Check(name, hit is not None, f"{label} {value!r} " + (f"matches {hit!r}" if hit else f"matches none of {', '.join(patterns)}"))
            )

        one_of("modality", self.modality, facts.modality, "Modality")
        if self.sop_class:
            wanted = {resolve_sop_class(s) for s in self.sop_class}
            holds = facts.sop_class_uid in wanted
            out.append(Check("sop_class", holds, f"SOP Class {facts.sop_class_uid or 'missing'} {'is' if holds else 'is not'} one of {', '.join(self.sop_class)}", facts.sop_class_uid is None))
        if self.body_part:
            bp = facts.body_part
            wanted_bp = {b.upper() for b in self.body_part}
            holds = (bp.term in wanted_bp) if bp.known else (UNKNOWN in wanted_bp)
            out.append(Check("body_part", holds, f"body part {bp.describe()} {'is' if holds else 'is not'} one of {', '.join(self.body_part)}", not bp.known))
        one_of("view_position", self.view_position, facts.view_position, "View Position")
        one_of("laterality", self.laterality, facts.laterality, "laterality")
        one_of("calling_aet", self.calling_aet, facts.calling_aet, "calling AE title")
        pattern("series_description", self.series_description, facts.series_description, "Series Description")
        pattern("protocol_name", self.protocol_name, facts.protocol_name, "Protocol Name")
        if self.min_age_years is not None or self.max_age_years is not None:
            lo, hi = self.min_age_years, self.max_age_years
            span = f"[{lo if lo is not None else 0:g}, {hi if hi is not None else 'inf'}) years"
            if facts.age_years is None:
                out.append(Check("age", False, f"patient age unknown (rule wants {span})", True))
            else:
                holds = (lo is None or facts.age_years >= lo) and (hi is None or facts.age_years < hi)
                out.append(Check("age", holds, f"patient age {facts.age_years:.1f} years (from {facts.age_source}) {'is' if holds else 'is not'} in {span}"))
        return out

    def matches(self, facts: ImageFacts) -> bool:
        return all(c.holds for c in self.checks(facts))


@dataclass(frozen=True)
class Decision:
    """The routing outcome of one image: ``action`` analyse/skip, the deciding ``rule`` and ``reason``."""

    action: str
    rule: str
    reason: str
    trace: tuple[str, ...] = field(default=(), compare=False)
    """One line per rule looked at, in order (for ``pacs-ai route explain``)."""

    @property
    def analyse(self) -> bool:
        return self.action == ANALYSE

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "rule": self.rule, "reason": self.reason}


@dataclass(frozen=True)
class Router:
    """Configured rules, then intended-use criteria, then analyse (see the module docstring)."""

    rules: tuple[RoutingRule, ...] = ()
    intended_use: tuple[RoutingRule, ...] = ()
    """Criteria of the model card: each an ``analyse`` rule that must hold; the first that does not skips."""
    unknown_body_part: str = ANALYSE
    """What an unknown body part does to an intended-use body-part criterion: ``analyse`` lets it pass."""

    def decide(self, facts: ImageFacts) -> Decision:
        trace: list[str] = []
        for rule in self.rules:
            checks = rule.checks(facts)
            failed = [c for c in checks if not c.holds]
            if not failed:
                reason = "; ".join(c.detail for c in checks) or "the rule has no conditions"
                trace.append(f"rule {rule.name!r} ({rule.action}): matches: {reason}")
                return Decision(rule.action, rule.name, reason, tuple(trace))
            trace.append(f"rule {rule.name!r} ({rule.action}): does not match: {failed[0].detail}")
        for criterion in self.intended_use:
            # A value the image lacks does not exclude it from the intended use (only a known value outside
            # it does); an unknown body part follows [routing] unknown_body_part.
            checks = [
                c
                if c.holds or not c.missing or (c.name == "body_part" and self.unknown_body_part != ANALYSE)
                else Check(c.name, True, f"{c.detail}: not known, so not excluded", True)
                for c in criterion.checks(facts)
            ]
            failed = [c for c in checks if not c.holds]
            if failed:
                trace.append(f"{criterion.name}: fails: {failed[0].detail}")
                return Decision(SKIP, criterion.name, f"outside the model's intended use: {failed[0].detail}", tuple(trace))
            detail = "; ".join(c.detail for c in checks)
            trace.append(f"{criterion.name}: holds: {detail}")
        if self.intended_use:
            names = ", ".join(c.name.removeprefix("intended_use.").replace("_", " ") for c in self.intended_use)
            return Decision(ANALYSE, "intended_use", f"within the model's intended use ({names})", tuple(trace))
        trace.append("default: no rule matched and no intended use is configured: analysed")
        return Decision(ANALYSE, "default", "no routing rule matched", tuple(trace))

    def describe(self) -> list[str]:
        """One line per rule and criterion, in the order they are applied."""
        lines = [f"{i}. {_rule_text(r)}" for i, r in enumerate(self.rules, 1)]
        lines += [f"intended use: {_rule_text(r)}" for r in self.intended_use]
        return lines


def _rule_text(rule: RoutingRule) -> str:
    parts = []
    for name in ("modality", "sop_class", "body_part", "view_position", "laterality", "calling_aet", "series_description", "protocol_name"):
        values = getattr(rule, name)
        if values:
            parts.append(f"{name} in {list(values)}")
    if rule.min_age_years is not None:
        parts.append(f"age >= {rule.min_age_years:g}")
    if rule.max_age_years is not None:
        parts.append(f"age < {rule.max_age_years:g}")
    return f"{rule.name} [{rule.action}, from {rule.origin}]: " + (" and ".join(parts) or "every image")


def rules_from_tables(tables: Sequence[RoutingRuleConfig]) -> tuple[RoutingRule, ...]:
    """Config rule entries to RoutingRules (body parts upper-cased, as the matching compares them)."""
    rules = []
    for t in tables:
        fields = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
        fields["body_part"] = tuple(b.upper() for b in t.body_part)
        rules.append(RoutingRule(**fields))
    return tuple(rules)
