"""Tests for pacs_ai.infer.preprocess: decoding, windowing, letterbox, normalisation, CAM mapping."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs_ai.errors import InputError
from pacs_ai.infer.preprocess import (
    Geometry,
    InputSpec,
    cam_to_original,
    dicom_to_gray,
    image_file_to_gray,
    letterbox,
    normalise,
    prepare,
)

TEST_DATA = Path(__file__).resolve().parent / "data"
WG04 = TEST_DATA / "wg04"  # the WG-04 images 8x smaller, in their five encodings (tests/data/make_samples.py)
UNDECODABLE = TEST_DATA / "undecodable"


def make_ds(arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **extra: object) -> Dataset:
    """A minimal single-frame greyscale image dataset holding ``arr`` (uint8/uint16/int16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = arr.tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def ramp(h: int = 64, w: int = 48, top: int = 1023, dtype: type = np.uint16) -> np.ndarray:
    return np.linspace(0, top, h * w).reshape(h, w).astype(dtype)


def test_monochrome2_10bit_window_linear() -> None:
    arr = ramp()
    g = dicom_to_gray(make_ds(arr, bits_stored=10, WindowCenter=511.5, WindowWidth=1024))
    assert g.dtype == np.float32 and g.shape == arr.shape
    assert g.min() == pytest.approx(0.0, abs=1e-3) and g.max() == pytest.approx(1.0, abs=1e-3)
    assert np.all(np.diff(g.ravel()) >= 0)  # monotonic: brighter stays brighter


def test_monochrome1_is_inverted_so_bone_is_bright() -> None:
    arr = ramp()
    m2 = dicom_to_gray(make_ds(arr, "MONOCHROME2", bits_stored=10))
    m1 = dicom_to_gray(make_ds((1023 - arr).astype(np.uint16), "MONOCHROME1", bits_stored=10))
    np.testing.assert_allclose(m1, m2, atol=2e-2)


def test_presentation_lut_inverse_flips() -> None:
    arr = ramp()
    plain = dicom_to_gray(make_ds(arr, bits_stored=10))
    inv = dicom_to_gray(make_ds(arr, bits_stored=10, PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(plain, 1.0 - inv, atol=1e-6)


def test_no_window_uses_robust_percentiles() -> None:
    arr = ramp(top=4000)
    arr[0, 0] = 65535  # one hot pixel must not squash the range
    g = dicom_to_gray(make_ds(arr))
    assert np.median(g) == pytest.approx(0.5, abs=0.05)
    assert g.max() <= 1.0 and g.min() >= 0.0


def test_signed_12bit_with_rescale_and_window() -> None:
    arr = np.linspace(-2048, 2047, 64 * 64).reshape(64, 64).astype(np.int16)
    ds = make_ds(arr, bits_stored=12, RescaleSlope=2, RescaleIntercept=100, WindowCenter=100, WindowWidth=8192)
    g = dicom_to_gray(ds)
    assert 0.0 <= g.min() < 0.05 and 0.95 < g.max() <= 1.0
    assert np.all(np.diff(g.ravel()) >= 0)


def test_8bit_and_sigmoid_window() -> None:
    arr = ramp(top=255, dtype=np.uint8)
    g = dicom_to_gray(make_ds(arr, WindowCenter=128, WindowWidth=64, VOILUTFunction="SIGMOID"))
    assert g[0, 0] < 0.01 and g[-1, -1] > 0.99


@pytest.mark.parametrize(
    ("ds_kwargs", "reason"),
    [
        ({"photometric": "RGB"}, "unsupported_photometric"),
        ({"photometric": "PALETTE COLOR"}, "unsupported_photometric"),
        ({"NumberOfFrames": 3}, "multi_frame"),
    ],
)
def test_refused_inputs(ds_kwargs: dict, reason: str) -> None:
    photometric = ds_kwargs.pop("photometric", "MONOCHROME2")
    with pytest.raises(InputError) as ei:
        dicom_to_gray(make_ds(ramp(), photometric, **ds_kwargs))
    assert ei.value.reason == reason


def test_missing_pixel_data_and_tiny_image() -> None:
    ds = make_ds(ramp())
    del ds.PixelData
    with pytest.raises(InputError) as ei:
        dicom_to_gray(ds)
    assert ei.value.reason == "missing_pixel_data"
    with pytest.raises(InputError) as ei:
        dicom_to_gray(make_ds(np.zeros((1, 1), np.uint16)))
    assert ei.value.reason == "unsupported_image"


def test_truncated_pixel_data_is_undecodable() -> None:
    ds = make_ds(ramp())
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(InputError) as ei:
        dicom_to_gray(ds)
    assert ei.value.reason == "undecodable_pixel_data"


def test_letterbox_keeps_aspect_and_pads() -> None:
    gray = np.ones((100, 200), np.float32)
    spec = InputSpec(size=64, clahe=False)
    img, geom = letterbox(gray, spec)
    assert img.shape == (64, 64) and img.dtype == np.uint8
    assert (geom.new_h, geom.new_w) == (32, 64) and geom.pad_top == 16 and geom.pad_left == 0
    assert img[:16].max() == 0 and img[-16:].max() == 0 and img[16:48].min() == 255


def test_prepare_shapes_and_normalisation() -> None:
    rng = np.random.default_rng(0)
    gray = rng.random((300, 180)).astype(np.float32)
    spec = InputSpec(size=96)
    p = prepare(gray, spec)
    assert p.tensor.shape == (3, 96, 96) and p.tensor.dtype == torch.float32
    assert p.display.shape == gray.shape and p.display.dtype == np.uint8
    assert torch.isfinite(p.tensor).all()
    # channel c = (x - mean_c) / std_c with the same x in all channels
    x0 = p.tensor[0] * spec.std[0] + spec.mean[0]
    x2 = p.tensor[2] * spec.std[2] + spec.mean[2]
    torch.testing.assert_close(x0, x2, atol=1e-5, rtol=0)
    batch = normalise(np.stack([letterbox(gray, spec)[0]] * 2), spec)
    assert batch.shape == (2, 3, 96, 96)
    torch.testing.assert_close(batch[0], p.tensor)


def test_input_spec_round_trip_and_validation() -> None:
    spec = InputSpec(size=192, clahe_clip=3.0)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="size"):
        InputSpec(size=3)
    with pytest.raises(ValueError, match="std"):
        InputSpec(std=(0.1, 0.0, 0.2))
    with pytest.raises(ValueError, match="bogus"):
        InputSpec.from_dict({"bogus": 1})


def test_cam_to_original_maps_hot_spot_back() -> None:
    h, w = 400, 250
    geom = Geometry.for_image(h, w, 128)
    # a hot spot at original (y=300, x=50) placed on the network grid
    cam = np.zeros((128, 128), np.float32)
    y = int(300 * geom.scale) + geom.pad_top
    x = int(50 * geom.scale) + geom.pad_left
    cam[y - 2 : y + 3, x - 2 : x + 3] = 1.0
    back = cam_to_original(cam, geom)
    assert back.shape == (h, w)
    yy, xx = np.unravel_index(np.argmax(back), back.shape)
    assert abs(yy - 300) <= 8 and abs(xx - 50) <= 8
    small = cam_to_original(np.ones((7, 7), np.float32), geom)
    assert small.shape == (h, w)


def test_image_file_to_gray(tmp_path: Path) -> None:
    img8 = (ramp(top=255, dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "a.png"), img8)
    g = image_file_to_gray(tmp_path / "a.png")
    assert g.dtype == np.float32 and g.max() == pytest.approx(1.0) and g.min() == 0.0
    img16 = (ramp(top=65535, dtype=np.uint16))
    cv2.imwrite(str(tmp_path / "b.png"), img16)
    assert image_file_to_gray(tmp_path / "b.png").max() == pytest.approx(1.0)
    (tmp_path / "c.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError) as ei:
        image_file_to_gray(tmp_path / "c.jpg")
    assert ei.value.reason == "unreadable_image"


def test_real_dicom_every_transfer_syntax_same_input() -> None:
    spec = InputSpec()
    for image in ("RG2", "RG3"):
        tensors = [prepare(dicom_to_gray(pydicom.dcmread(f)), spec).tensor for f in sorted(WG04.glob(f"{image}_*.dcm"))]
        assert len(tensors) == 5
        for t in tensors[1:]:
            torch.testing.assert_close(t, tensors[0])


def test_real_monochrome1_has_bright_bone() -> None:
    # In the MONOCHROME1 tibia, raw values are high for air; after inversion the image centre (bone and
    # soft tissue) must be brighter than the corners (air / collimation).
    g = dicom_to_gray(pydicom.dcmread(WG04 / "RG3_UNC.dcm"))
    h, w = g.shape
    centre = g[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean()
    assert centre > 0.3


def test_real_undecodable() -> None:
    files = sorted(UNDECODABLE.glob("*.dcm"))
    assert len(files) == 2
    for f in files:
        with pytest.raises(InputError) as ei:
            dicom_to_gray(pydicom.dcmread(f))
        assert ei.value.reason == "undecodable_pixel_data"
