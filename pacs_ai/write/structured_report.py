"""The Structured Report: TID 1500 Measurement Report in a Comprehensive 3D SR (highdicom).

Content tree (under the "Imaging Measurement Report" root, PS3.16 TID 1500):

- language, observation context (the device observer "pacs-ai", UID derived from the model name and
  version), procedure reported (Radiographic imaging procedure, SCT 363680008), image library (the
  source image);
- row 6, *Imaging Measurements* (DCM 126010), one finding in two groups linked by one Tracking
  Unique Identifier (derived from the source SOP Instance UID and the model version):
  - a *Planar ROI Measurements and Qualitative Evaluations* group (TID 1410): tracking identifier, the
    region as a closed POLYLINE (DCM 111030 "Image Region") on the source image, the algorithm (TID
    4019, threshold as parameter), Fracture = Present / Absent; finding type Fracture when suspected.
    The region is the heat map's hottest region (bounding box): the suspected region when a fracture is
    suspected (tracking identifier ``REGION_TRACKING``, finding type Fracture), the region of the
    strongest (sub-threshold) evidence when it is not (``HEAT_PEAK_TRACKING``, Fracture = Absent, no
    finding type); without a heat map (no localisation) it is the whole image, the region the classifier
    evaluated (``IMAGE_TRACKING``);
  - a *Measurements and Qualitative Evaluations* group (TID 1501) with the source image: *Fracture
    probability* (``FRACTURE_PROBABILITY``, a local code: TID 300 measurement names are extensible) =
    calibrated P(fracture) and Threshold Value (DCM 122411), both in percent (UCUM ``%``); the Numeric
    Value (DS, what viewers print) is rounded to one decimal, the exact value is the Floating Point Value
    (FD) of the same NUM (PS3.3 C.18.1: FD carries the value when the DS has too little precision);
- row 10, *Derived Imaging Measurements* (DCM 126011): Probability and Threshold Value of the whole
  image (TID 300, in percent, inferred from the source image, with the algorithm);
- row 12, *Qualitative Evaluations* (UMLS C0034375): the image-level finding, Fracture (SCT 72704001) =
  Present (SCT 52101004) / Absent (SCT 2667000).

Why this shape (issue 15): OHIF v3 (3.13) reads spatial coordinates for every measurement it makes of
the *Imaging Measurements* groups (grouped by tracking UID) and fails on one without a region; it also
fails on a report with no measurement at all. So every report carries one region, and the numbers sit
in a TID 1501 group that shares the region's tracking UID (the standard's way of saying "same
finding"), which OHIF merges with the region. Before the user tracks the report, OHIF labels the region
with one line per NUM of the merged groups, ``"<concept name meaning>: <value>.toFixed(2) <unit code>"``
(extension cornerstone-dicom-sr, ``_getLabelFromMeasuredValueSequence``), and with nothing else of the
groups (the finding type, the qualitative evaluation and the tracking identifier only show after
tracking). Hence the concept name "Fracture probability": OHIF prints "Fracture probability: 86.40 %"
and "Threshold Value: 42.00 %" (two decimals are OHIF's format; the DS it formats is rounded to one).
OHIF puts that label right of the region, vertically centred, without keeping it on screen
(``getTextBoxCoordsCanvas`` is called without the element): a whole-image region has its label beyond
the image's right edge, off screen when the image fills the viewport's width (landscape) and clipped
at 1600x1000 even for a square image. So a negative report names the heat map's hottest region too
(Fracture = Absent there, as on the whole image; the SC shows the same hot spot), and the whole image
is left for a result without a heat map. The region group holds no NUM because TID 1419 does not let its measurements
point at coordinates, and OHIF takes a group's first NUM as the geometry when the user tracks the
report; without one it takes the region (111030 POLYLINE, 5 points: a rectangle annotation). The
report-level rows 10 and 12 hold the image-level result for readers that do not look into groups.
dciodvfy reports no error on either shape; its only warnings are that it does not know the local coding
scheme ``99PACSAI`` (PS3.16 8.2 lets 99-prefixed private schemes be used; the SR declares it in its
Coding Scheme Identification Sequence).

``read_finding`` reads such a report back (also the earlier layout: one image-level TID 1501 group with
unit "1"); used by tests and the end-to-end check.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
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
    "FRACTURE_PROBABILITY",
    "HEAT_PEAK_TRACKING",
    "IMAGE_TRACKING",
    "LOCAL_SCHEME",
    "PERCENT",
    "PRESENT",
    "PROBABILITY",
    "REGION_TRACKING",
    "SERIES_DESCRIPTION",
    "SERIES_TITLE",
    "THRESHOLD",
    "SrFinding",
    "build_structured_report",
    "coding_scheme_identification",
    "image_finding_groups",
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
PERCENT = Code("%", "UCUM", "percent")
NO_UNITS = codes.UCUM.NoUnits
IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
DERIVED_IMAGING_MEASUREMENTS = Code("126011", "DCM", "Derived Imaging Measurements")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
REGION_TRACKING = "AI fracture: suspected region"
"""Tracking identifier of a region where a fracture is suspected (the heat map's hottest region)."""
HEAT_PEAK_TRACKING = "AI fracture: strongest evidence, not suspected"
"""Tracking identifier of the heat map's hottest region when no fracture is suspected."""
LOCAL_SCHEME = "99PACSAI"
"""pacs-ai's local coding scheme (PS3.16 8.2: private schemes start with 99), declared in the SR's
Coding Scheme Identification Sequence."""
FRACTURE_PROBABILITY = Code("FX-PROBABILITY", LOCAL_SCHEME, "Fracture probability")
"""The calibrated P(fracture) of a finding, in the TID 1501 group (a TID 300 measurement name; the
report-level row 10 keeps DCM 122157 Probability)."""
IMAGE_TRACKING = "AI fracture classification: whole image"
"""Tracking identifier when the region reported is the whole image (no fracture, or not localised)."""


def algorithm_identification(model: ModelInfo, threshold: float, rule: str | None = None) -> hd.sr.AlgorithmIdentification:
    """The model as TID 4019 Algorithm Identification: parameters ``threshold=``, ``study_rule=`` (a study
    SR's rule, when given) and ``architecture=`` (when known)."""
    params = [f"threshold={threshold:.6g}"] + ([f"study_rule={rule}"] if rule else [])
    if model.architecture:
        params.append(f"architecture={model.architecture}")
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64], version=model.version[:64], parameters=params, manufacturer=MANUFACTURER
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


