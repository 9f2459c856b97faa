"""Photometric interpretation and LUTs: every combination gives the standard's picture, bone bright (issue 10).

The matrix: MONOCHROME1/MONOCHROME2 x Presentation LUT Shape (none, IDENTITY, INVERSE) x Modality LUT
(none, rescale, Modality LUT Sequence) x VOI (none, window LINEAR, LINEAR_EXACT, SIGMOID, VOI LUT
Sequence) x unsigned/signed x bits stored (8, 12, 16): 2*3*3*5*2*3 = 540 images. Each is a small
phantom (background, soft tissue, bone) written to bytes with pydicom and read back, so ambiguous VRs
(LUT Descriptor US/SS, LUT Data US/OW) are resolved as on the wire.

The expected picture is the independent reference rendering: pydicom's ``apply_modality_lut`` then
``apply_voi_lut`` (scaled to [0, 1] by the output range PS3.3 C.11.2.1.2 gives a window, or the LUT's
bits per entry), inverted when the standard displays the minimum white (the table ``INVERTED`` below,
from PS3.3 C.8.11.1 and C.11.6.1.2). Without any VOI the image has no defined display range: the output
must then be a monotonic function of the modality values. In every case bone must come out brighter
than soft tissue, and soft tissue brighter than the background.

The DX field case c04 (MONOCHROME1 with Presentation LUT Shape INVERSE, what DX requires) must give the
same picture and the same probability (bundled reference model) as its MONOCHROME2/IDENTITY control.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs_ai.infer.preprocess import dicom_to_gray

FIELD_CASES = Path(__file__).resolve().parent / "data" / "field_cases"
REFERENCE_MODEL = Path(__file__).resolve().parents[1] / "models" / "reference"

PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
SHAPES = (None, "IDENTITY", "INVERSE")
MODALITY_LUTS = ("none", "rescale", "lut_sequence")
VOIS = ("none", "window_linear", "window_linear_exact", "window_sigmoid", "voi_lut_sequence")
SIGNED = (False, True)
BITS_STORED = (8, 12, 16)

# Is the minimum VOI output displayed white? PS3.3 C.7.6.3.1.2 (MONOCHROME1: minimum white),
# C.8.11.1 (DX: INVERSE "shall be used if Photometric Interpretation is MONOCHROME1": the shape restates
# the photometric inversion, it does not add a second one), C.11.6.1.2 (INVERSE: minimum to maximum
# P-value). MONOCHROME1 with IDENTITY is not allowed in DX; the pixel data's own polarity wins.
INVERTED = {
    ("MONOCHROME1", None): True,
    ("MONOCHROME1", "IDENTITY"): True,
    ("MONOCHROME1", "INVERSE"): True,
    ("MONOCHROME2", None): False,
    ("MONOCHROME2", "IDENTITY"): False,
    ("MONOCHROME2", "INVERSE"): True,
}

H, W = 40, 36


def phantom() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Truth image in [0, 1] with bone bright: background 0.1, soft tissue 0.45, a bone band 0.85,
    each with a gentle ramp so monotonicity is checked over many levels; and the three region masks."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ramp = 0.08 * xx / (W - 1)
    soft = ((yy - H / 2) / (H * 0.42)) ** 2 + ((xx - W / 2) / (W * 0.42)) ** 2 <= 1.0
    bone = soft & (np.abs(xx - W / 2) <= W * 0.1)
    truth = np.full((H, W), 0.1, np.float32)
    truth[soft] = 0.45
    truth[bone] = 0.85
    truth += ramp
    return truth, {"background": ~soft, "soft": soft & ~bone, "bone": bone}


def stored_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def build(
    photometric: str, shape: str | None, modality: str, voi: str, signed: bool, bits: int, *, lut_bits: int = 16, lut_top: int = 65535
) -> Dataset:
    """The phantom encoded so that its standard display shows bone bright; written and read back.

    ``lut_bits``/``lut_top``: the Modality LUT Sequence's bits per entry and largest entry."""
    truth, _ = phantom()
    level = 1.0 - truth if INVERTED[(photometric, shape)] else truth
    lo, hi = stored_range(bits, signed)
    span = hi - lo
    stored = np.round(lo + span * (0.05 + 0.9 * level)).astype(np.int64)
    allocated = 8 if bits <= 8 else 16
    dtype = np.dtype(f"{'i' if signed else 'u'}{allocated // 8}")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = H, W
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.astype(dtype).tobytes()
    if shape is not None:
        ds.PresentationLUTShape = shape

    values = stored.astype(np.float64)  # modality output values, to place the window / VOI LUT
    if modality == "rescale":
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "0.5", "-100", "US"
        values = values * 0.5 - 100
    elif modality == "lut_sequence":
        x = np.arange(lo, hi + 1, dtype=np.float64)
        data = np.round(lut_top * ((x - lo) / span) ** 0.7).astype("<u2")  # monotonic, not linear
        item = Dataset()
        item.add_new(0x00283002, "SS" if signed else "US", [len(x) % 65536, lo, lut_bits])  # LUT Descriptor
        item.add_new(0x00283006, "OW", data.tobytes())  # LUT Data
        item.ModalityLUTType = "US"
        ds.ModalityLUTSequence = Sequence([item])
        values = data[stored - lo].astype(np.float64)

    if voi != "none":
        vmin, vmax = float(values.min()), float(values.max())
        if voi.startswith("window"):
            # A window narrower than the data, so both ends clip.
            ds.WindowCenter = f"{(vmin + vmax) / 2:.2f}"
            ds.WindowWidth = f"{0.8 * (vmax - vmin):.2f}"
            ds.VOILUTFunction = {"window_linear": "LINEAR", "window_linear_exact": "LINEAR_EXACT", "window_sigmoid": "SIGMOID"}[voi]
        else:
            first, last = int(np.floor(vmin)), int(np.ceil(vmax))
            n = last - first + 1
            t = np.linspace(0.0, 1.0, n)
            data = np.round(65535 * t * t * (3 - 2 * t)).astype("<u2")  # smoothstep: monotonic
            item = Dataset()
            item.add_new(0x00283002, "SS" if first < 0 else "US", [n % 65536, first, 16])
            item.add_new(0x00283006, "OW", data.tobytes())
            ds.VOILUTSequence = Sequence([item])

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def reference_display(ds: Dataset) -> np.ndarray | None:
    """pydicom's rendering in [0, 1] before any inversion; None when the image has no VOI."""
    # int64: pydicom 3.0 computes LUT indices in the input's dtype, which wraps for int8/int16 pixel data
    # with a negative first mapped value.
    values = apply_modality_lut(ds.pixel_array.astype(np.int64), ds)
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64) / (2**bits - 1)
    if "WindowCenter" in ds:
        # Output range of pydicom's apply_windowing (PS3.3 C.11.2.1.2: y_min..y_max).
        if "ModalityLUTSequence" in ds:
            y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
        else:
            y_min, y_max = map(float, stored_range(int(ds.BitsStored), bool(ds.PixelRepresentation)))
            if "RescaleSlope" in ds:
                slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
                y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
        out = apply_voi_lut(values, ds, prefer_lut=True)
        return (out - y_min) / (y_max - y_min)
    return None


