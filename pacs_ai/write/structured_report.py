"""The Structured Report: TID 1500 Measurement Report in a Comprehensive 3D SR (highdicom).

Content tree (under the "Imaging Measurement Report" root):

- observation context: the device observer "pacs-ai" (UID derived from the model name and version);
- procedure reported: Radiographic imaging procedure (SCT 363680008);
- image library: the source image;
- one *Measurements and Qualitative Evaluations* group (TID 1501), tracking identifier + UID, finding type
  Fracture (SCT 72704001), the source image, the algorithm (name, version, threshold parameter):
  - qualitative evaluation Fracture = Present (SCT 52101004) / Absent (SCT 2667000);
  - measurement Probability (DCM 122157) = calibrated P(fracture), unit "1" (UCUM, no units);
  - measurement Threshold Value (DCM 122411) = decision threshold, unit "1";
- when a fracture is suspected and a hottest region was found: one *Planar ROI Measurements and
  Qualitative Evaluations* group (TID 1410) with its own tracking identifier, the region as a closed
  POLYLINE (bounding box) on the source image, and Fracture = Present.

``read_finding`` reads such a report back (used by tests and the end-to-end check).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from pacs_ai.errors import DicomWriteError
from pacs_ai.write.common import (
    MANUFACTURER,
    ModelInfo,
    contributing_equipment,
    copy_patient_study,
    source_header,
)
from pacs_ai.write.numbering import WARNING, number_results
from pacs_ai.write.uids import derive_uid

__all__ = [
    "ABSENT",
    "FRACTURE",
    "PRESENT",
    "PROBABILITY",
    "SERIES_DESCRIPTION",
    "SERIES_TITLE",
    "THRESHOLD",
    "SrFinding",
    "build_structured_report",
    "read_finding",
]

SERIES_TITLE = "AI Fracture Report"
SERIES_DESCRIPTION = f"{SERIES_TITLE} - {WARNING}"
"""The description without a source label (the writer adds the source: numbering.py)."""

FRACTURE = Code("72704001", "SCT", "Fracture")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
PROBABILITY = Code("122157", "DCM", "Probability")
THRESHOLD = Code("122411", "DCM", "Threshold Value")
PROCEDURE = Code("363680008", "SCT", "Radiographic imaging procedure")
NO_UNITS = codes.UCUM.NoUnits


def _algorithm(model: ModelInfo, threshold: float) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64],
        version=model.version[:64],
        parameters=[f"threshold={threshold:.6g}"] + ([f"architecture={model.architecture}"] if model.architecture else []),
        manufacturer=MANUFACTURER,
    )


_PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")


def _library_entry(header: pydicom.Dataset) -> pydicom.Dataset:
    """The image library's view of the source.

    For projection radiographs highdicom adds TID 1603 descriptors, which need a two-valued Patient
    Orientation and an (Imager) Pixel Spacing; when the source lacks them those optional descriptors are
    left out instead of failing (the library entry's coded modality comes from the SOP class anyway).
    """
    if str(header.get("Modality", "")) not in _PROJECTION_MODALITIES:
        return header
    entry = copy.copy(header)
    orientation = header.get("PatientOrientation")
    spacing = header.get("ImagerPixelSpacing") or header.get("PixelSpacing")
    ok_orientation = orientation is not None and not isinstance(orientation, str) and len(orientation) == 2
    ok_orientation = ok_orientation and all(str(v).strip() for v in orientation)
    if ok_orientation and spacing is not None and not isinstance(spacing, (str, float)) and len(spacing) == 2:
        entry.ImagerPixelSpacing = list(spacing)
    else:
        entry.Modality = "OT"
    return entry


def _roi_polyline(roi: Sequence[float]) -> np.ndarray:
    """Closed polyline (5 points, column/row) of an (x0, y0, x1, y1) box in pixel-edge coordinates."""
    x0, y0, x1, y1 = (float(v) for v in roi)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def build_structured_report(
    source: pydicom.Dataset,
    model: ModelInfo,
    *,
    probability: float,
    threshold: float,
    fractured: bool,
    roi: Sequence[float] | None,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int | None = None,
    instance_number: int | None = None,
    series_description: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the SR of one classification of ``source``; ``roi`` is only written when ``fractured``.

    Tracking UIDs are derived from the source SOP Instance UID and the model version (deterministic).
    Raises DicomWriteError when highdicom refuses the inputs.
    """
    header = source_header(source)
    src_uid = str(header.SOPInstanceUID)
    numbering = number_results(source, "", SERIES_TITLE)
    series_number = series_number if series_number is not None else numbering.sr_series_number
    instance_number = instance_number if instance_number is not None else numbering.instance_number
    series_description = series_description or numbering.sr_series_description
    try:
        algorithm = _algorithm(model, threshold)
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=derive_uid(f"{model.name}", model.version, "device"),
                name=MANUFACTURER,
                manufacturer_name=MANUFACTURER,
                model_name=model.model_name_lo,
            ),
        )
        finding = PRESENT if fractured else ABSENT
        groups: list[Any] = [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derive_uid(src_uid, model.version, "tracking"), identifier="AI fracture classification"
                ),
                finding_type=FRACTURE,
                algorithm_id=algorithm,
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(FRACTURE, finding)],
                measurements=[
                    hd.sr.Measurement(name=PROBABILITY, value=float(probability), unit=NO_UNITS),
                    hd.sr.Measurement(name=THRESHOLD, value=float(threshold), unit=NO_UNITS),
                ],
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
            )
        ]
        if fractured and roi is not None:
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=_roi_polyline(roi),
                source_image=hd.sr.SourceImageForRegion(
                    referenced_sop_class_uid=header.SOPClassUID, referenced_sop_instance_uid=src_uid
                ),
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=derive_uid(src_uid, model.version, "roi-tracking"),
                        identifier="AI heat map hottest region",
                    ),
                    referenced_region=region,
                    finding_type=FRACTURE,
                    algorithm_id=algorithm,
                    qualitative_evaluations=[hd.sr.QualitativeEvaluation(FRACTURE, PRESENT)],
                )
            )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=PROCEDURE,
            imaging_measurements=groups,
            referenced_images=[_library_entry(header)],
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=[header],
            content=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[contributing_equipment(model, "AI fracture classification")],
            series_description=series_description,
            manufacturer_model_name=model.model_name_lo,
            software_versions=model.software_versions,
            # the source's character set is copied below with its text (header.py)
            specific_character_set=None,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise DicomWriteError(f"cannot build the Structured Report: {exc}") from exc
    copy_patient_study(source, sr, what="Structured Report")
    return sr


