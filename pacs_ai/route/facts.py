"""What routing decides on: a few header attributes of one image, read before any pixel is decoded.

``ImageFacts.from_dataset(ds, calling_aet)`` reads Modality, SOP Class UID, Body Part Examined (resolved
by :mod:`pacs_ai.route.body_part`), View Position, laterality (Image Laterality, else Laterality),
Series Description, Protocol Name and the patient's age in years (Patient's Age, else the Patient's
Birth Date against the Study/Series/Acquisition Date). Missing or malformed values are None, never an
error: routing must decide on every image the listener took.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

import pydicom

from pacs_ai.route.body_part import BodyPart, resolve_body_part

__all__ = ["ImageFacts", "patient_age_years"]

_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element reads as missing
        return None
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _date(text: str | None) -> date | None:
    if not text or not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def patient_age_years(ds: pydicom.Dataset) -> tuple[float | None, str | None]:
    """(age in years, where it came from) or (None, None) when the header does not tell.

    Patient's Age (0010,1010, ``nnnD/W/M/Y``) first; else Patient's Birth Date against the first of Study,
    Series, Acquisition and Content Date.
    """
    age = _text(ds, "PatientAge")
    if age:
        m = _AGE.match(age)
        if m:
            return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()], "PatientAge"
    born = _date(_text(ds, "PatientBirthDate"))
    if born is None:
        return None, None
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        when = _date(_text(ds, keyword))
        if when is not None and when >= born:
            return (when - born).days / 365.25, f"PatientBirthDate and {keyword}"
    return None, None


@dataclass(frozen=True)
class ImageFacts:
    """The header values routing rules test; None where the header has no usable value."""

    modality: str | None
    sop_class_uid: str | None
    body_part: BodyPart
    view_position: str | None
    laterality: str | None
    calling_aet: str | None
    series_description: str | None
    protocol_name: str | None
    age_years: float | None
    age_source: str | None

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset, calling_aet: str | None = None) -> ImageFacts:
        age, age_source = patient_age_years(ds)
        modality = _text(ds, "Modality")
        view = _text(ds, "ViewPosition")
        laterality = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
        return cls(
            modality=modality.upper() if modality else None,
            sop_class_uid=_text(ds, "SOPClassUID"),
            body_part=resolve_body_part(ds),
            view_position=view.upper() if view else None,
            laterality=laterality.upper() if laterality else None,
            calling_aet=(calling_aet or "").strip() or None,
            series_description=_text(ds, "SeriesDescription"),
            protocol_name=_text(ds, "ProtocolName"),
            age_years=age,
            age_source=age_source,
        )