MATRIX = list(itertools.product(PHOTOMETRICS, SHAPES, MODALITY_LUTS, VOIS, SIGNED, BITS_STORED))


def _id(case: tuple) -> str:
    p, s, m, v, signed, bits = case
    return f"{p[-1]}-{s or 'noshape'}-{m}-{v}-{'s' if signed else 'u'}{bits}"


def test_matrix_size() -> None:
    assert len(MATRIX) == 540


@pytest.mark.parametrize("case", MATRIX, ids=[_id(c) for c in MATRIX])
def test_rendering_matches_reference_and_bone_is_bright(case: tuple) -> None:
    photometric, shape = case[0], case[1]
    ds = build(*case)
    gray = dicom_to_gray(ds)
    assert gray.shape == (H, W) and gray.dtype == np.float32
    assert 0.0 <= gray.min() and gray.max() <= 1.0

    _, masks = phantom()
    means = {k: float(gray[m].mean()) for k, m in masks.items()}
    assert means["bone"] > means["soft"] + 0.1 > means["background"] + 0.2, means

    ref = reference_display(ds)
    inverted = INVERTED[(photometric, shape)]
    if ref is not None:
        expected = 1.0 - ref if inverted else ref
        # float32 against pydicom's float64; one 16-bit LUT step is 1.5e-5
        np.testing.assert_allclose(gray, expected, atol=2e-3, rtol=0)
    else:
        # No display range in the header: the output must still be a monotonic function of the modality
        # values (decreasing when displayed inverted), spanning most of [0, 1].
        values = apply_modality_lut(ds.pixel_array.astype(np.int64), ds).astype(np.float64).ravel()
        order = np.argsort(values, kind="stable")
        out = gray.ravel()[order].astype(np.float64)
        steps = np.diff(out) * (-1 if inverted else 1)
        assert steps.min() >= -1e-6
        assert gray.max() - gray.min() > 0.9


