"""The study Structured Report: one TID 1500 Measurement Report for a whole study (highdicom).

Content (under the "Imaging Measurement Report" root, Comprehensive 3D SR):

- observation context (the device observer "pacs-ai"), procedure reported, an image library entry per
  analysed image;
- the study finding: a *Measurements and Qualitative Evaluations* group (TID 1501), tracking identifier
  "AI study fracture finding", finding type Fracture, every analysed image as source, the algorithm
  with parameters ``threshold=`` and ``study_rule=``: Fracture = Present/Absent, Probability (the study
  probability by the rule) and Threshold Value;
- one such group per analysed image, in the order received: tracking identifier "AI fracture
  classification: image N of M" with the same tracking UID as the image's own SR, the image as source,
  its Fracture evaluation, Probability and Threshold Value.

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
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from pacs_ai.errors import DicomWriteError
from pacs_ai.write.common import MANUFACTURER, ModelInfo, contributing_equipment, copy_patient_study, source_header
from pacs_ai.write.structured_report import (
    ABSENT,
    FRACTURE,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    PROCEDURE,
    THRESHOLD,
    _library_entry,
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


@dataclass(frozen=True)
class StudyFinding:
    probability: float
    fractured: bool
    threshold: float
    rule: str


def _algorithm(model: ModelInfo, threshold: float, rule: str | None = None) -> hd.sr.AlgorithmIdentification:
    params = [f"threshold={threshold:.6g}"] + ([f"study_rule={rule}"] if rule else [])
    if model.architecture:
        params.append(f"architecture={model.architecture}")
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64], version=model.version[:64], parameters=params, manufacturer=MANUFACTURER
    )


def _group(
    tracking: str, tracking_uid: str, algorithm: Any, fractured: bool, probability: float, threshold: float, headers: Sequence[pydicom.Dataset]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking),
        finding_type=FRACTURE,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(FRACTURE, PRESENT if fractured else ABSENT)],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=float(probability), unit=NO_UNITS),
            hd.sr.Measurement(name=THRESHOLD, value=float(threshold), unit=NO_UNITS),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in headers],
    )


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
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=derive_uid(model.name, model.version, "device"),
                name=MANUFACTURER,
                manufacturer_name=MANUFACTURER,
                model_name=model.model_name_lo,
            ),
        )
        groups = [
            _group(
                STUDY_TRACKING,
                derive_uid(study_uid, model.version, "study-tracking"),
                _algorithm(model, study.threshold, study.rule),
                study.fractured,
                study.probability,
                study.threshold,
                headers,
            )
        ]
        for n, (image, header) in enumerate(zip(images, headers), 1):
            groups.append(
                _group(
                    f"AI fracture classification: image {n} of {len(images)}",
                    derive_uid(str(header.SOPInstanceUID), model.version, "tracking"),
                    _algorithm(model, image.threshold),
                    image.fractured,
                    image.probability,
                    image.threshold,
                    [header],
                )
            )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=PROCEDURE,
            imaging_measurements=groups,
            referenced_images=[_library_entry(h) for h in headers],
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=headers,
            content=report,
            series_instance_uid=derive_uid(study_uid, model.version, "study-sr-series"),
            series_number=SERIES_NUMBER,
            sop_instance_uid=derive_uid(study_uid, model.version, "study-sr"),
            instance_number=int(revision),
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[contributing_equipment(model, "AI fracture classification of a study")],
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name=model.model_name_lo,
            software_versions=model.software_versions,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise DicomWriteError(f"cannot build the study Structured Report: {exc}") from exc
    copy_patient_study(images[0].source, sr, what="study Structured Report")  # headers[] have them blanked
    return sr


@dataclass(frozen=True)
class GroupFinding:
    """One measurement group of a study SR, read back."""

    tracking: str
    fractured: bool
    probability: float
    source_sop_instance_uids: tuple[str, ...]


def _code(item: Any, attr: str) -> tuple[str, str] | None:
    seq = item.get(attr)
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)) if seq else None


def read_study_report(sr: pydicom.Dataset) -> list[GroupFinding]:
    """The measurement groups of a study SR (study group first), read with plain pydicom."""
    out = []

    def walk(items: Any) -> Any:
        for item in items or []:
            yield item
            yield from walk(item.get("ContentSequence"))

    for item in walk(sr.get("ContentSequence")):
        if item.get("ValueType") != "CONTAINER" or _code(item, "ConceptNameCodeSequence") != ("125007", "DCM"):
            continue
        tracking, fractured, probability, sources = "", None, None, []
        for child in item.get("ContentSequence") or []:
            concept, vt = _code(child, "ConceptNameCodeSequence"), child.get("ValueType")
            if vt == "TEXT" and concept == ("112039", "DCM"):
                tracking = str(child.TextValue)
            elif vt == "CODE" and concept == (FRACTURE.value, FRACTURE.scheme_designator) and fractured is None:
                fractured = _code(child, "ConceptCodeSequence") == (PRESENT.value, PRESENT.scheme_designator)
            elif vt == "NUM" and concept == (PROBABILITY.value, PROBABILITY.scheme_designator):
                probability = float(child.MeasuredValueSequence[0].NumericValue)
            elif vt == "IMAGE":
                sources.append(str(child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        if fractured is not None and probability is not None:
            out.append(GroupFinding(tracking, fractured, probability, tuple(sources)))
    return out
