"""The study Structured Report: one TID 1500 Measurement Report for a whole study (highdicom).

Same layout as the image SR (``pacs_ai.write.structured_report``, shaped for OHIF v3), built with the
same helpers, for several images:

- language, observation context (the device observer "pacs-ai"), procedure reported, an image library
  entry per analysed image;
- row 6, *Imaging Measurements*: for every analysed image, in the order received, its finding as in its
  own SR (``image_finding_groups``): a region group (the heat map's hottest region, suspected or not,
  else the whole image) and a TID 1501 group with its Fracture probability and Threshold Value in percent, linked by the same tracking UID as
  the image's own SR, and referencing the image;
- row 10, *Derived Imaging Measurements*: the study Probability (the rule applied to the images'
  probabilities) and the study Threshold Value, in percent, each referencing every analysed image, with
  the algorithm (parameters ``threshold=`` and ``study_rule=``);
- row 12, *Qualitative Evaluations*: the study finding, Fracture = Present / Absent.

UIDs derive from the Study Instance UID and the model version (``study-sr``, ``study-sr-series``), so a
later revision (more images arrived after completion) has the same Series and SOP Instance UIDs and
replaces the earlier one at a PACS that accepts a changed instance (Orthanc: ``OverwriteInstances``);
Instance Number is the revision and Content Date/Time say when it was made.
``read_study_report`` reads one back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import pydicom

from pacs_ai.errors import DicomWriteError
from pacs_ai.write.common import (
    ModelInfo,
    source_header,
)
from pacs_ai.write.structured_report import (
    FRACTURE,
    FRACTURE_PROBABILITY,
    PERCENT,
    PRESENT,
    PROBABILITY,
    algorithm_identification,
    fracture_report,
    image_finding_groups,
)
from pacs_ai.write.uids import derive_uid

__all__ = [
    "SERIES_DESCRIPTION",
    "SERIES_NUMBER",
    "STUDY_TRACKING",
    "ImageFinding",
    "StudyFinding",
    "build_study_report",
    "read_study_report",
]

SERIES_DESCRIPTION = "AI Fracture Study Report - NOT FOR DIAGNOSTIC USE"
SERIES_NUMBER = 9903
STUDY_TRACKING = "AI study fracture finding"


@dataclass(frozen=True)
class ImageFinding:
    """One analysed image of the study: its header (no pixels needed) and what the model said."""

    source: pydicom.Dataset
    probability: float
    fractured: bool
    threshold: float
    roi: tuple[float, float, float, float] | None = None
    """The suspected region (x0, y0, x1, y1, source pixels) of the image's own result, if any."""


@dataclass(frozen=True)
class StudyFinding:
    probability: float
    fractured: bool
    threshold: float
    rule: str


def build_study_report(
    images: Sequence[ImageFinding],
    study: StudyFinding,
    model: ModelInfo,
    *,
    revision: int,
) -> hd.sr.Comprehensive3DSR:
    """Build the study SR for ``images`` (at least one, all of one study). Raises DicomWriteError."""
    if not images:
        raise DicomWriteError("a study report needs at least one analysed image")
    headers = [source_header(i.source) for i in images]
    study_uid = str(headers[0].StudyInstanceUID)
    if any(str(h.StudyInstanceUID) != study_uid for h in headers):
        raise DicomWriteError("the images of a study report must share one Study Instance UID")
    try:
        regions: list[Any] = []
        for image, header in zip(images, headers, strict=True):
            regions += image_finding_groups(
                header,
                model,
                algorithm_identification(model, image.threshold),
                probability=image.probability,
                threshold=image.threshold,
                fractured=image.fractured,
                roi=image.roi,
            )
        study_algorithm = algorithm_identification(model, study.threshold, study.rule)
    except (TypeError, ValueError, AttributeError) as exc:
        raise DicomWriteError(f"cannot build the study Structured Report: {exc}") from exc
    return fracture_report(
        headers,
        model,
        study_algorithm,
        probability=study.probability,
        threshold=study.threshold,
        fractured=study.fractured,
        regions=regions,
        patient_source=images[0].source,  # headers[] have the patient/study modules blanked
        series_instance_uid=derive_uid(study_uid, model.version, "study-sr-series"),
        series_number=SERIES_NUMBER,
        sop_instance_uid=derive_uid(study_uid, model.version, "study-sr"),
        instance_number=int(revision),
        series_description=SERIES_DESCRIPTION,
        purpose="AI fracture classification of a study",
        what="study Structured Report",
    )


