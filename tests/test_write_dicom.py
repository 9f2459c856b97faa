"""The result objects: Secondary Capture + TID 1500 Structured Report, validated by dciodvfy and dcmdump.

Runs ``write_results`` on the committed samples in ``tests/data`` (real WG-04 radiographs made small: a
MONOCHROME2 hip and a MONOCHROME1 tibia, uncompressed and, from tests/data/wg04, JPEG 2000 and JPEG-LS), once per architecture name, with a
synthetic heat map (the writer does not care where the map comes from), and checks every object with
``dciodvfy`` (no "Error" line), ``dcmdump`` and a read-back of its content.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest

from pacs_ai.errors import DicomWriteError
from pacs_ai.infer.engine import Prediction
from pacs_ai.infer.preprocess import InputSpec, dicom_to_gray, prepare
from pacs_ai.write.overlay import Caption, hottest_region, normalise_heat, render_result_image
from pacs_ai.write.results import write_results
from pacs_ai.write.structured_report import read_finding
from pacs_ai.write.uids import derive_uid
from support.common import WG04_SMALL, expected_result_uid
from support.predictions import synthetic_prediction

REPO = Path(__file__).resolve().parents[1]
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_3D_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
ARCHITECTURES = ("resnet50", "vgg16", "densenet121")

def _sources() -> list[Any]:
    found: list[Any] = []
    for name in ("RG2_J2KR.dcm", "RG3_JLSL.dcm"):  # compressed sources: the results are still uncompressed
        found.append(pytest.param(WG04_SMALL / name, id=f"wg04-{Path(name).stem}"))
    for path in sorted((REPO / "tests" / "data").glob("*.dcm")):  # field_cases/ have their own tests
        found.append(pytest.param(path, id=f"sample-{path.stem}"))
    return found


SOURCES = _sources()


_PREPARED: dict[Path, tuple[pydicom.Dataset, Any]] = {}


def _load(path: Path) -> tuple[pydicom.Dataset, Any]:
    """Decode each source once per test session (decoding a 2140x1760 image costs about half a second)."""
    if path not in _PREPARED:
        ds = pydicom.dcmread(path)
        prepared = prepare(dicom_to_gray(ds), InputSpec())
        _PREPARED[path] = (ds, prepared)
    return _PREPARED[path]


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _dcmdump_ok(path: Path) -> None:
    out = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "E: " not in out.stderr, out.stderr


needs_dicom3tools = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
needs_dcmtk = pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmdump (dcmtk) not installed")


# ----------------------------------------------------------------------------------------------------
# The full objects, per architecture and source
# ----------------------------------------------------------------------------------------------------


@needs_dicom3tools
@needs_dcmtk
@pytest.mark.parametrize("source_path", SOURCES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_results_are_valid_dicom(source_path: Path, arch: str, tmp_path: Path) -> None:
    ds, prepared = _load(source_path)
    # Every source gets both outcomes across the three architectures.
    source_index = [p.values[0] for p in SOURCES].index(source_path)
    fractured = (ARCHITECTURES.index(arch) + source_index) % 2 == 0
    prediction = synthetic_prediction(arch, fractured)
    out = write_results(ds, prepared, prediction, tmp_path / "r").files

    sc_path, sr_path = Path(out.sc), Path(out.sr)
    for path in (sc_path, sr_path):
        assert path.is_file()
        assert _dciodvfy_errors(path) == [], f"{path.name}: dciodvfy errors"
        _dcmdump_ok(path)
    assert not list((tmp_path / "r").glob(".*.tmp")), "temporary files left behind"

    sc = pydicom.dcmread(sc_path)
    sr = pydicom.dcmread(sr_path)
    # Same patient and study, new series, deterministic UIDs.
    for obj in (sc, sr):
        for keyword in ("PatientName", "PatientID", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyID",
                        "AccessionNumber", "StudyDescription", "TimezoneOffsetFromUTC"):
            if keyword in ds:
                assert obj.get(keyword) == ds.get(keyword), keyword
        assert obj.SeriesInstanceUID != ds.SeriesInstanceUID
        assert "NOT FOR DIAGNOSTIC USE" in obj.SeriesDescription
        assert obj.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        ours = [e for e in obj.ContributingEquipmentSequence if e.Manufacturer == "pacs-ai"]
        assert len(ours) == 1
        equipment = ours[0]
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
        assert equipment.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
        assert arch in equipment.ManufacturerModelName
        assert any("1.2.3" in v for v in equipment.SoftwareVersions)
    src_uid = ds.SOPInstanceUID
    assert sc.SOPInstanceUID == out.sc_sop_instance_uid == expected_result_uid(src_uid, "1.2.3", "sc")
    assert sr.SOPInstanceUID == out.sr_sop_instance_uid == expected_result_uid(src_uid, "1.2.3", "sr")
    assert sc.SeriesInstanceUID == out.sc_series_instance_uid == expected_result_uid(src_uid, "1.2.3", "sc-series")
    assert sr.SeriesInstanceUID == out.sr_series_instance_uid == expected_result_uid(src_uid, "1.2.3", "sr-series")

    # The Secondary Capture.
    assert sc.SOPClassUID == SC_CLASS
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    # Per-source series: numbering.py (99 million + a code of the source UID for the SC, 98 million for the SR).
    assert 99_000_000 <= sc.SeriesNumber < 100_000_000 and sr.SeriesNumber == sc.SeriesNumber - 1_000_000
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
    assert max(sc.Rows, sc.Columns) <= 2048
    assert abs(sc.Rows / sc.Columns - ds.Rows / ds.Columns) < 0.01, "aspect ratio changed"
    for seq in (sc.ReferencedImageSequence, sc.SourceImageSequence):
        assert seq[0].ReferencedSOPInstanceUID == src_uid
        assert seq[0].ReferencedSOPClassUID == ds.SOPClassUID

    # The Structured Report says what was decided.
    assert sr.SOPClassUID == SR_3D_CLASS
    finding = read_finding(sr)
    assert finding.fractured is fractured
    assert finding.probability == pytest.approx(prediction.probability)
    assert finding.threshold == pytest.approx(0.42)
    assert finding.algorithm_name == f"fracture-{arch}"
    assert finding.algorithm_version == "1.2.3"
    assert finding.source_sop_instance_uid == src_uid
    if fractured:
        assert out.roi is not None and finding.roi == pytest.approx(tuple(out.roi))
        x0, y0, x1, y1 = out.roi
        assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
        # The synthetic map's maximum, (0.6, 0.4) of the network input, mapped back: inside the box.
        g = prepared.geometry
        peak_x = (0.6 * g.size - g.pad_left) / g.scale
        peak_y = (0.4 * g.size - g.pad_top) / g.scale
        assert x0 <= peak_x <= x1 and y0 <= peak_y <= y1
    else:
        assert out.roi is None and finding.roi is None

    png = cv2.imread(str(out.overlay), cv2.IMREAD_COLOR)
    assert png is not None and max(png.shape[:2]) <= 1024
    assert abs(png.shape[0] / png.shape[1] - sc.Rows / sc.Columns) < 0.01


@pytest.mark.parametrize("fractured", [True, False], ids=["positive", "negative"])
def test_highdicom_reads_the_report_and_its_one_region(fractured: bool, tmp_path: Path) -> None:
    """Every report holds one finding: a TID 1410 region group and a TID 1501 group with the numbers,
    linked by one tracking UID (what OHIF needs to open it, issue 15), plus the image-level result in
    the report-level containers of TID 1500 (rows 10 and 12)."""
    import highdicom as hd

    ds, prepared = _load(SMALL)
    # Three decimals of a percent: the shown Numeric Value is rounded to one, the exact value kept.
    expected_p = 87.346 if fractured else 6.234
    out = write_results(ds, prepared, synthetic_prediction("resnet50", fractured, expected_p / 100), tmp_path).files
    sr = hd.sr.srread(out.sr)
    tracking_uid = expected_result_uid(ds.SOPInstanceUID, "1.2.3", "tracking")
    groups = sr.content.get_image_measurement_groups()
    rois = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1 and len(rois) == 1
    assert groups[0].tracking_uid == rois[0].tracking_uid == tracking_uid
    numbers = {m.name.value: (m.value, m.unit.value) for m in groups[0].get_measurements()}
    # highdicom reads the Floating Point Value: the exact probability.
    assert numbers == {"FX-PROBABILITY": (pytest.approx(expected_p), "%"), "122411": (pytest.approx(42.0), "%")}
    shown = {m.name.value: m.name.meaning for m in groups[0].get_measurements()}
    assert shown["FX-PROBABILITY"] == "Fracture probability"
    # What viewers print (OHIF: the Numeric Value): one decimal.
    raw = pydicom.dcmread(out.sr)
    row6 = next(i for i in raw.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    ds_values = {
        i.ConceptNameCodeSequence[0].CodeValue: str(i.MeasuredValueSequence[0].NumericValue)
        for group in row6.ContentSequence for i in group.ContentSequence if i.ValueType == "NUM"
    }
    assert ds_values == {"FX-PROBABILITY": "87.3" if fractured else "6.2", "122411": "42.0"}
    declared = {i.CodingSchemeDesignator: i for i in raw.CodingSchemeIdentificationSequence}
    assert "99PACSAI" in declared, "the local coding scheme is declared"
    assert rois[0].get_measurements() == []
    roi = rois[0].roi
    assert roi is not None and str(roi.GraphicType) == "POLYLINE"
    points = np.asarray(roi.GraphicData, dtype=float).reshape(-1, 2)
    assert len(points) == 5 and (points[0] == points[-1]).all(), "a closed rectangle"
    box = (points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max())
    # Both report the heat map's hottest region (a negative too: its label then lies beside that region,
    # on screen in OHIF, not beyond the image's edge); only a positive calls it a suspected fracture.
    assert out.region is not None and box == pytest.approx(tuple(out.region))
    x0, y0, x1, y1 = out.region
    assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows and (x1 - x0) * (y1 - y0) < ds.Columns * ds.Rows
    g = prepared.geometry  # the synthetic map's maximum, (0.6, 0.4) of the network input, lies inside
    assert x0 <= (0.6 * g.size - g.pad_left) / g.scale <= x1 and y0 <= (0.4 * g.size - g.pad_top) / g.scale <= y1
    tracking = rois[0].tracking_identifier
    if fractured:
        assert out.roi == out.region
        assert groups[0].finding_type.value == rois[0].finding_type.value == "72704001"
        assert tracking == "AI fracture: suspected region"
    else:
        assert out.roi is None and groups[0].finding_type is None and rois[0].finding_type is None
        assert tracking == "AI fracture: strongest evidence, not suspected"
    evaluation = rois[0].get_qualitative_evaluations()[0]
    assert evaluation.value.value == ("52101004" if fractured else "2667000")

    # Report level: the image-level finding and numbers (pydicom only, independent of highdicom's parser).
    raw = pydicom.dcmread(out.sr)
    top = {item.ConceptNameCodeSequence[0].CodeValue: item for item in raw.ContentSequence}
    qualitative = top["C0034375"].ContentSequence[0]
    assert qualitative.ConceptNameCodeSequence[0].CodeValue == "72704001"
    assert qualitative.ConceptCodeSequence[0].CodeValue == ("52101004" if fractured else "2667000")
    derived = {i.ConceptNameCodeSequence[0].CodeValue: i.MeasuredValueSequence[0] for i in top["126011"].ContentSequence}
    assert float(derived["122157"].NumericValue) == pytest.approx(expected_p), "row 10: the exact value"
    assert derived["122157"].MeasurementUnitsCodeSequence[0].CodeValue == "%"
    assert raw.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    finding = read_finding(raw)
    assert finding.fractured is fractured and finding.probability == pytest.approx(expected_p / 100)
    assert finding.roi == (pytest.approx(tuple(out.roi)) if fractured else None)
    assert finding.region == pytest.approx(tuple(out.region))


def test_reprocessing_gives_the_same_uids_and_replaces_files(tmp_path: Path) -> None:
    ds, prepared = _load(WG04_SMALL / "RG2_J2KR.dcm")
    first = write_results(ds, prepared, synthetic_prediction("densenet121", True), tmp_path).files
    second = write_results(ds, prepared, synthetic_prediction("densenet121", False, 0.2), tmp_path).files
    for key in ("sc_sop_instance_uid", "sr_sop_instance_uid", "sc_series_instance_uid", "sr_series_instance_uid"):
        assert getattr(first, key) == getattr(second, key)
    assert read_finding(pydicom.dcmread(second.sr)).fractured is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png", "sc.dcm", "sr.dcm"]


# ----------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------


def test_derive_uid_is_deterministic_and_distinct() -> None:
    src = "1.2.3.4.5"
    uids = {kind: derive_uid(src, "1.0.0", kind) for kind in ("sc-series", "sc", "sr-series", "sr")}
    assert len(set(uids.values())) == 4
    assert uids == {kind: derive_uid(src, "1.0.0", kind) for kind in uids}
    assert derive_uid(src, "1.0.1", "sc") != uids["sc"]
    assert derive_uid("1.2.3.4.6", "1.0.0", "sc") != uids["sc"]
    for kind, uid in uids.items():
        assert pydicom.uid.UID(uid).is_valid and len(uid) <= 64 and uid.startswith("2.25.")
        assert uid == expected_result_uid(src, "1.0.0", kind)  # the documented rule, computed independently
    with pytest.raises(ValueError):
        derive_uid(src, "1.0.0", "bogus")


def test_hottest_region_is_the_blob_around_the_maximum() -> None:
    heat = np.zeros((100, 200), np.float32)
    heat[10:20, 30:50] = 1.0  # hottest blob
    heat[60:90, 100:180] = 0.8  # bigger but cooler blob, above half the maximum
    assert hottest_region(heat) == (30, 10, 50, 20)
    assert hottest_region(np.zeros((10, 10), np.float32)) is None
    assert normalise_heat(np.full((3, 3), np.nan)).max() == 0.0


def test_overlay_keeps_cold_areas_grey_and_caption_readable() -> None:
    grey = np.tile(np.linspace(20, 230, 300, dtype=np.float32), (400, 1)).astype(np.uint8)
    heat = np.zeros((400, 300), np.float32)
    heat[250:300, 150:200] = 1.0
    img = render_result_image(grey, heat, Caption(True, 0.9, 0.5, "fracture-resnet50 1.0.0"), roi=(150, 250, 200, 300))
    assert img.shape == (400, 300, 3) and img.dtype == np.uint8
    cold = img[200, 100]
    assert cold[0] == cold[1] == cold[2], "cold areas must stay grey"
    hot = img[275, 175].astype(int)
    assert hot.max() - hot.min() > 40, "hot areas must be coloured"
    assert (img[-60:-5, 60:240] < 60).mean() > 0.5, "caption sits in a dark box (bottom centre)"
    big = render_result_image(np.zeros((3000, 2500), np.uint8), None, Caption(False, 0.1, 0.5, "m 1"))
    assert big.shape == (2048, round(2500 * 2048 / 3000), 3)


def test_missing_source_uid_is_a_write_error(tmp_path: Path) -> None:
    from pacs_ai.infer.preprocess import Geometry, Prepared

    ds = pydicom.Dataset()
    ds.StudyInstanceUID = "1.2.3"
    display = np.zeros((64, 64), np.uint8)
    prepared = Prepared(tensor=None, display=display, geometry=Geometry.for_image(64, 64, 224))  # type: ignore[arg-type]
    with pytest.raises(DicomWriteError):
        write_results(ds, prepared, synthetic_prediction("resnet50", True), tmp_path)


SMALL = REPO / "tests" / "data" / "cr_hip_mono2_small.dcm"


@pytest.mark.skipif(not SMALL.is_file(), reason="tests/data sample absent")
def test_all_zero_heat_map_gives_no_roi_and_no_tint(tmp_path: Path) -> None:
    """Grad-CAM maps can come out all zero: the writer still writes both objects, without a region."""
    ds, prepared = _load(SMALL)
    prediction = synthetic_prediction("vgg16", True)
    prediction = Prediction(**{**{f: getattr(prediction, f) for f in prediction.__dataclass_fields__},
                               "cam": np.zeros((224, 224), np.float32)})
    out = write_results(ds, prepared, prediction, tmp_path).files
    assert out.roi is None and out.region is None
    finding = read_finding(pydicom.dcmread(out.sr))
    assert finding.fractured is True and finding.roi is None and finding.region is None, "the whole image"
    rgb = pydicom.dcmread(out.sc).pixel_array
    middle = rgb[rgb.shape[0] // 2, :].astype(int)
    assert (middle[:, 0] == middle[:, 1]).all() and (middle[:, 1] == middle[:, 2]).all()


@pytest.mark.skipif(not SMALL.is_file(), reason="tests/data sample absent")
def test_result_series_have_a_date_and_a_modality_that_viewers_do_not_play_as_cine(tmp_path: Path) -> None:
    """Orthanc Explorer files a series without Series Date under "?"; OHIF plays OT and US as cine."""
    ds, prepared = _load(SMALL)
    out = write_results(ds, prepared, synthetic_prediction("resnet50", True), tmp_path).files
    sc, sr = pydicom.dcmread(out.sc), pydicom.dcmread(out.sr)
    for obj in (sc, sr):
        assert len(obj.SeriesDate) == 8 and obj.SeriesDate == obj.ContentDate
        assert len(obj.SeriesTime) >= 6
    assert sc.Modality == ds.Modality == "CR"
    assert sr.Modality == "SR"


def test_sc_modality_never_ot_or_us() -> None:
    from pacs_ai.write.secondary_capture import result_modality

    for given, expected in (("DX", "DX"), ("CR", "CR"), ("OT", "DX"), ("US", "DX"), ("", "DX"), (None, "DX")):
        ds = pydicom.Dataset()
        if given is not None:
            ds.Modality = given
        assert result_modality(ds) == expected


@pytest.mark.parametrize("shape", [(400, 300), (1760, 2140), (2048, 1200), (600, 2000)])
def test_caption_and_legend_leave_the_corners_to_viewer_overlays(shape: tuple[int, int]) -> None:
    """Viewers (OHIF, Orthanc Web Viewer) write their overlay text in the viewport's corners: the caption
    sits at the bottom centre within 60 % of the width, the legend at the top centre."""
    from pacs_ai.write.overlay import caption_box

    grey = np.full(shape, 128, np.uint8)
    caption = Caption(True, 0.873, 0.42, "fracture-densenet121 1.2.3")
    img = render_result_image(grey, None, caption)
    h, w = img.shape[:2]
    corner_w, corner_h = round(0.2 * w), round(0.12 * h)
    for ys, xs in ((slice(0, corner_h), slice(0, corner_w)), (slice(0, corner_h), slice(w - corner_w, w)),
                   (slice(h - corner_h, h), slice(0, corner_w)), (slice(h - corner_h, h), slice(w - corner_w, w))):
        assert (img[ys, xs] == 128).all(), "a corner holds caption or legend pixels"
    x0, y0, x1, y1 = caption_box(img.shape, caption)
    assert x1 - x0 <= 0.6 * w + 2 and abs((x0 + x1) / 2 - w / 2) <= 1 and y1 > 0.75 * h
    assert (img[y0:y1, x0:x1] < 128).mean() > 0.5, "the caption sits in a dark box"
    assert (img[y0:y1, x0:x1] > 200).any(), "with bright text in it"