def _container(name: Code, items: Sequence[Any], template_id: str | None = None) -> hd.sr.ContainerContentItem:
    item = hd.sr.ContainerContentItem(
        name=name, template_id=template_id,
        relationship_type=None if template_id == "1500" else hd.sr.RelationshipTypeValues.CONTAINS,
    )
    item.ContentSequence = hd.sr.ContentSequence()
    for entry in items:
        item.ContentSequence.extend(entry if isinstance(entry, (list, hd.sr.ContentSequence)) else [entry])
    return item


def _measurement_report(
    *,
    observer: hd.sr.ObservationContext,
    library_entry: pydicom.Dataset | Sequence[pydicom.Dataset],
    derived: Sequence[hd.sr.Measurement],
    evaluations: Sequence[hd.sr.QualitativeEvaluation],
    regions: Sequence[Any],
) -> hd.sr.ContainerContentItem:
    """The TID 1500 root: rows 1-5, then 6 (the region groups), 10 and 12.

    highdicom's ``MeasurementReport`` writes row 6 only (and requires it), so the root is put together
    here from highdicom's content items, in the order of the template's rows.
    """
    procedure = hd.sr.CodeContentItem(
        name=codes.DCM.ProcedureReported, value=PROCEDURE, relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD
    )
    items: list[Any] = [
        hd.sr.LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE),
        observer,
        procedure,
        hd.sr.ImageLibrary([library_entry] if isinstance(library_entry, pydicom.Dataset) else list(library_entry)),
    ]
    if regions:
        items.append(_container(IMAGING_MEASUREMENTS, regions))
    items.append(_container(DERIVED_IMAGING_MEASUREMENTS, derived))
    items.append(_container(QUALITATIVE_EVALUATIONS, evaluations))
    return _container(IMAGING_MEASUREMENT_REPORT, items, template_id="1500")


def _shown_measurement(name: Code, percent: float) -> hd.sr.Measurement:
    """A NUM in percent whose Numeric Value (DS, what viewers print) is rounded to one decimal; the exact
    value stays in its Floating Point Value (FD, PS3.3 C.18.1), which highdicom and ``read_finding`` read."""
    measurement = hd.sr.Measurement(name=name, value=float(percent), unit=PERCENT)
    measured = measurement[0].MeasuredValueSequence[0]
    measured.NumericValue = pydicom.valuerep.DSfloat(f"{float(percent):.1f}")
    measured.FloatingPointValue = float(percent)
    return measurement