@dataclass(frozen=True)
class GroupFinding:
    """One finding of a study SR, read back: the study's (first) or one image's."""

    tracking: str
    fractured: bool
    probability: float
    source_sop_instance_uids: tuple[str, ...]


def _code(item: Any, attr: str) -> tuple[str, str] | None:
    seq = item.get(attr)
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)) if seq else None


def _percent(item: Any) -> float:
    measured = item.MeasuredValueSequence[0]
    value = float(measured.get("FloatingPointValue", measured.NumericValue))  # exact value, else the DS
    unit = _code(measured, "MeasurementUnitsCodeSequence")
    return value / 100.0 if unit == (PERCENT.value, PERCENT.scheme_designator) else value


def _images(item: Any) -> list[str]:
    return [
        str(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for c in item.get("ContentSequence") or []
        if c.get("ValueType") == "IMAGE"
    ]


def read_study_report(sr: pydicom.Dataset) -> list[GroupFinding]:
    """The study finding (tracking ``STUDY_TRACKING``) then each image's, read with plain pydicom."""
    root = sr.get("ContentSequence") or []
    study_p: float | None = None
    study_refs: tuple[str, ...] = ()
    study_fx: bool | None = None
    images: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for container in root:
        name = _code(container, "ConceptNameCodeSequence")
        if name == ("126011", "DCM"):  # Derived Imaging Measurements: the study probability
            for item in container.get("ContentSequence") or []:
                if _code(item, "ConceptNameCodeSequence") == (PROBABILITY.value, PROBABILITY.scheme_designator):
                    study_p, study_refs = _percent(item), tuple(_images(item))
        elif name == ("C0034375", "UMLS"):  # Qualitative Evaluations: the study finding
            for item in container.get("ContentSequence") or []:
                if _code(item, "ConceptNameCodeSequence") == (FRACTURE.value, FRACTURE.scheme_designator):
                    study_fx = _code(item, "ConceptCodeSequence") == (PRESENT.value, PRESENT.scheme_designator)
        elif name == ("126010", "DCM"):  # Imaging Measurements: the groups of each image's finding
            for group in container.get("ContentSequence") or []:
                uid = tracking = ""
                entry: dict[str, Any] = {}
                for item in group.get("ContentSequence") or []:
                    concept, vt = _code(item, "ConceptNameCodeSequence"), item.get("ValueType")
                    if vt == "UIDREF" and concept == ("112040", "DCM"):
                        uid = str(item.UID)
                    elif vt == "TEXT" and concept == ("112039", "DCM"):
                        tracking = str(item.TextValue)
                    elif vt == "CODE" and concept == (FRACTURE.value, FRACTURE.scheme_designator):
                        entry["fractured"] = _code(item, "ConceptCodeSequence") == (PRESENT.value, PRESENT.scheme_designator)
                    elif vt == "NUM" and concept in (
                        (PROBABILITY.value, PROBABILITY.scheme_designator),
                        (FRACTURE_PROBABILITY.value, FRACTURE_PROBABILITY.scheme_designator),
                    ):
                        entry["probability"] = _percent(item)
                    elif vt == "IMAGE":
                        entry["source"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                if uid not in images:
                    images[uid] = {"tracking": tracking}
                    order.append(uid)
                images[uid].update(entry)
    out = []
    if study_p is not None and study_fx is not None:
        out.append(GroupFinding(STUDY_TRACKING, study_fx, study_p, study_refs))
    for uid in order:
        e = images[uid]
        if "probability" in e and "fractured" in e:
            out.append(GroupFinding(e["tracking"], e["fractured"], e["probability"], (e.get("source", ""),)))
    return out
