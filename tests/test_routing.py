"""Routing rules and intended use: body part resolution, rule order, config checks, ``route explain``.

Expected outcomes are written out by hand from the rule semantics documented in pacs_ai/route/rules.py
and docs/operations.md, not computed by the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pacs_ai.config import parse_config
from pacs_ai.errors import ConfigError, ModelError
from pacs_ai.infer.model_card import load_card
from pacs_ai.route.body_part import resolve_body_part
from pacs_ai.route.build import build_router
from pacs_ai.route.facts import ImageFacts
from pacs_ai.route.intended_use import intended_use_rules
from pacs_ai.route.rules import Router, RoutingRule
from support.routing_samples import SAMPLE, chest, variant

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "reference"


def _ds(**attrs: object) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Modality = "CR"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("attrs", "term", "source"),
    [
        ({"BodyPartExamined": "HAND"}, "HAND", "BodyPartExamined"),
        ({"BodyPartExamined": "l hand"}, "HAND", "BodyPartExamined"),
        ({"BodyPartExamined": "Handgelenk re."}, "WRIST", "BodyPartExamined"),
        ({"BodyPartExamined": "Thorax"}, "CHEST", "BodyPartExamined"),
        ({"BodyPartExamined": "C-SPINE"}, "CSPINE", "BodyPartExamined"),
        ({"BodyPartExamined": "EXTREMITY", "StudyDescription": "Non-ossifying fibroma of distal tibia"}, "LEG", "StudyDescription"),
        ({"BodyPartExamined": "EXTREMITY"}, "EXTREMITY", "BodyPartExamined"),
        ({"ProtocolName": "XR FEMORAL HEAD AP"}, "HIP", "ProtocolName"),
        ({"SeriesDescription": "Schulter a.p."}, "SHOULDER", "SeriesDescription"),
        ({"StudyDescription": "XR CHEST PA"}, "CHEST", "StudyDescription"),
        ({"StudyDescription": "Follow-up 6 weeks"}, None, None),
        ({}, None, None),
    ],
)
def test_body_part_resolution(attrs: dict, term: str | None, source: str | None) -> None:
    bp = resolve_body_part(_ds(**attrs))
    assert (bp.term, bp.source) == (term, source)


def _facts(**attrs: object) -> ImageFacts:
    calling = attrs.pop("calling_aet", None)
    return ImageFacts.from_dataset(_ds(**attrs), calling)  # type: ignore[arg-type]


def test_patient_age_from_age_string_and_from_dates() -> None:
    assert _facts(PatientAge="045Y").age_years == 45
    assert _facts(PatientAge="006M").age_years == pytest.approx(0.5)
    f = _facts(PatientBirthDate="20000101", StudyDate="20100101")
    assert f.age_years == pytest.approx(10.0, abs=0.01) and f.age_source == "PatientBirthDate and StudyDate"
    assert _facts(PatientAge="abc").age_years is None


REFERENCE = load_card(BUNDLED)
DEFAULT = Router((), intended_use_rules(REFERENCE.intended_use))


@pytest.mark.parametrize(
    ("attrs", "action", "rule"),
    [
        ({"BodyPartExamined": "HAND", "PatientAge": "040Y"}, "analyse", "intended_use"),
        ({"BodyPartExamined": "CHEST", "PatientAge": "040Y"}, "skip", "intended_use.body_part"),
        ({"StudyDescription": "XR CHEST PA"}, "skip", "intended_use.body_part"),
        ({"BodyPartExamined": "HAND", "PatientAge": "008Y"}, "skip", "intended_use.age"),
        ({"BodyPartExamined": "HAND", "Modality": "MG"}, "skip", "intended_use.modality"),
        ({"BodyPartExamined": "HAND"}, "analyse", "intended_use"),  # age unknown: not excluded
        ({}, "analyse", "intended_use"),  # body part unknown: analysed by default
    ],
)
def test_reference_model_intended_use(attrs: dict, action: str, rule: str) -> None:
    decision = DEFAULT.decide(_facts(**attrs))
    assert (decision.action, decision.rule) == (action, rule), decision.reason


def test_unknown_body_part_can_be_skipped() -> None:
    strict = Router((), intended_use_rules(REFERENCE.intended_use), unknown_body_part="skip")
    decision = strict.decide(_facts(StudyDescription="Follow-up"))
    assert (decision.action, decision.rule) == ("skip", "intended_use.body_part")
    assert "unknown" in decision.reason


def test_first_matching_rule_decides_and_missing_values_never_match() -> None:
    rules = (
        RoutingRule("ed-only-hands", "analyse", calling_aet=("ED_ROUTER",), body_part=("HAND",)),
        RoutingRule("no-scouts", "skip", series_description=("*scout*", "*LOCALIZER*")),
        RoutingRule("no-lateral", "skip", view_position=("LL", "RL"), laterality=("L",)),
        RoutingRule("sc-off", "skip", sop_class=("SecondaryCaptureImageStorage",)),
        RoutingRule("no-kids", "skip", max_age_years=18),
    )
    router = Router(rules, intended_use_rules(REFERENCE.intended_use))
    # rule 1 wins over the intended use (a chest would be skipped by it, but a hand from ED_ROUTER...)
    assert router.decide(_facts(BodyPartExamined="HAND", PatientAge="010Y", calling_aet="ED_ROUTER")).rule == "ed-only-hands"
    assert router.decide(_facts(BodyPartExamined="HAND", SeriesDescription="Scout view")).rule == "no-scouts"
    assert router.decide(_facts(BodyPartExamined="HAND", ViewPosition="LL", ImageLaterality="L")).rule == "no-lateral"
    # one condition of the rule does not hold: the rule does not fire
    assert router.decide(_facts(BodyPartExamined="HAND", ViewPosition="LL", ImageLaterality="R")).rule == "intended_use"
    sc = _facts(BodyPartExamined="HAND")
    sc = ImageFacts(**{**sc.__dict__, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"})
    assert router.decide(sc).rule == "sc-off"
    assert router.decide(_facts(BodyPartExamined="HAND", PatientAge="012Y")).rule == "no-kids"
    # no age: the age rule does not fire, the intended use lets it through
    decision = router.decide(_facts(BodyPartExamined="HAND"))
    assert (decision.action, decision.rule) == ("analyse", "intended_use")
    assert [line.split(":")[0] for line in decision.trace][:5] == [
        "rule 'ed-only-hands' (analyse)", "rule 'no-scouts' (skip)", "rule 'no-lateral' (skip)",
        "rule 'sc-off' (skip)", "rule 'no-kids' (skip)",
    ]


def test_catch_all_skip_rule_makes_an_allow_list() -> None:
    router = Router((RoutingRule("wrists", "analyse", body_part=("WRIST",)), RoutingRule("rest", "skip")))
    assert router.decide(_facts(BodyPartExamined="WRIST")).action == "analyse"
    assert router.decide(_facts(BodyPartExamined="HAND")).rule == "rest"


def test_without_intended_use_everything_is_analysed() -> None:
    card = load_card(BUNDLED)
    off = build_router(parse_config({"routing": {"intended_use": False}}, REPO).routing, card)
    assert off.decide(_facts(BodyPartExamined="CHEST")).rule == "default"


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"name": "x", "action": "drop"}, "routing.rules[0].action"),
        ({"name": "x", "body_part": ["HANDS"]}, "routing.rules[0].body_part[0]"),
        ({"name": "x", "sop_class": ["NoSuchStorage"]}, "routing.rules[0].sop_class[0]"),
        ({"name": "intended_use.x"}, "routing.rules[0].name"),
        ({"name": "x", "min_age_years": 30, "max_age_years": 18}, "routing.rules[0].max_age_years"),
        ({"name": "x", "min_age_years": -1}, "routing.rules[0].min_age_years"),
        ({"name": "x", "colour": ["red"]}, "routing.rules[0].colour"),
    ],
)
def test_bad_rules_are_refused_naming_the_key(rule: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"routing": {"rules": [rule]}}, REPO)
    assert err.value.key == key


def test_bad_intended_use_section_is_refused() -> None:
    with pytest.raises(ModelError, match="intended_use.body_parts"):
        intended_use_rules({"body_parts": "HAND"})
    with pytest.raises(ModelError, match="intended_use.colour"):
        intended_use_rules({"colour": ["red"]})


def _explain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_ai", "route", "explain", *args], capture_output=True, text=True, timeout=120
    )


def test_route_explain_names_the_rule(tmp_path: Path) -> None:
    chest_file = chest(tmp_path)
    out = _explain(str(chest_file), str(SAMPLE))
    assert out.returncode == 3, out.stderr
    assert f"{chest_file}: SKIPPED by rule intended_use.body_part" in out.stdout
    assert "body part CHEST (from Body Part Examined 'CHEST') is not one of HAND" in out.stdout
    assert f"{SAMPLE}: ANALYSED by rule intended_use" in out.stdout

    config = tmp_path / "c.toml"
    config.write_text('[[routing.rules]]\nname = "ed-router"\naction = "skip"\ncalling_aet = ["ED"]\n')
    out = _explain("--config", str(config), "--calling-aet", "ED", "--json", str(SAMPLE))
    assert out.returncode == 3, out.stderr
    (entry,) = json.loads(out.stdout)
    assert (entry["action"], entry["rule"]) == ("skip", "ed-router")
    assert "calling AE title 'ED' is one of ED" in entry["reason"]
    child = variant(tmp_path, "child", PatientAge="007Y")
    out = _explain(str(child))
    assert out.returncode == 3 and "SKIPPED by rule intended_use.age" in out.stdout