def coding_scheme_identification() -> pydicom.Dataset:
    """The Coding Scheme Identification Sequence item declaring ``LOCAL_SCHEME`` (SOP Common Module)."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "pacs-ai local codes"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


def image_finding_groups(
    header: pydicom.Dataset,
    model: ModelInfo,
    algorithm: hd.sr.AlgorithmIdentification,
    *,
    probability: float,
    threshold: float,
    fractured: bool,
    roi: Sequence[float] | None,
) -> list[Any]:
    """The two row-6 groups of one image's finding, linked by one tracking UID (module docstring).

    ``header``: the source image as returned by ``source_header``. ``roi`` (x0, y0, x1, y1, source
    pixels, end exclusive): the heat map's hottest region, the suspected region when ``fractured``, else
    the region of the strongest sub-threshold evidence; None: the whole image. Used by the image SR and,
    once per image, by the study SR (``pacs_ai.studies.report``); an SR using them declares
    ``LOCAL_SCHEME`` (``coding_scheme_identification``).
    """
    src_uid = str(header.SOPInstanceUID)
    finding = PRESENT if fractured else ABSENT
    # OHIF 3.13 opens a TID 1500 report only when it holds at least one region (it fails on a group
    # without one, and on a report without groups): without a heat-map region, the region the
    # classifier evaluated, the whole image, is reported.
    whole_image = (0, 0, int(header.Columns), int(header.Rows))
    region_box = tuple(roi) if roi is not None else whole_image
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_roi_polyline(region_box),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=header.SOPClassUID, referenced_sop_instance_uid=src_uid
        ),
    )
    # One finding, two groups linked by the tracking UID: the region (TID 1410, no measurements:
    # TID 1419 allows none inferred from elsewhere, and OHIF takes a group's first NUM as the
    # geometry when the user tracks it) and the probability and threshold of that finding (TID 1501).
    if roi is None:
        identifier = IMAGE_TRACKING
    else:
        identifier = REGION_TRACKING if fractured else HEAT_PEAK_TRACKING
    tracking = hd.sr.TrackingIdentifier(uid=derive_uid(src_uid, model.version, "tracking"), identifier=identifier)
    finding_type = FRACTURE if fractured else None
    regions: list[Any] = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=region,
            finding_type=finding_type,
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(FRACTURE, finding)],
        ),
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=finding_type,
            algorithm_id=algorithm,
            measurements=[
                _shown_measurement(FRACTURE_PROBABILITY, 100.0 * float(probability)),
                _shown_measurement(THRESHOLD, 100.0 * float(threshold)),
            ],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
        ),
    ]
    return regions


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
    """Build the SR of one classification of ``source`` (layout in the module docstring).

    ``roi`` (x0, y0, x1, y1 in source pixels, end exclusive) is the heat map's hottest region: the
    suspected region when ``fractured``, the strongest sub-threshold evidence otherwise; when it is None
    the region reported is the whole image.

    Tracking UIDs are derived from the source SOP Instance UID and the model version (deterministic).
    Raises DicomWriteError when highdicom refuses the inputs.
    """
    header = source_header(source)
    numbering = number_results(source, "", SERIES_TITLE)
    series_number = series_number if series_number is not None else numbering.sr_series_number
    instance_number = instance_number if instance_number is not None else numbering.instance_number
    series_description = series_description or numbering.sr_series_description
    try:
        algorithm = algorithm_identification(model, threshold)
        regions = image_finding_groups(
            header, model, algorithm, probability=probability, threshold=threshold, fractured=fractured, roi=roi
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise DicomWriteError(f"cannot build the Structured Report: {exc}") from exc
    return fracture_report(
        [header],
        model,
        algorithm,
        probability=probability,
        threshold=threshold,
        fractured=fractured,
        regions=regions,
        patient_source=source,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        series_description=series_description,
        purpose="AI fracture classification",
        what="Structured Report",
    )


def fracture_report(
    headers: Sequence[pydicom.Dataset],
    model: ModelInfo,
    algorithm: hd.sr.AlgorithmIdentification,
    *,
    probability: float,
    threshold: float,
    fractured: bool,
    regions: Sequence[Any],
    patient_source: pydicom.Dataset,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    series_description: str,
    purpose: str,
    what: str,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR both the image SR and the study SR are (layout in the module docstring).

    ``headers``: the source images as returned by ``source_header`` (the evidence and the image library,
    in order); ``regions``: the row-6 groups (``image_finding_groups`` of each image); ``probability`` and
    ``threshold`` (0-1) go to row 10 in percent, referencing every header, ``fractured`` to row 12;
    ``patient_source``: the dataset whose Patient/Study modules (and character set) are copied;
    ``purpose``: the Contributing Equipment's purpose; ``what`` names the object in errors.
    Raises DicomWriteError when highdicom refuses the inputs.
    """
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
        references = [hd.sr.SourceImageForMeasurement.from_source_image(h) for h in headers]
        derived = [
            hd.sr.Measurement(
                name=name, value=100.0 * float(value), unit=PERCENT, algorithm_id=algorithm,
                referenced_images=references,
            )
            for name, value in ((PROBABILITY, probability), (THRESHOLD, threshold))
        ]
        report = _measurement_report(
            observer=hd.sr.ObservationContext(observer_device_context=observer),
            library_entry=[_library_entry(h) for h in headers],
            derived=derived,
            evaluations=[hd.sr.QualitativeEvaluation(FRACTURE, PRESENT if fractured else ABSENT)],
            regions=regions,
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=list(headers),
            content=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[contributing_equipment(model, purpose)],
            series_description=series_description,
            manufacturer_model_name=model.model_name_lo,
            software_versions=model.software_versions,
            # the source's character set is copied below with its text (header.py)
            specific_character_set=None,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise DicomWriteError(f"cannot build the {what}: {exc}") from exc
    copy_patient_study(patient_source, sr, what=what)
    sr.CodingSchemeIdentificationSequence = [coding_scheme_identification()]  # the groups' local code
    # Series Date/Time (Type 3): the report's creation time; viewers list series by it (Orthanc Explorer
    # files a series without one under "?").
    sr.SeriesDate = sr.ContentDate
    sr.SeriesTime = sr.ContentTime
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
    """The suspected region (None: no fracture suspected, or not localised)."""
    source_sop_instance_uid: str | None
    region: tuple[float, float, float, float] | None = None
    """The region reported, suspected or not (None: the whole image)."""


_TRACKING_IDENTIFIER = ("112039", "DCM")


def _walk(items: Any, tracking: str | None = None) -> Iterator[tuple[Any, str | None]]:
    """(item, tracking identifier text of the measurement group it is in, or None), depth first."""
    items = list(items or [])
    for item in items:
        if _code_of(item, "ConceptNameCodeSequence") == _TRACKING_IDENTIFIER and item.get("ValueType") == "TEXT":
            tracking = str(item.TextValue)
    for item in items:
        yield item, tracking
        yield from _walk(item.get("ContentSequence"), tracking)


def _code_of(item: Any, attr: str) -> tuple[str, str] | None:
    seq = item.get(attr)
    if not seq:
        return None
    return str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)


