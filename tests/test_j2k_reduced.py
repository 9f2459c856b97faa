"""Reduced-resolution JPEG 2000 decoding (pacs_ai/infer/j2k.py) and the smaller pictures it feeds.

The reference is computed independently of the code under test: pydicom's full decode (through
pylibjpeg-openjpeg, not Pillow) downscaled with OpenCV's INTER_AREA to the reduced level's size. A
wavelet level is a low-pass approximation, not an area average, so the two agree within a tolerance
(larger on the 8x-downscaled committed samples, whose every pixel is an edge, than on a real radiograph).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames

from pacs_ai.errors import InputError
from pacs_ai.infer.j2k import codestream_info, decode_reduced, reduction_for
from pacs_ai.infer.preprocess import InputSpec, dicom_to_gray, letterbox, prepare

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "data" / "wg04"
FULL_SIZE = REPO.parent / "shared" / "data" / "dicom" / "wg04_RG2_hip_CR" / "RG2_J2KR.dcm"


def _frame(ds: pydicom.Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _area_reference(ds: pydicom.Dataset, shape: tuple[int, ...]) -> np.ndarray:
    full = ds.pixel_array.astype(np.float32)  # pydicom + pylibjpeg-openjpeg, full resolution
    return cv2.resize(full, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("name", ["RG2_J2KR", "RG3_J2KR"])
def test_codestream_header_agrees_with_the_dicom_header(name: str) -> None:
    ds = pydicom.dcmread(SAMPLES / f"{name}.dcm")
    info = codestream_info(_frame(ds))
    assert info is not None
    assert (info.width, info.height, info.components) == (ds.Columns, ds.Rows, 1)
    assert info.precision == ds.BitsStored and not info.signed
    assert 1 <= info.levels <= 32
    assert codestream_info(b"\x00\x01not a codestream") is None


def test_reduction_level_keeps_at_least_the_side_asked_for() -> None:
    assert reduction_for(2140, 5, 1024) == 1  # 1070 >= 1024 > 535
    assert reduction_for(2140, 5, 1070) == 1
    assert reduction_for(2140, 5, 1071) == 0
    assert reduction_for(2140, 5, 500) == 2  # 535
    assert reduction_for(4000, 5, 1024) == 1  # 2000; 1000 would be too small
    assert reduction_for(4096, 5, 1024) == 2
    assert reduction_for(4096, 1, 100) == 1  # never more than the codestream's levels
    assert reduction_for(800, 5, 1024) == 0


@pytest.mark.parametrize("name", ["RG2_J2KR", "RG3_J2KR"])
@pytest.mark.parametrize("min_side", [100, 60])
def test_reduced_decode_is_the_full_decode_downscaled(name: str, min_side: int) -> None:
    ds = pydicom.dcmread(SAMPLES / f"{name}.dcm")
    reduced = decode_reduced(ds, min_side)
    assert reduced is not None
    r = reduction_for(max(ds.Rows, ds.Columns), codestream_info(_frame(ds)).levels, min_side)  # type: ignore[union-attr]
    assert r >= 1
    assert reduced.shape == (-(-ds.Rows // 2**r), -(-ds.Columns // 2**r))
    assert max(reduced.shape) >= min_side
    assert reduced.dtype == ds.pixel_array.dtype
    assert reduced.max() < 2**ds.BitsStored
    reference = _area_reference(ds, reduced.shape)
    value_range = float(np.ptp(ds.pixel_array))
    diff = np.abs(reference - reduced) / value_range
    assert diff.mean() < 0.025, diff.mean()
    assert np.percentile(diff, 90) < 0.06, np.percentile(diff, 90)


@pytest.mark.skipif(not FULL_SIZE.is_file(), reason=f"{FULL_SIZE} (the full-size WG-04 hip of ../shared) is absent")
def test_full_size_hip_reduced_decode_and_model_input_match_the_full_decode() -> None:
    ds = pydicom.dcmread(FULL_SIZE)
    reduced = decode_reduced(ds, 1024)
    assert reduced is not None and reduced.shape == (1070, 880)
    reference = _area_reference(ds, reduced.shape)
    diff = np.abs(reference - reduced) / float(np.ptp(ds.pixel_array))
    assert diff.mean() < 0.005 and np.percentile(diff, 99) < 0.03, (diff.mean(), np.percentile(diff, 99))
    # The model's input: letterboxed from the reduced decode vs from the full decode.
    spec = InputSpec(size=192)
    fast, geom_fast = letterbox(dicom_to_gray(ds, min_long_side=1024), spec, source_size=(ds.Rows, ds.Columns))
    full, geom_full = letterbox(dicom_to_gray(ds), spec)
    assert geom_fast == geom_full
    grey_diff = np.abs(fast.astype(int) - full.astype(int))
    assert grey_diff.mean() < 2.0 and np.percentile(grey_diff, 99) < 12, (grey_diff.mean(), np.percentile(grey_diff, 99))


def test_gray_image_and_display_picture_from_a_reduced_decode() -> None:
    ds = pydicom.dcmread(SAMPLES / "RG2_J2KR.dcm")
    gray = dicom_to_gray(ds, min_long_side=100)
    full = dicom_to_gray(ds)
    assert gray.shape == (134, 110) and full.shape == (267, 220)
    reference = cv2.resize(full, (110, 134), interpolation=cv2.INTER_AREA)
    assert np.abs(reference - gray).mean() < 0.02
    spec = InputSpec(size=64)
    fast = prepare(gray, spec, source_size=(267, 220), display_max_side=120)
    slow = prepare(full, spec)
    assert fast.geometry == slow.geometry  # maps heat maps onto the original pixels, as before
    # the display is the picture's size computed from the original: long side 120
    assert fast.display.shape == (120, round(220 * 120 / 267)) and fast.display.dtype == np.uint8
    picture = cv2.resize(slow.display, (fast.display.shape[1], fast.display.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(picture.astype(int) - fast.display.astype(int)).mean() < 6


def test_other_syntaxes_and_damaged_codestreams_fall_back_to_the_full_decode() -> None:
    unc = pydicom.dcmread(SAMPLES / "RG2_UNC.dcm")
    assert decode_reduced(unc, 60) is None
    assert dicom_to_gray(unc, min_long_side=60).shape == (unc.Rows, unc.Columns)
    small = pydicom.dcmread(SAMPLES / "RG2_J2KR.dcm")
    assert decode_reduced(small, 1024) is None  # nothing to skip: decoded in full
    signed = pydicom.dcmread(SAMPLES / "RG2_J2KR.dcm")
    signed.PixelRepresentation = 1
    assert decode_reduced(signed, 60) is None
    damaged = pydicom.dcmread(SAMPLES / "RG2_J2KR.dcm")
    frame = _frame(damaged)
    damaged.PixelData = encapsulate([frame[: len(frame) * 3 // 10]])
    assert decode_reduced(damaged, 60) is None
    with pytest.raises(InputError) as err:
        dicom_to_gray(damaged, min_long_side=60)
    assert err.value.reason == "undecodable_pixel_data"


def test_sc_picture_and_sr_region_of_a_large_image_from_a_small_display(tmp_path: Path) -> None:
    """A 2140x1760 source kept as a 1024 px display: the SC is the 1024 px picture, and the SR's region
    (found on the picture's grid) is the analytic 0.5-level box of a Gaussian heat map, in source pixels."""
    from dataclasses import replace

    from pacs_ai.infer.preprocess import Geometry, Prepared
    from pacs_ai.write.overlay import SC_MAX_SIDE
    from pacs_ai.write.results import write_results
    from pacs_ai.write.structured_report import read_finding
    from support.predictions import synthetic_prediction

    rows, cols, size = 1760, 2140, 192
    src = pydicom.dcmread(SAMPLES / "RG2_UNC.dcm")
    src.Rows, src.Columns = rows, cols
    geometry = Geometry.for_image(rows, cols, size)
    display = np.full((round(rows * SC_MAX_SIDE / cols), SC_MAX_SIDE), 90, np.uint8)
    prepared = Prepared(tensor=None, display=display, geometry=geometry)  # type: ignore[arg-type]
    cx, cy, sigma = 120.0, 80.0, 10.0  # network-grid pixels
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cam = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)).astype(np.float32)
    prediction = replace(synthetic_prediction("densenet121", True), cam=cam)
    out = write_results(src, prepared, prediction, tmp_path).files
    sc = pydicom.dcmread(out.sc)
    assert (sc.Rows, sc.Columns) == display.shape
    # Heat >= 0.5 of the peak: a disc of radius sigma * sqrt(2 ln 2) around the centre, in network pixels.
    half = sigma * np.sqrt(2 * np.log(2))
    expected = [
        (cx - half - geometry.pad_left) / geometry.scale, (cy - half - geometry.pad_top) / geometry.scale,
        (cx + half - geometry.pad_left) / geometry.scale, (cy + half - geometry.pad_top) / geometry.scale,
    ]
    tolerance = 1 / geometry.scale  # resampling the map (pixel centres): within one network pixel
    assert out.roi is not None and all(abs(a - b) <= tolerance for a, b in zip(out.roi, expected, strict=True)), (out.roi, expected)
    finding = read_finding(pydicom.dcmread(out.sr))
    assert finding.roi == pytest.approx(tuple(out.roi))


@pytest.mark.parametrize(("bits", "allocated"), [(8, 8), (12, 16), (16, 16)])
def test_reduced_decode_gives_stored_values_at_every_bit_depth(bits: int, allocated: int) -> None:
    """Pillow scales samples to its mode's depth; the values handed back are the stored values again."""
    import io

    from pydicom.uid import JPEG2000Lossless

    from pacs_ai.daemon.warmup import synthetic_radiograph

    ds = synthetic_radiograph(300, 260)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits, bits - 1
    y, x = np.mgrid[0:300, 0:260]
    pixels = (np.sin(x / 17.0) * np.cos(y / 23.0) + 1) / 2 * (2**bits - 1)
    ds.PixelData = pixels.astype(np.uint8 if allocated == 8 else np.uint16).tobytes()
    ds.compress(JPEG2000Lossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    reduced = decode_reduced(ds, 100)
    assert reduced is not None and reduced.shape == (150, 130) and reduced.dtype == ds.pixel_array.dtype
    reference = _area_reference(ds, reduced.shape)
    assert np.abs(reference - reduced).mean() / float(np.ptp(ds.pixel_array)) < 0.02
    assert reduced.max() <= 2**bits - 1 and reduced.max() > 0.9 * (2**bits - 1)
