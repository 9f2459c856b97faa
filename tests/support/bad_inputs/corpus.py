"""The bad-input corpus: builders for malformed, unsupported and hostile DICOM inputs, with expected outcomes.

Every case is built on demand into a folder (nothing large is committed): from the committed sample under
``tests/data`` (decoded, shrunk and re-UID'd) or from synthesised pydicom datasets, plus the two real
undecodable lossy JPEGs committed under ``tests/data/undecodable`` (WG-04 RG2/RG3_JPLY, see
tests/data/make_samples.py); synthesised corrupt JPEG-LS / JPEG 2000 / RLE streams cover the same path.

``CASES`` is the table: each :class:`Case` has an id, what it is, how it is sent, and its
:class:`Expect`-ed outcome, one of

- ``refused at association/negotiation`` (association rejected, or no presentation context accepted);
- ``C-STORE status 0xNNNN`` (the listener answers that status; no job is created);
- ``job dead with reason <code>`` (acknowledged with 0x0000, then the job ends ``dead`` and its
  ``last_error`` starts with the ``InputError`` reason code);
- ``job done`` (a valid if unusual input: it must be processed).

``python -m tests.bad_inputs.corpus OUT_DIR`` builds every case into OUT_DIR and prints the table.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

REPO = Path(__file__).resolve().parents[3]
SAMPLES_DIR = REPO / "tests" / "data"
UNDECODABLE_DIR = REPO / "tests" / "data" / "undecodable"  # committed copies of WG-04 RG2/RG3_JPLY

CR = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
CT = UID("1.2.840.10008.5.1.4.1.1.2")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
PRIVATE_TS = UID("1.2.826.0.1.3680043.9.7777.1.99")  # a transfer syntax no one knows

ALLOWED_AE = "TESTSCU"
FORBIDDEN_AE = "INTRUDER"


# ----------------------------------------------------------------------------------------------------
# Expected outcomes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    kind: str  # "refused" | "status" | "dead" | "done"
    status: int | None = None
    reason: str | None = None
    family: bool = False  # "status": any status of the same family (0xC0xx, 0xA9xx) is right

    def matches_status(self, got: int | None) -> bool:
        if got is None or self.status is None:
            return False
        if self.family:
            return (got & 0xFF00) == (self.status & 0xFF00)
        return got == self.status

    def __str__(self) -> str:
        if self.kind == "refused":
            return "refused at association/negotiation"
        if self.kind == "status":
            if self.family:
                return f"C-STORE status 0x{self.status >> 8:02X}xx"
            return f"C-STORE status 0x{self.status:04X}"
        if self.kind == "dead":
            return f"job dead with reason {self.reason}"
        return "job done"


REFUSED = Expect("refused")
DONE = Expect("done")


def status(code: int, family: bool = False) -> Expect:
    return Expect("status", status=code, family=family)


def dead(reason: str) -> Expect:
    return Expect("dead", reason=reason)


@dataclass
class CaseInput:
    """What a case sends: ``files`` in one association as ``calling_ae``; ``prelude`` first, on its own."""

    files: list[Path]
    calling_ae: str = ALLOWED_AE
    prelude: list[Path] = field(default_factory=list)
    notes: str = ""


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    expect: Expect
    build: Callable[[Path], CaseInput] = field(repr=False, compare=False)
    requires: Callable[[], str] | None = field(default=None, repr=False, compare=False)
    """Returns a skip reason when the case cannot be built here (empty string: it can)."""

    def skip_reason(self) -> str:
        return self.requires() if self.requires else ""


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


def sample_files() -> list[Path]:
    """The committed real samples (tests/data/**/*.dcm), smallest first."""
    if not SAMPLES_DIR.is_dir():
        return []
    return sorted((p for p in SAMPLES_DIR.rglob("*.dcm") if p.is_file()), key=lambda p: p.stat().st_size)


def _synthetic_pixels(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A radiograph-like 12-bit image: a bright 'bone' band on soft tissue, with noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    soft = 900 + 600 * np.exp(-(((x - cols / 2) / (cols / 2.5)) ** 2))
    bone = 1800 * np.exp(-(((x - cols / 2 - (y - rows / 2) * 0.2) / (cols / 12)) ** 2))
    img = soft + bone + rng.normal(0, 40, size=(rows, cols))
    return np.clip(img, 0, 4095).astype(np.uint16)


@functools.lru_cache(maxsize=8)
def real_pixels(max_side: int = 128) -> np.ndarray:
    """Pixels of the smallest committed greyscale sample, shrunk to ``max_side`` (uint16, MONOCHROME2 sense).

    Falls back to a synthetic radiograph when no sample is committed or none decodes here.
    """
    import cv2

    for path in sample_files():
        try:
            ds = dcmread(path)
            if str(ds.get("PhotometricInterpretation", "")) not in ("MONOCHROME1", "MONOCHROME2"):
                continue
            arr = ds.pixel_array
            if arr.ndim != 2:
                continue
            if str(ds.PhotometricInterpretation) == "MONOCHROME1":
                arr = arr.max() - arr
            h, w = arr.shape
            scale = max_side / max(h, w)
            small = cv2.resize(arr.astype(np.float32), (max(16, round(w * scale)), max(16, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
            return np.clip(small, 0, 65535).astype(np.uint16)
        except Exception:  # noqa: BLE001 - try the next sample
            continue
    return _synthetic_pixels(max_side, max_side)


def image_dataset(
    pixels: np.ndarray | None = None,
    *,
    sop_class: str = CR,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient: str = "Corpus^Test",
) -> Dataset:
    """A complete single-frame greyscale image dataset (Explicit VR Little Endian file meta)."""
    if pixels is None:
        pixels = real_pixels()
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    now = datetime.now()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "A1"
    ds.Modality = modality
    ds.Manufacturer = "pacs-ai test corpus"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient
    ds.PatientID = "CORPUS-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "HAND"
    if modality == "DX" or sop_class == DX_PRESENTATION:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["A", "F"] if sop_class != CR else ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or (12 if pixels.dtype.itemsize == 2 and not signed else ds.BitsAllocated)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    set_meta(ds)
    return ds


def set_meta(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian, *, sop_uid: str | None = None,
             sop_class: str | None = None) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or ds.get("SOPClassUID", CR)
    meta.MediaStorageSOPInstanceUID = sop_uid or ds.get("SOPInstanceUID", generate_uid())
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    return ds


def write(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (preamble, meta); the body is encoded as the meta's transfer syntax says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if ts.is_private:  # pydicom cannot tell how a private syntax encodes: say Explicit VR Little Endian
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def rewrite_meta(
    path: Path, *, sop_class: str | None = None, sop_uid: str | None = None, transfer_syntax: str | None = None
) -> Path:
    """Change the file meta's SOP class / instance / transfer syntax (what the C-STORE request will say);
    the body is left as it is.

    pydicom's writer makes the meta agree with the dataset; some cases need them to disagree.
    """
    from io import BytesIO

    from pydicom.filebase import DicomFileLike
    from pydicom.filereader import read_file_meta_info
    from pydicom.filewriter import write_file_meta_info

    raw = path.read_bytes()
    body = raw[132 + 12 + int.from_bytes(raw[140:144], "little"):]
    meta = read_file_meta_info(path)
    if sop_class:
        meta.MediaStorageSOPClassUID = sop_class
    if sop_uid:
        meta.MediaStorageSOPInstanceUID = sop_uid
    if transfer_syntax:
        meta.TransferSyntaxUID = transfer_syntax
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength
    buf = BytesIO()
    fp = DicomFileLike(buf)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + body)
    return path


def good_image(folder: Path, name: str = "good", *, max_side: int = 128) -> Path:
    """A valid, small CR image with fresh UIDs (a positive control)."""
    return write(image_dataset(real_pixels(max_side)), folder / f"{name}-{generate_uid()[-12:]}.dcm")


def small_images(folder: Path, n: int, *, max_side: int = 96, prefix: str = "img") -> list[Path]:
    """``n`` small valid CR images with fresh Study/Series/SOP UIDs each (for bursts)."""
    base = real_pixels(max_side)
    out = []
    for i in range(n):
        px = base.copy()
        px[0, 0] = i % 4096  # every image a little different
        out.append(write(image_dataset(px), folder / f"{prefix}-{i:04d}.dcm"))
    return out


def _compressed(ds: Dataset, ts: UID) -> bytes:
    ds.compress(ts)
    return get_frame(ds.PixelData, 0, number_of_frames=1)


def _encoder_missing(ts: UID) -> str:
    try:
        from pydicom.pixels import get_encoder

        return "" if get_encoder(ts).is_available else f"no {ts.name} encoder installed"
    except Exception as exc:  # noqa: BLE001
        return f"no {ts.name} encoder: {exc}"


def _rle_constant(rows: int, cols: int, value: int) -> bytes:
    """One RLE Lossless frame (8-bit, one segment) of a constant image, built directly (no 400 MB array)."""
    row = bytearray()
    left = cols
    while left:
        run = min(128, left)
        row += bytes([(257 - run) & 0xFF, value])  # replicate run: -(run-1) then the byte
        left -= run
    header = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56)
    segment = bytes(row) * rows
    if len(segment) % 2:
        segment += b"\0"
    return header + segment


# ----------------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------------


def _one(folder: Path, name: str, ds: Dataset) -> CaseInput:
    return CaseInput([write(ds, folder / f"{name}.dcm")])


def build_sr(folder: Path) -> CaseInput:
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.PatientName, ds.PatientID = "Corpus^Test", "CORPUS-1"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121144", "DCM", "Document Title"
    ds.ConceptNameCodeSequence = Sequence([concept])
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "no pixels here"
    ds.ContentSequence = Sequence([item])
    set_meta(ds)
    return _one(folder, "sr", ds)


def build_sr_as_cr(folder: Path) -> CaseInput:
    """An SR body sent under the CR SOP class (meta and request say CR, the dataset says SR)."""
    inp = build_sr(folder)
    return CaseInput([rewrite_meta(inp.files[0], sop_class=CR)])


def build_missing_pixels(folder: Path) -> CaseInput:
    ds = image_dataset()
    del ds.PixelData
    return _one(folder, "no-pixels", ds)


def build_empty_pixels(folder: Path) -> CaseInput:
    ds = image_dataset()
    ds.PixelData = b""
    return _one(folder, "empty-pixels", ds)


def build_truncated(folder: Path) -> CaseInput:
    """A valid file cut in the middle of its pixel data (the bytes after the cut never arrive)."""
    path = write(image_dataset(real_pixels(128)), folder / "full.dcm")
    raw = path.read_bytes()
    cut = folder / "truncated.dcm"
    cut.write_bytes(raw[: len(raw) - (128 * 128)])  # about half of the pixel bytes
    path.unlink()
    return CaseInput([cut])


def build_truncated_header(folder: Path) -> CaseInput:
    """A file cut just after the Series Instance UID: no image attributes, no pixel data at all."""
    ds = image_dataset()
    path = write(ds, folder / "full-h.dcm")
    raw = path.read_bytes()
    series = ds.SeriesInstanceUID.encode()
    end = raw.index(series) + len(series) + (len(series) % 2)
    cut = folder / "truncated-header.dcm"
    cut.write_bytes(raw[: end + 5])  # and half of the next element's header
    path.unlink()
    return CaseInput([cut])


def build_short_pixels(folder: Path) -> CaseInput:
    """Pixel Data shorter than Rows x Columns x BitsAllocated says (a valid, complete element)."""
    ds = image_dataset()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 * 2]
    return _one(folder, "short-pixels", ds)


def build_multiframe(folder: Path) -> CaseInput:
    px = real_pixels(64)
    ds = image_dataset(px, sop_class=DX_PRESENTATION, modality="DX")
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack([px, px, px]).tobytes()
    return _one(folder, "multiframe", ds)


def build_rgb(folder: Path) -> CaseInput:
    grey = (real_pixels(96) >> 4).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    ds = image_dataset(grey, sop_class=SECONDARY_CAPTURE, modality="OT")
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.ConversionType = "WSD"
    ds.PixelData = rgb.tobytes()
    return _one(folder, "rgb", ds)


def build_signed16(folder: Path) -> CaseInput:
    px = real_pixels(128).astype(np.int32) - 2048
    ds = image_dataset(px.astype(np.int16), sop_class=DX_PRESENTATION, modality="DX", signed=True)
    ds.BitsStored, ds.HighBit = 16, 15
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    return _one(folder, "signed16", ds)


def build_float(folder: Path) -> CaseInput:
    """Float Pixel Data (7FE0,0008) instead of Pixel Data: 32-bit IEEE floats."""
    px = real_pixels(96).astype(np.float32) / 4095.0
    ds = image_dataset(px.astype(np.uint16), sop_class=SECONDARY_CAPTURE, modality="OT")
    del ds.PixelData
    for kw in ("BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, kw)
    ds.BitsAllocated = 32
    ds.FloatPixelData = px.tobytes()
    return _one(folder, "float", ds)


def build_tiny(folder: Path) -> CaseInput:
    return _one(folder, "1x1", image_dataset(np.array([[1000]], dtype=np.uint16)))


def build_huge(folder: Path) -> CaseInput:
    """20000 x 20000, 8-bit, RLE Lossless of a constant image: about 6 MB sent, 400 MB if decoded."""
    rows = cols = 20000
    ds = image_dataset(np.zeros((16, 16), dtype=np.uint8), sop_class=SECONDARY_CAPTURE, modality="OT")
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = encapsulate([_rle_constant(rows, cols, 128)])
    ds["PixelData"].VR = "OB"
    set_meta(ds, RLELossless)
    return _one(folder, "20000x20000-rle", ds)


def build_monochrome1(folder: Path) -> CaseInput:
    px = real_pixels(128)
    inverted = (4095 - np.minimum(px, 4095)).astype(np.uint16)
    ds = image_dataset(inverted, photometric="MONOCHROME1")
    return _one(folder, "monochrome1", ds)


def _without(keyword: str, name: str) -> Callable[[Path], CaseInput]:
    def build(folder: Path) -> CaseInput:
        ds = image_dataset()
        uid = ds.SOPInstanceUID
        delattr(ds, keyword)
        inp = _one(folder, name, ds)
        return CaseInput([rewrite_meta(inp.files[0], sop_uid=uid)])  # the request still names the instance

    return build


def build_uid_mismatch(folder: Path) -> CaseInput:
    inp = _one(folder, "uid-mismatch", image_dataset())
    return CaseInput([rewrite_meta(inp.files[0], sop_uid=generate_uid())])  # the request names another


def build_collision(folder: Path) -> CaseInput:
    """Two different images under one SOP Instance UID: the first is sent (and processed) before."""
    uid, study, series = generate_uid(), generate_uid(), generate_uid()
    first = image_dataset(real_pixels(128), sop_uid=uid, study_uid=study, series_uid=series)
    other = _synthetic_pixels(128, 128, seed=7)
    second = image_dataset(other, sop_uid=uid, study_uid=study, series_uid=series)
    return CaseInput(
        [write(second, folder / "collision-b.dcm")],
        prelude=[write(first, folder / "collision-a.dcm")],
        notes="same SOP Instance UID, different pixels",
    )


def build_ct(folder: Path) -> CaseInput:
    ds = image_dataset(sop_class=CT, modality="CT")
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    return _one(folder, "ct", ds)


def build_unknown_ts(folder: Path) -> CaseInput:
    ds = image_dataset()
    set_meta(ds, PRIVATE_TS)
    return _one(folder, "private-ts", ds)


def build_ae_not_allowed(folder: Path) -> CaseInput:
    inp = CaseInput([good_image(folder, "from-intruder")], calling_ae=FORBIDDEN_AE)
    return inp


HUGE_ASSOCIATION = 300


def build_huge_association(folder: Path) -> CaseInput:
    return CaseInput(small_images(folder, HUGE_ASSOCIATION, max_side=48, prefix="many"))


def build_garbage(folder: Path) -> CaseInput:
    """A valid file meta header followed by random bytes as the dataset."""
    ds = image_dataset()
    path = write(ds, folder / "garbage.dcm")
    raw = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # preamble+DICM, group length element
    rng = np.random.default_rng(42)
    path.write_bytes(raw[:meta_end] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return CaseInput([path])


def _corrupt_stream(ts: UID, mode: str) -> Callable[[Path], CaseInput]:
    def build(folder: Path) -> CaseInput:
        ds = image_dataset(real_pixels(128))
        frame = bytearray(_compressed(ds, ts))
        if mode == "truncate":
            frame = frame[: len(frame) * 3 // 10]
        else:  # overwrite the marker segments after the start-of-image marker
            frame[2:40] = bytes(range(7, 45))
        ds.PixelData = encapsulate([bytes(frame)])
        set_meta(ds, ts)
        return _one(folder, f"corrupt-{ts.name.split()[0].lower()}", ds)

    return build


def build_rle_rows_lie(folder: Path) -> CaseInput:
    """A valid RLE frame of a 64-row image whose header says 16 rows: pylibjpeg-rle panics (a Rust panic,
    which Python raises as ``PanicException``, a BaseException and not an Exception)."""
    ds = image_dataset(real_pixels(64))
    ds.compress(RLELossless)
    ds.Rows = 16
    return _one(folder, "rle-rows-lie", ds)


def build_bad_vr(folder: Path) -> CaseInput:
    """A good DX image whose Patient Orientation (0020,0020) carries the unknown VR 'CC' (a corrupted byte)."""
    ds = image_dataset(real_pixels(128), sop_class=DX_PRESENTATION, modality="DX")
    path = write(ds, folder / "bad-vr.dcm")
    raw = bytearray(path.read_bytes())
    i = raw.index(b"\x20\x00\x20\x00CS")
    raw[i + 4 : i + 6] = b"CC"
    path.write_bytes(bytes(raw))
    return CaseInput([path])


def build_no_modality(folder: Path) -> CaseInput:
    """A good CR image without (0008,0060) Modality."""
    ds = image_dataset()
    del ds.Modality
    return _one(folder, "no-modality", ds)


def _undecodable(name: str) -> Callable[[Path], CaseInput]:
    def build(folder: Path) -> CaseInput:
        # Re-UID a copy: a resend of the same instance would only be a duplicate of an earlier run.
        ds = dcmread(UNDECODABLE_DIR / name)
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return _one(folder, name.removesuffix(".dcm"), ds)

    return build


def build_deflated(folder: Path) -> CaseInput:
    ds = image_dataset()
    set_meta(ds, DeflatedExplicitVRLittleEndian)
    return _one(folder, "deflated", ds)


CASES: list[Case] = [
    Case("sr_not_image", "a Basic Text SR (no pixels) sent by C-STORE under its own SOP class", REFUSED, build_sr),
    Case("sr_sent_as_cr", "an SR dataset sent under the CR SOP class", status(0xA900), build_sr_as_cr),
    Case("missing_pixel_data", "CR image without (7FE0,0010)", dead("missing_pixel_data"), build_missing_pixels),
    Case("empty_pixel_data", "CR image with a zero-length Pixel Data", dead("undecodable_pixel_data"),
         build_empty_pixels),
    Case("truncated_file", "file cut in the middle of its pixel data", dead("undecodable_pixel_data"),
         build_truncated),
    Case("truncated_header", "file cut right after the UIDs (no image attributes)", dead("missing_pixel_data"),
         build_truncated_header),
    Case("short_pixel_data", "Pixel Data 2/3 of what Rows x Columns x Bits says", dead("undecodable_pixel_data"),
         build_short_pixels),
    Case("undecodable_rg2_jply", "real 12-bit lossy JPEG Extended the decoders refuse (tests/data/undecodable)",
         dead("undecodable_pixel_data"), _undecodable("RG2_JPLY.dcm")),
    Case("undecodable_rg3_jply", "real 12-bit lossy JPEG Extended the decoders refuse (tests/data/undecodable)",
         dead("undecodable_pixel_data"), _undecodable("RG3_JPLY.dcm")),
    Case("corrupt_jpegls", "JPEG-LS stream with its marker segments overwritten", dead("undecodable_pixel_data"),
         _corrupt_stream(JPEGLSLossless, "header"), lambda: _encoder_missing(JPEGLSLossless)),
    Case("corrupt_j2k", "JPEG 2000 lossless codestream truncated to 30 %", dead("undecodable_pixel_data"),
         _corrupt_stream(JPEG2000Lossless, "truncate"), lambda: _encoder_missing(JPEG2000Lossless)),
    Case("corrupt_rle", "RLE Lossless frame truncated to 30 %", dead("undecodable_pixel_data"),
         _corrupt_stream(RLELossless, "truncate"), lambda: _encoder_missing(RLELossless)),
    Case("rle_rows_lie", "RLE frame longer than its Rows say (makes the RLE decoder panic)",
         dead("undecodable_pixel_data"), build_rle_rows_lie, lambda: _encoder_missing(RLELossless)),
    Case("multi_frame", "DX with 3 frames", dead("multi_frame"), build_multiframe),
    Case("rgb", "RGB Secondary Capture", dead("unsupported_photometric"), build_rgb),
    Case("signed_16bit", "16-bit signed DX (valid: must be processed)", DONE, build_signed16),
    Case("float_pixels", "Float Pixel Data, 32-bit IEEE (valid: must be processed)", DONE, build_float),
    Case("image_1x1", "a 1 x 1 image", dead("unsupported_image"), build_tiny),
    Case("image_20000x20000", "20000 x 20000 8-bit RLE (6 MB sent, 400 MB decoded)", dead("unsupported_image"),
         build_huge),
    Case("monochrome1", "MONOCHROME1 CR (valid: must be processed)", DONE, build_monochrome1),
    Case("missing_study_uid", "no Study Instance UID", status(0xC001), _without("StudyInstanceUID", "no-study")),
    Case("missing_series_uid", "no Series Instance UID", status(0xC001), _without("SeriesInstanceUID", "no-series")),
    Case("missing_sop_uid", "no SOP Instance UID in the dataset (the request names one)", status(0xC001),
         _without("SOPInstanceUID", "no-sop")),
    Case("sop_uid_mismatch", "dataset SOP Instance UID differs from the request's", status(0xC002),
         build_uid_mismatch),
    Case("uid_collision", "a second, different image under an already processed SOP Instance UID "
         "(acknowledged; the job is re-queued with the new content and processed again)", DONE, build_collision),
    Case("unknown_vr_in_header", "a DX image whose Patient Orientation carries an unknown VR ('CC'): the result "
         "objects cannot copy it; a permanent failure, not retried", dead("result_not_writable"), build_bad_vr),
    Case("missing_modality", "a CR image without Modality (Type 1): the SR cannot be built; a permanent failure",
         dead("result_not_writable"), build_no_modality),
    Case("wrong_modality_ct", "CT Image Storage", REFUSED, build_ct),
    Case("calling_ae_not_allowed", "a good image from a calling AE title not in allowed_calling_aets", REFUSED,
         build_ae_not_allowed),
    Case("huge_association", f"{HUGE_ASSOCIATION} small images in one association", DONE, build_huge_association),
    Case("unknown_transfer_syntax", "a private transfer syntax UID", REFUSED, build_unknown_ts),
    Case("garbage_dataset", "valid file meta, then 4 KB of random bytes",
         status(0xC000, family=True), build_garbage),
    Case("deflated_valid", "a valid image in Deflated Explicit VR Little Endian (must be processed)", DONE,
         build_deflated),
]


def by_id(case_id: str) -> Case:
    for case in CASES:
        if case.id == case_id:
            return case
    raise KeyError(case_id)


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "bad-inputs")
    for case in CASES:
        skip = case.skip_reason()
        if skip:
            print(f"{case.id:26s} SKIP ({skip})")
            continue
        inp = case.build(out / case.id)
        size = sum(p.stat().st_size for p in inp.files + inp.prelude)
        print(f"{case.id:26s} {len(inp.files):3d} file(s) {size / 1e6:7.2f} MB  expect: {case.expect}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