def read_finding(sr: pydicom.Dataset) -> SrFinding:
    """Read the finding back from an SR (a plain pydicom dataset is enough: no highdicom parsing needed).

    Probability (DCM 122157 or ``FRACTURE_PROBABILITY``, the first found) and threshold come back as
    fractions (0-1) whether written in percent or with unit "1", from a NUM's Floating Point Value when it
    has one (else its Numeric Value); ``roi`` is the suspected region (None when none is reported),
    ``region`` the region reported (None when it is the whole image).
    Raises ValueError when the SR holds no Fracture evaluation or no Probability measurement.
    """
    fractured: bool | None = None
    probability: float | None = None
    threshold: float | None = None
    name = version = None
    roi = region = None
    source_uid = None
    probability_codes = {(c.value, c.scheme_designator) for c in (PROBABILITY, FRACTURE_PROBABILITY)}
    for item, tracking in _walk(sr.get("ContentSequence")):
        concept = _code_of(item, "ConceptNameCodeSequence")
        vt = item.get("ValueType")
        if vt == "CODE" and concept == (FRACTURE.value, FRACTURE.scheme_designator) and fractured is None:
            fractured = _code_of(item, "ConceptCodeSequence") == (PRESENT.value, PRESENT.scheme_designator)
        elif vt == "NUM" and concept is not None:
            measured = item.MeasuredValueSequence[0]
            value = float(measured.get("FloatingPointValue", measured.NumericValue))
            if _code_of(measured, "MeasurementUnitsCodeSequence") == (PERCENT.value, PERCENT.scheme_designator):
                value /= 100.0
            if concept in probability_codes and probability is None:
                probability = value
            elif concept == (THRESHOLD.value, THRESHOLD.scheme_designator) and threshold is None:
                threshold = value
        elif vt == "TEXT" and concept == ("111001", "DCM"):
            name = name or str(item.TextValue)
        elif vt == "TEXT" and concept == ("111003", "DCM"):
            version = version or str(item.TextValue)
        elif vt == "SCOORD" and region is None and tracking != IMAGE_TRACKING:
            pts = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
            region = (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))
            roi = None if tracking == HEAT_PEAK_TRACKING else region
        elif vt == "IMAGE" and source_uid is None:
            source_uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    if fractured is None or probability is None:
        raise ValueError("not a pacs-ai fracture report: no Fracture evaluation or Probability measurement")
    return SrFinding(fractured, probability, threshold, name, version, roi, source_uid, region)
