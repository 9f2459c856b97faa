"""The content digest ignores how a conformant sender encodes the data set, and nothing else.

Ignored: a top-level Data Set Trailing Padding element, defined vs undefined sequence and item lengths
(with their delimitation items), group lengths, the deflate settings. Counted: every value, also inside
sequence items, and the transfer syntax. Expectations come from pydicom's own encoding and reading.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import write_dataset

from pacs_ai.store.digest import dataset_digest, trailing_padding_start

SAMPLE = Path(__file__).parent / "data" / "cr_hip_mono2_small.dcm"
WITH_SEQUENCES = [Path(__file__).parent / "data" / "wg04" / f"RG2_{s}.dcm" for s in ("J2KR", "JLSL", "RLE")]


def encode(ds: pydicom.Dataset, implicit_vr: bool) -> bytes:
    """The data set as it goes on the wire (no file meta), encoded by pydicom (independent of the digest)."""
    ds_copy = pydicom.Dataset(ds)
    fp = pydicom.filebase.DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit_vr, True
    write_dataset(fp, ds_copy)
    return fp.getvalue()


def digest(encoded: bytes, implicit_vr: bool = False) -> str:
    return dataset_digest(encoded, implicit_vr=implicit_vr, little_endian=True)


def set_sequence_lengths(ds: pydicom.Dataset, undefined: bool) -> None:
    """Make pydicom write every sequence and item of ``ds`` with undefined (or defined) length."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = undefined
            for item in elem.value:
                item.is_undefined_length_sequence_item = undefined


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
    assert digest(padded, implicit_vr) == digest(plain, implicit_vr)
    assert trailing_padding_start(padded, implicit_vr=implicit_vr, little_endian=True) == len(plain)


def test_content_changes_and_lookalike_bytes_still_count() -> None:
    ds = pydicom.dcmread(SAMPLE)
    del ds[0xFFFCFFFC]
    plain = encode(ds, False)
    ds.StudyDescription = "HIP (corrected)"
    assert digest(encode(ds, False)) != digest(plain)
    # bytes that look like the padding tag at the end but do not form a complete element are content
    tail = plain + b"\xfc\xff\xfc\xffOB\x00\x00" + (99).to_bytes(4, "little") + b"\x00" * 10
    assert trailing_padding_start(tail, implicit_vr=False, little_endian=True) == len(tail)
    assert digest(tail) != digest(plain)


@pytest.mark.parametrize("implicit_vr", [False, True])
@pytest.mark.parametrize("path", WITH_SEQUENCES, ids=lambda p: p.stem)
def test_sequence_length_encoding_is_ignored(path: Path, implicit_vr: bool) -> None:
    """Defined vs undefined sequence/item lengths (what dcmtk's storescu rewrites) give the same digest."""
    undefined_ds, defined_ds = pydicom.dcmread(path), pydicom.dcmread(path)
    set_sequence_lengths(undefined_ds, undefined=True)
    set_sequence_lengths(defined_ds, undefined=False)
    undefined, defined = encode(undefined_ds, implicit_vr), encode(defined_ds, implicit_vr)
    # independent facts: the bytes differ (delimiters: 8 bytes per item and per sequence), the values do not
    assert undefined != defined and len(undefined) > len(defined)
    assert b"\xfe\xff\xdd\xe0" in undefined.split(b"\xe0\x7f\x10\x00")[0]  # a sequence delimiter before Pixel Data
    reread = [pydicom.dataset.Dataset(pydicom.filereader.read_dataset(pydicom.filebase.DicomBytesIO(b), implicit_vr, True))
              for b in (undefined, defined)]
    assert reread[0] == reread[1]
    assert digest(undefined, implicit_vr) == digest(defined, implicit_vr)


def test_group_lengths_are_ignored() -> None:
    plain = encode(pydicom.dcmread(WITH_SEQUENCES[0]), False)
    assert plain.startswith(b"\x08\x00")  # the data set starts with group 0008
    # a retired group length element (PS3.5 7.2), explicit VR little endian, in front of group 0008
    with_group_length = b"\x08\x00\x00\x00UL\x04\x00" + (1234).to_bytes(4, "little") + plain
    assert pydicom.filereader.read_dataset(pydicom.filebase.DicomBytesIO(with_group_length), False, True)[0x00080000].value == 1234
    assert digest(with_group_length) == digest(plain)


@pytest.mark.parametrize("undefined", [False, True])
@pytest.mark.parametrize(
    "change",
    [
        lambda ds: setattr(ds.SourceImageSequence[0], "ReferencedSOPInstanceUID", ds.SourceImageSequence[0].ReferencedSOPInstanceUID[:-1] + "9"),
        lambda ds: setattr(ds.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0], "CodeValue", "121321"),
        lambda ds: ds.SourceImageSequence.append(pydicom.Dataset(ds.SourceImageSequence[0])),
        lambda ds: ds.SourceImageSequence[0].__delitem__("PurposeOfReferenceCodeSequence"),
        lambda ds: setattr(ds, "SourceImageSequence", []),
    ],
    ids=["uid-in-item", "nested-code-value", "extra-item", "item-element-removed", "empty-sequence"],
)
def test_any_change_inside_a_sequence_counts(change, undefined: bool) -> None:  # type: ignore[no-untyped-def]
    original, changed = pydicom.dcmread(WITH_SEQUENCES[0]), pydicom.dcmread(WITH_SEQUENCES[0])
    change(changed)
    assert original != changed  # independent fact: pydicom sees another data set
    set_sequence_lengths(original, undefined)
    set_sequence_lengths(changed, undefined)
    assert digest(encode(original, False)) != digest(encode(changed, False))


def test_moving_an_element_between_items_counts() -> None:
    """Same elements, other item boundaries: another data set, another digest."""
    one_item, two_items = pydicom.dcmread(SAMPLE), pydicom.dcmread(SAMPLE)
    a = pydicom.Dataset()
    a.CodeValue, a.CodingSchemeDesignator = "121320", "DCM"
    one_item.add_new(0x00082112, "SQ", pydicom.Sequence([a]))
    b1, b2 = pydicom.Dataset(), pydicom.Dataset()
    b1.CodeValue, b2.CodingSchemeDesignator = "121320", "DCM"
    two_items.add_new(0x00082112, "SQ", pydicom.Sequence([b1, b2]))
    assert digest(encode(one_item, False)) != digest(encode(two_items, False))


def test_transfer_syntax_still_counts() -> None:
    """The same data set in implicit and explicit VR is not the same reception (README: re-encoded = changed)."""
    ds = pydicom.dcmread(SAMPLE)
    assert digest(encode(ds, True), True) != digest(encode(ds, False), False)


def test_deflate_settings_are_ignored() -> None:
    plain = encode(pydicom.dcmread(WITH_SEQUENCES[0]), False)
    streams = []
    for level in (1, 9):
        packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        streams.append(packer.compress(plain) + packer.flush())
    assert streams[0] != streams[1]
    digests = {dataset_digest(s, implicit_vr=False, little_endian=True, deflated=True) for s in streams}
    assert digests == {digest(plain)}
    assert dataset_digest(b"not deflate", implicit_vr=False, little_endian=True, deflated=True)  # no exception