def test_unused_high_bits_are_ignored() -> None:
    """12 bits stored in 16 allocated with garbage in bits 12-15 (overlay bits, old modalities)."""
    ds = build("MONOCHROME2", None, "none", "window_linear", False, 12)
    clean = dicom_to_gray(ds)
    arr = np.frombuffer(ds.PixelData, "<u2") | np.uint16(0xA000)
    ds.PixelData = arr.tobytes()
    np.testing.assert_allclose(dicom_to_gray(ds), clean, atol=1e-6)


@pytest.mark.parametrize("signed", SIGNED)
def test_modality_lut_with_12_bits_per_entry(signed: bool) -> None:
    """A Modality LUT Descriptor of 12 bits per entry (older files; pydicom 3.0 raises on it) renders
    like the same table declared with 16 bits."""
    for voi in ("none", "window_linear"):
        twelve = build("MONOCHROME2", None, "lut_sequence", voi, signed, 12, lut_bits=12, lut_top=4095)
        sixteen = build("MONOCHROME2", None, "lut_sequence", voi, signed, 12, lut_bits=16, lut_top=4095)
        if voi != "none":
            sixteen.WindowCenter, sixteen.WindowWidth = twelve.WindowCenter, twelve.WindowWidth
        np.testing.assert_allclose(dicom_to_gray(twelve), dicom_to_gray(sixteen), atol=1e-6)


def _read(name: str) -> Dataset:
    return pydicom.dcmread(FIELD_CASES / name)


def test_dx_monochrome1_inverse_gives_the_control_picture() -> None:
    control = dicom_to_gray(_read("c04_dx_mono2_identity-control.dcm"))
    mono1 = dicom_to_gray(_read("c04_dx_mono1_inverse.dcm"))
    # Stored MONOCHROME1 = 1023 - control, window centres 512 vs 511: one 1/1023 step apart at most.
    np.testing.assert_allclose(mono1, control, atol=1.5 / 1023, rtol=0)
    # bone bright: the femoral neck (centre) bright, the direct exposure below the thigh (lower left) dark
    h, w = control.shape
    femur = mono1[int(0.4 * h) : int(0.5 * h), int(0.45 * w) : int(0.55 * w)].mean()
    air = mono1[int(0.85 * h) : int(0.95 * h), int(0.1 * w) : int(0.3 * w)].mean()
    assert femur > 0.4 and air < 0.15


def test_dx_monochrome1_inverse_gives_the_control_probability() -> None:
    import torch

    from pacs_ai.infer.engine import InferenceEngine
    from pacs_ai.infer.preprocess import prepare

    engine = InferenceEngine([REFERENCE_MODEL], device="cpu", threads=1)
    try:
        prepared = [prepare(dicom_to_gray(_read(n)), engine.spec) for n in ("c04_dx_mono2_identity-control.dcm", "c04_dx_mono1_inverse.dcm")]
        assert np.abs(prepared[0].display.astype(int) - prepared[1].display.astype(int)).max() <= 1
        with torch.inference_mode():
            control, mono1 = engine.predict(prepared, with_cam=False)
    finally:
        engine.close()
    assert mono1.probability == pytest.approx(control.probability, abs=0.01)
    assert mono1.fractured == control.fractured
