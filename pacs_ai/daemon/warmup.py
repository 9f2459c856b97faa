"""Warm the worker up before it claims its first job: model, pixel codecs and result writers.

The first image after start would otherwise pay for everything that is loaded or initialised lazily:
the first forward pass (oneDNN primitives, memory pools), the Grad-CAM hooks' first backward, pydicom's
decoder plugins (pylibjpeg-openjpeg, pylibjpeg-rle, Pillow's JPEG 2000 plugin for reduced-resolution
decoding), highdicom's SR templates, OpenCV's
colour maps and fonts, PNG encoding. ``warm_up`` runs one small synthetic radiograph through exactly
the path a job takes (``dicom_to_gray`` for each transfer syntax an encoder is installed for, then
``prepare``, ``engine.predict`` and the result writer into a temporary folder that is removed again).
The daemon hands the writer's part to the worker's writer thread (``background``), so the first job is
claimed once the model and the codecs are warm, and is decoded and classified while the writer warms up.

Nothing it does can fail start-up: a step that fails is logged and skipped (the job that needs it will
report the real error).
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from pacs_ai.infer.preprocess import dicom_to_gray, prepare

__all__ = ["synthetic_radiograph", "warm_up"]

log = logging.getLogger(__name__)

CR_IMAGE_STORAGE = ComputedRadiographyImageStorage
WARM_SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless)


def synthetic_radiograph(rows: int = 96, columns: int = 80) -> Dataset:
    """A small 12-bit MONOCHROME2 CR image (a smooth gradient with a bright band), Explicit VR LE."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "WARM^UP", "WARMUP", "", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20000101", "000000", "", "1"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "CR", 1, 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    y, x = np.mgrid[0:rows, 0:columns]
    pixels = (x * 40 + y * 10) % 4096
    pixels[rows // 3 : rows // 2, :] = 3800
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def _round_trip(ds: Dataset, syntax: str) -> Dataset:
    """``ds`` encoded in ``syntax`` and read back from bytes (as the worker reads a spooled file)."""
    copy = pydicom.dcmread(io.BytesIO(_encode(ds)))
    if syntax != ExplicitVRLittleEndian:
        copy.compress(syntax)
    return pydicom.dcmread(io.BytesIO(_encode(copy)))


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def warm_up(
    engine: Any,
    writer: Any,
    scratch_dir: Path,
    background: Callable[[Callable[[], None]], None] | None = None,
) -> dict[str, float]:
    """Run one synthetic image through decode, preprocess, model and writer; returns seconds per step.

    ``background``: when given (the worker's ``warm_writer``), the result writer's warm-up is handed to it
    instead of run here: the writer thread warms up while the first job is claimed, decoded and put
    through the model, and that job's results are written after it (``writer`` is then absent from the
    timings).
    """
    timings: dict[str, float] = {}
    source = synthetic_radiograph()
    gray = None
    t = time.perf_counter()
    for syntax in WARM_SYNTAXES:
        try:
            encoded = _round_trip(source, syntax)
            gray = dicom_to_gray(encoded)
            if syntax == JPEG2000Lossless:  # the reduced-resolution decoder (Pillow's JPEG 2000 plugin)
                dicom_to_gray(encoded, min_long_side=max(source.Rows, source.Columns) // 2)
        except Exception as exc:  # noqa: BLE001 - no encoder for it here, or a decoder problem
            log.debug("warm-up: %s skipped: %s", getattr(syntax, "name", syntax), exc)
    timings["codecs"] = time.perf_counter() - t
    if gray is None:
        return timings
    try:
        t = time.perf_counter()
        prepared = prepare(gray, engine.spec)
        prediction = engine.predict([prepared])[0]
        timings["model"] = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - the first real job will report the problem
        log.warning("warm-up of the model failed: %s: %s", type(exc).__name__, exc)
        return timings

    def warm_writer() -> float:
        folder = Path(tempfile.mkdtemp(prefix=".warm-up-", dir=scratch_dir))
        t = time.perf_counter()
        try:
            writer(source, prepared, prediction, folder)
        except Exception as exc:  # noqa: BLE001 - the first real job will report the problem
            log.warning("warm-up of the result writer failed: %s: %s", type(exc).__name__, exc)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return time.perf_counter() - t

    if background is None:
        timings["writer"] = warm_writer()
    else:
        background(lambda: log.info("result writer warmed up in %.2f s", warm_writer()))
    return timings
