"""The content digest ignores a trailing Data Set Trailing Padding element and nothing else."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import write_dataset

from pacs_ai.store.digest import dataset_digest, trailing_padding_start

SAMPLE = Path(__file__).parent / "data" / "cr_hip_mono2_small.dcm"


def encode(ds: pydicom.Dataset, implicit_vr: bool) -> bytes:
    """The data set as it goes on the wire (no file meta), encoded by pydicom (independent of the digest)."""
    ds_copy = pydicom.Dataset(ds)
    fp = pydicom.filebase.DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit_vr, True
    write_dataset(fp, ds_copy)
    return fp.getvalue()


@pytest.mark.parametrize("implicit_vr", [False, True])
@pytest.mark.parametrize("padding", [b"", b"\x00\x00", b"\xfc\xff\xfc\xff" * 8, b"\x00" * 70000])
def test_padding_is_ignored(implicit_vr: bool, padding: bytes) -> None:
    ds = pydicom.dcmread(SAMPLE)
    del ds[0xFFFCFFFC]  # the WG-04 sample carries padding of its own
    plain = encode(ds, implicit_vr)
    padded_ds = pydicom.dcmread(SAMPLE)
    padded_ds.DataSetTrailingPadding = padding
    padded = encode(padded_ds, implicit_vr)
    assert padded != plain
    # independent expectation: the padded encoding is the plain one plus one element at the end
    assert padded.startswith(plain)
    assert dataset_digest(padded, implicit_vr=implicit_vr, little_endian=True) == hashlib.sha256(plain).hexdigest()
    assert trailing_padding_start(padded, implicit_vr=implicit_vr, little_endian=True) == len(plain)


def test_content_changes_and_lookalike_bytes_still_count() -> None:
    ds = pydicom.dcmread(SAMPLE)
    del ds[0xFFFCFFFC]
    plain = encode(ds, False)
    ds.StudyDescription = "HIP (corrected)"
    assert dataset_digest(encode(ds, False), implicit_vr=False, little_endian=True) != hashlib.sha256(plain).hexdigest()
    # bytes that look like the padding tag at the end but do not form a complete element are content
    tail = plain + b"\xfc\xff\xfc\xffOB\x00\x00" + (99).to_bytes(4, "little") + b"\x00" * 10
    assert trailing_padding_start(tail, implicit_vr=False, little_endian=True) == len(tail)
    assert dataset_digest(tail, implicit_vr=False, little_endian=True, deflated=True) == hashlib.sha256(tail).hexdigest()