@dataclass(frozen=True)
class SrFinding:
    """What an SR written by :func:`build_structured_report` says."""

    fractured: bool
    probability: float
    threshold: float | None
    algorithm_name: str | None
    algorithm_version: str | None
    roi: tuple[float, float, float, float] | None
    source_sop_instance_uid: str | None


def _walk(items: Any):  # type: ignore[no-untyped-def]
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def _code_of(item: Any, attr: str) -> tuple[str, str] | None:
    seq = item.get(attr)
    if not seq:
        return None
    return str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)


def read_finding(sr: pydicom.Dataset) -> SrFinding:
    """Read the finding back from an SR (a plain pydicom dataset is enough: no highdicom parsing needed)."""
    fractured: bool | None = None
    probability: float | None = None
    threshold: float | None = None
    name = version = None
    roi = None
    source_uid = None
    for item in _walk(sr.get("ContentSequence")):
        concept = _code_of(item, "ConceptNameCodeSequence")
        vt = item.get("ValueType")
        if vt == "CODE" and concept == (FRACTURE.value, FRACTURE.scheme_designator) and fractured is None:
            fractured = _code_of(item, "ConceptCodeSequence") == (PRESENT.value, PRESENT.scheme_designator)
        elif vt == "NUM" and concept is not None:
            value = float(item.MeasuredValueSequence[0].NumericValue)
            if concept == (PROBABILITY.value, PROBABILITY.scheme_designator):
                probability = value
            elif concept == (THRESHOLD.value, THRESHOLD.scheme_designator):
                threshold = value
        elif vt == "TEXT" and concept == ("111001", "DCM"):
            name = name or str(item.TextValue)
        elif vt == "TEXT" and concept == ("111003", "DCM"):
            version = version or str(item.TextValue)
        elif vt == "SCOORD" and roi is None:
            pts = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
            roi = (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))
        elif vt == "IMAGE" and source_uid is None:
            source_uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    if fractured is None or probability is None:
        raise ValueError("not a pacs-ai fracture report: no Fracture evaluation or Probability measurement")
    return SrFinding(fractured, probability, threshold, name, version, roi, source_uid)
