"""How the small WG-04 samples in tests/data/wg04/ and tests/data/undecodable/ were made (issue 13).

    python tests/data/make_samples.py [--shared ../shared/data/dicom] [--out tests/data]

From the NEMA WG-04 compression test images in ``../shared/data/dicom`` (see tests/data/ATTRIBUTION.md):

- ``wg04/RG2_<ENC>.dcm`` and ``wg04/RG3_<ENC>.dcm``: for each of the ten originals (a MONOCHROME2 CR hip
  2140x1760 and a MONOCHROME1 CR tibia 1760x1760, each in five encodings), the header of that original file
  with the pixels of its ``*_UNC`` original downscaled 8x by block mean (rows cropped to a multiple of 8;
  values stay 10-bit), Rows/Columns/Pixel Spacing adjusted, every UID replaced by a deterministic new one
  (pydicom ``generate_uid`` with the original UID as entropy source, so they never collide with the
  full-size files), Image Comments saying so, then encoded in the original's transfer syntax:

  | ENC | transfer syntax | encoder |
  |---|---|---|
  | UNC | Explicit VR Little Endian | none |
  | RLE | RLE Lossless | pydicom (native RLE encoder) |
  | J2KR | JPEG 2000 Lossless | pydicom + pylibjpeg-openjpeg |
  | JLSL | JPEG-LS Lossless | pydicom + pyjpegls |
  | JPLL | JPEG Lossless, First-Order Prediction (SV1) | dcmtk ``dcmcjpeg +e1`` (no Python encoder) |

  Every encoded file is checked to decode to exactly the UNC pixels (all are lossless).
- ``undecodable/RG2_JPLY.dcm``, ``undecodable/RG3_JPLY.dcm``: byte copies of
  ``edge_cases_undecodable/*`` (12-bit lossy JPEG Extended that the Python decoders refuse; 92-207 KB, small
  enough as they are; transcoding would make them decodable and useless).

The script is deterministic apart from dcmtk's JPEG bytes (stable for one dcmtk version).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

HERE = Path(__file__).resolve().parent
SHARED_DICOM = HERE.parents[2] / "shared" / "data" / "dicom"
FACTOR = 8
IMAGES = {"RG2": "wg04_RG2_hip_CR", "RG3": "wg04_RG3_tibia_CR"}
ENCODINGS: dict[str, UID] = {
    "UNC": ExplicitVRLittleEndian,
    "RLE": RLELossless,
    "J2KR": JPEG2000Lossless,
    "JLSL": JPEGLSLossless,
    "JPLL": JPEGLosslessSV1,
}
UID_ENTROPY = "pacs-ai tests/data/wg04 8x"


def new_uid(original: str) -> str:
    """The small copy's UID for an original UID (deterministic; pydicom's UID root)."""
    return str(generate_uid(entropy_srcs=[UID_ENTROPY, str(original)]))


def block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor`` x ``factor`` blocks, rounded; rows/columns cropped to a multiple of ``factor``."""
    rows, cols = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    blocks = pixels[:rows, :cols].astype(np.float64).reshape(rows // factor, factor, cols // factor, factor)
    return np.rint(blocks.mean(axis=(1, 3))).astype(pixels.dtype)


def _remap_uids(ds: Dataset) -> None:
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.tag.group != 0x0002 and elem.tag not in (0x00080016, 0x00081150, 0x00080014):
            elem.value = new_uid(elem.value)  # SOP, study, series, frame of reference, referenced SOP instances


def small_copy(original: Path, pixels: np.ndarray, encoding: str) -> Dataset:
    ds = pydicom.dcmread(original, stop_before_pixels=True)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _remap_uids(ds)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds:
            ds[keyword].value = [f"{float(v) * FACTOR:.4f}" for v in ds[keyword].value]
    ds.ImageComments = (f"Downscaled {FACTOR}x (block mean) from NEMA WG-04 {original.stem.split('_')[0]}_UNC, "
                        f"encoded as the original {original.name} for pacs-ai tests (tests/data/make_samples.py)")
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def encode(ds: Dataset, syntax: UID, out: Path) -> None:
    if syntax == ExplicitVRLittleEndian:
        ds.save_as(out, enforce_file_format=True)
    elif syntax == JPEGLosslessSV1:
        with tempfile.TemporaryDirectory() as tmp:
            unc = Path(tmp) / "unc.dcm"
            ds.save_as(unc, enforce_file_format=True)
            subprocess.run(["dcmcjpeg", "+e1", "--uid-never", str(unc), str(out)], check=True, timeout=60)
    else:
        ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else "")
        ds.save_as(out, enforce_file_format=True)


def make(shared: Path, out_root: Path) -> list[Path]:
    made: list[Path] = []
    out = out_root / "wg04"
    out.mkdir(parents=True, exist_ok=True)
    for name, folder in IMAGES.items():
        pixels = block_mean(pydicom.dcmread(shared / folder / f"{name}_UNC.dcm").pixel_array, FACTOR)
        for enc, syntax in ENCODINGS.items():
            original = shared / folder / f"{name}_{enc}.dcm"
            target = out / f"{name}_{enc}.dcm"
            encode(small_copy(original, pixels, enc), syntax, target)
            check = pydicom.dcmread(target)
            assert check.file_meta.TransferSyntaxUID == syntax, (target, check.file_meta.TransferSyntaxUID)
            assert np.array_equal(check.pixel_array, pixels), f"{target.name} does not decode to the UNC pixels"
            made.append(target)
    bad = out_root / "undecodable"
    bad.mkdir(parents=True, exist_ok=True)
    for source in sorted((shared / "edge_cases_undecodable").glob("*.dcm")):
        made.append(Path(shutil.copyfile(source, bad / source.name)))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=SHARED_DICOM)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    for path in make(args.shared, args.out):
        print(f"{path.stat().st_size:8d}  {path.relative_to(args.out)}")


if __name__ == "__main__":
    main()
