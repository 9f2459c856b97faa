"""Header variants of the committed CR samples for routing tests (a chest film, a child's hand, ...).

Routing reads headers only, so a real CR whose header says CHEST is what a router forwarding a chest
radiograph sends, as far as pacs-ai's decision is concerned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "cr_hip_mono2_small.dcm"


def variant(folder: Path, name: str, *, study_uid: str | None = None, **attributes: Any) -> Path:
    """A copy of the hip sample with new Series/SOP UIDs, ``attributes`` set (None deletes one)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(SAMPLE)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def chest(folder: Path, **extra: Any) -> Path:
    """A chest PA radiograph (Body Part Examined CHEST, Study Description "XR CHEST PA")."""
    return variant(folder, "chest", BodyPartExamined="CHEST", StudyDescription="XR CHEST PA", ViewPosition="PA", **extra)
