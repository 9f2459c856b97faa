"""The Secondary Capture: the heat-map picture as an RGB image in the source image's study.

Same Patient and Study as the source (every patient/study attribute copied as received, what cannot be
encoded blanked or removed: see header.py), a new Series per source image (number and description naming
the source: see numbering.py; ``SERIES_TITLE``), ImageType DERIVED\\SECONDARY, BurnedInAnnotation YES,
Referenced/Source Image Sequences pointing at the source, and pacs-ai as contributing equipment
(purpose "Processing Algorithm"). Explicit VR Little Endian, 8-bit RGB. Modality is the source's (not
OT, which OHIF plays as cine); Series Date/Time are the creation time (Orthanc Explorer groups by them).
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

import pacs_ai
from pacs_ai.errors import DicomWriteError
from pacs_ai.write.common import (
    MANUFACTURER,
    ModelInfo,
    contributing_equipment,
    copy_patient_study,
)
from pacs_ai.write.numbering import WARNING, number_results

__all__ = ["SERIES_DESCRIPTION", "SERIES_TITLE", "build_secondary_capture", "result_modality"]

SERIES_TITLE = "AI Fracture Heatmap"
SERIES_DESCRIPTION = f"{SERIES_TITLE} - {WARNING}"
"""The description without a source label (the writer adds the source: numbering.py)."""
SERIES_ATTRIBUTES = ("BodyPartExamined", "Laterality")
"""General Series attributes copied from the source (as the patient/study ones: header.py)."""
DERIVATION = "Grad-CAM heat map of an AI fracture classifier blended over the source image; burned-in text"

_BIPED = {"A", "P", "R", "L", "H", "F"}


def _orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation (row, column) when it is two valid biped values, else None."""
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, column = (str(v) for v in value)
    if row and column and set(row) <= _BIPED and set(column) <= _BIPED:
        return row, column
    return None


_CINE_MODALITIES = ("OT", "US")
"""Modalities some viewers play as cine (OHIF 3 auto-plays OT and US): never given to the SC."""
_FALLBACK_MODALITY = "DX"


def result_modality(source: pydicom.Dataset) -> str:
    """The SC's Modality: the source's (CR, DX, ...), so the picture files with the radiograph it shows in
    modality filters and hanging protocols; DX when the source has none or one viewers play as cine."""
    modality = str(source.get("Modality", "") or "").strip().upper()
    return modality if modality and modality not in _CINE_MODALITIES else _FALLBACK_MODALITY


def _reference(source: pydicom.Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def build_secondary_capture(
    source: pydicom.Dataset,
    rgb: np.ndarray,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int | None = None,
    instance_number: int | None = None,
    series_description: str | None = None,
) -> hd.sc.SCImage:
    """Build the SC image of ``rgb`` (uint8 (H, W, 3)) in the study of ``source``.

    Series/Instance Number and Series Description default to the per-source ones of
    ``numbering.number_results``. Header values of the source never make it fail (header.py).
    Raises DicomWriteError when highdicom refuses the inputs.
    """
    numbering = number_results(source, SERIES_TITLE, "")
    series_number = series_number if series_number is not None else numbering.sc_series_number
    instance_number = instance_number if instance_number is not None else numbering.instance_number
    series_description = series_description or numbering.sc_series_description
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DicomWriteError(f"the SC picture must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    orientation = _orientation(source)
    try:
        sc = hd.sc.SCImage(
            pixel_array=np.ascontiguousarray(rgb),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=source.StudyInstanceUID,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            # Patient/study values are copied below as received: highdicom would refuse some field values.
            patient_id=None,
            patient_name=None,
            patient_birth_date=None,
            patient_sex=None,
            accession_number=None,
            study_id=None,
            study_date=None,
            study_time=None,
            referring_physician_name=None,
            patient_orientation=orientation if orientation else ("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[contributing_equipment(model, "Grad-CAM heat map overlay")],
            series_description=series_description,
            manufacturer_model_name=model.model_name_lo,
            software_versions=model.software_versions,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise DicomWriteError(f"cannot build the Secondary Capture: {exc}") from exc

    # Every patient/study attribute of the source, not only those highdicom knows.
    copy_patient_study(source, sc, extra=SERIES_ATTRIBUTES, what="Secondary Capture")
    # Type 2C: empty when unknown. pydicom writes None as an empty value; its typed attributes omit None.
    sc.PatientOrientation = list(orientation) if orientation else None  # type: ignore[assignment]

    now = datetime.datetime.now(datetime.UTC).astimezone()
    sc.SeriesDate = DA(now.strftime("%Y%m%d"))
    sc.SeriesTime = TM(now.strftime("%H%M%S"))
    sc.ContentDate = sc.SeriesDate
    sc.ContentTime = sc.SeriesTime
    sc.InstanceCreationDate = sc.SeriesDate
    sc.InstanceCreationTime = sc.SeriesTime
    if sc.get("BodyPartExamined") and "Laterality" not in sc:
        # Laterality is Type 2C (required, possibly empty) for paired body parts.
        sc.Laterality = None  # type: ignore[assignment]  # empty value, as above

    sc.Modality = result_modality(source)
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    sc.BurnedInAnnotation = "YES"
    sc.LossyImageCompression = "01" if str(source.get("LossyImageCompression", "")) == "01" else "00"
    sc.DerivationDescription = DERIVATION
    sc.ImageComments = "AI result - not for diagnostic use"
    sc.ReferencedImageSequence = [_reference(source)]
    sc.SourceImageSequence = [_reference(source)]

    # SC Equipment: made on a workstation by pacs-ai.
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = model.model_name_lo
    sc.SecondaryCaptureDeviceSoftwareVersions = [f"pacs-ai {pacs_ai.__version__}", f"model {model.version}"[:64]]
    return sc
