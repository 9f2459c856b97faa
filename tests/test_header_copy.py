"""Header values copied from the source never stop a result (issue 10, point 1).

Every attribute the result objects copy from the source (``PATIENT_STUDY_KEYWORDS`` plus the SC's series
attributes) is given, one kind at a time, a value of each kind seen in the field: over-long, control
characters, non-ASCII bytes without a character set, two values where one is allowed, values not among
the enumerated ones, lowercase code strings, impossible and ISO-formatted dates and times, numbers with a
decimal comma, a wrong VR (text re-labelled, and binary bytes), and the harmless variants that must be
kept: NUL padding, odd length without padding, UN or LO as VR of a code string. Every kind is written into
the source file as raw bytes (as a modality would send them), read back, and ``write_results`` must build
the SC and the SR, and ``dciodvfy`` must report no error in either. Each attribute must then either be
copied with its value bytes (apart from padding) or be listed, blanked or removed, in one log line that
names it and does not contain the value.

The expected judgement comes from dciodvfy (dicom3tools), not from the code under test. Character sets are
covered separately: standard terms (kept, name bytes identical), an empty first value, misspelt and
unknown terms.
"""

from __future__ import annotations

import io
import logging
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs_ai.infer.preprocess import InputSpec, dicom_to_gray, prepare
from pacs_ai.write.common import PATIENT_STUDY_KEYWORDS
from pacs_ai.write.results import write_results
from pacs_ai.write.secondary_capture import SERIES_ATTRIBUTES
from support.predictions import synthetic_prediction

FIELD_CASES = Path(__file__).resolve().parent / "data" / "field_cases"
BASE = FIELD_CASES / "c16_study_view1.dcm"

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")

# Every attribute copied, minus Study Instance UID (Type 1: the listener refuses a bad one with 0xC001) and
# Ethnic Group Code Sequence (added to the standard in 2024: the dciodvfy of Debian 12, 2022, does not
# know it and reports it as an error even though the result is valid).
COPIED = [k for k in (*PATIENT_STUDY_KEYWORDS, *SERIES_ATTRIBUTES) if k not in ("StudyInstanceUID", "EthnicGroupCodeSequence")]

# A valid value per attribute where the VR's default is not valid for it (enumerated/defined terms).
VALID: dict[str, bytes] = {
    "PatientSex": b"F",
    "QualityControlSubject": b"NO",
    "PatientIdentityRemoved": b"NO",
    "PatientSexNeutered": b"ALTERED",
    "SmokingStatus": b"NO",
    "TypeOfPatientID": b"TEXT",
    "Laterality": b"R",
    "BodyPartExamined": b"HIP",
    "LongitudinalTemporalEventType": b"BASELINE",
    "PatientAlternativeCalendar": b"I",
    "ResponsiblePersonRole": b"OWNER",
    "TimezoneOffsetFromUTC": b"+0100",
}
VR_VALID: dict[str, bytes] = {
    "AE": b"AE1", "AS": b"045Y", "CS": b"ABC", "DA": b"20240314", "DS": b"1.5", "DT": b"20240314101530",
    "IS": b"12", "LO": b"Long string", "LT": b"Long text", "PN": b"Doe^John", "SH": b"Short", "ST": b"Short text",
    "TM": b"101530", "UC": b"Unlimited", "UI": b"1.2.3.4", "UR": b"http://x.y/", "UT": b"Unlimited text",
}
MAX_LEN = {"AE": 16, "CS": 16, "DS": 16, "IS": 12, "LO": 64, "LT": 10240, "SH": 16, "ST": 1024, "UI": 64, "PN": 64, "AS": 4}
ENUMERATED = {"PatientSex", "QualityControlSubject", "PatientIdentityRemoved", "PatientSexNeutered", "SmokingStatus",
              "TypeOfPatientID", "Laterality", "LongitudinalTemporalEventType"}
STRING_VRS = set(VR_VALID)
VALID_BINARY = {"US": struct.pack("<H", 4), "FD": struct.pack("<d", 1.5)}
SEQUENCE_BAD = {"control_characters"}


def _vr(keyword: str) -> str:
    return dictionary_VR(tag_for_keyword(keyword))


def _valid(keyword: str) -> bytes:
    return VALID.get(keyword) or VR_VALID[_vr(keyword)]


@dataclass(frozen=True)
class Bad:
    """A kind of field value: ``make(keyword) -> (VR written, value bytes)`` or None when not applicable."""

    name: str
    kept: bool  # True: the standard allows copying it (must be copied, not blanked)
    make: object

    def __call__(self, keyword: str) -> tuple[str, bytes] | None:
        return self.make(keyword)  # type: ignore[operator]


def _text(fn):  # type: ignore[no-untyped-def]
    """Apply ``fn(keyword, vr)`` to string-VR attributes only."""
    def make(keyword: str) -> tuple[str, bytes] | None:
        vr = _vr(keyword)
        if vr not in STRING_VRS:
            return None
        value = fn(keyword, vr)
        return None if value is None else (vr, value)
    return make


def _over_long(keyword: str, vr: str) -> bytes | None:
    if vr == "PN":
        return b"A" * 70 + b"^John"
    if vr in ("DA", "TM", "DT"):
        return b"2" * 30
    n = MAX_LEN.get(vr)
    return (b"A" if vr != "DS" and vr != "IS" else b"1") * (n + 5) if n else None


def _dates(which: str):  # type: ignore[no-untyped-def]
    table = {
        "impossible": {"DA": b"20240230", "TM": b"256161", "DT": b"20241301101530"},
        "iso": {"DA": b"2024-03-14", "TM": b"10:15:30", "DT": b"2024-03-14T10:15:30"},
    }[which]
    return _text(lambda k, vr: table.get(vr))


def _numbers(keyword: str, vr: str) -> bytes | None:
    return {"DS": b"1,5", "IS": b"1.0", "AS": b"45"}.get(vr)


def _two_values(keyword: str, vr: str) -> bytes | None:
    vm = dictionary_VM(tag_for_keyword(keyword))
    if vm != "1" or vr in ("LT", "ST", "UT", "UR"):
        return None
    return _valid(keyword) + b"\\" + _valid(keyword)


def _wrong_vr_text(keyword: str) -> tuple[str, bytes] | None:
    vr = _vr(keyword)
    if vr not in STRING_VRS:
        return None
    return ("UN" if vr != "LO" else "SH"), _valid(keyword)


def _wrong_vr_binary(keyword: str) -> tuple[str, bytes] | None:
    vr = _vr(keyword)
    return ("FD", struct.pack("<d", 3.25)) if vr in STRING_VRS and vr not in ("LT", "ST", "UT") else None


def _sequence_item(bad: bool) -> Dataset:
    item = Dataset()
    item.CodeValue = "123"
    item.CodingSchemeDesignator = "99TEST"
    meaning = b"Bad\x07meaning" if bad else b"Meaning"
    item[0x00080104] = RawDataElement(0x00080104, "LO", len(meaning), meaning, 0, False, True)
    return item


BADS = [
    Bad("over_long", False, _text(_over_long)),
    Bad("control_characters", False, _text(lambda k, vr: b"AB\x07CD" if vr not in ("DA", "TM", "DT") else b"2024\x0703")),
    Bad("latin1_without_charset", False, _text(lambda k, vr: b"M\xfcller" if vr in ("LO", "SH", "PN", "LT", "ST", "UT", "UC") else None)),
    Bad("two_values_for_vm1", False, _text(_two_values)),
    Bad("not_enumerated", False, _text(lambda k, vr: b"U" if k in ENUMERATED else None)),
    Bad("lowercase_code_string", False, _text(lambda k, vr: _valid(k).lower() if vr == "CS" else None)),
    Bad("impossible_date_time", False, _dates("impossible")),
    Bad("iso_formatted_date_time", False, _dates("iso")),
    Bad("decimal_comma_and_bad_numbers", False, _text(_numbers)),
    Bad("binary_bytes_under_wrong_vr", False, _wrong_vr_binary),
    Bad("nul_padding", True, _text(lambda k, vr: _valid(k) + b"\x00" if vr != "UI" else None)),
    Bad("odd_length_unpadded", True, _text(lambda k, vr: _valid(k) + b"Z" if vr in ("LO", "SH", "LT", "ST", "UT", "UC") else None)),
    Bad("text_relabelled_un_or_sh", True, _wrong_vr_text),
]


def _source_with(bad: Bad) -> tuple[pydicom.Dataset, dict[str, bytes]]:
    """The base radiograph with every applicable copied attribute set to ``bad``; written and read back."""
    ds = pydicom.dcmread(BASE)
    if "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds.BreedRegistrationSequence = []  # Type 2C for an animal (the planted species): empty is valid
    planted: dict[str, bytes] = {}
    for keyword in COPIED:
        tag = tag_for_keyword(keyword)
        vr = _vr(keyword)
        if vr == "SQ":
            if keyword.endswith("CodeSequence"):  # items any code fits (other sequences need their own items)
                ds[tag] = pydicom.DataElement(tag, "SQ", Sequence([_sequence_item(bad.name in SEQUENCE_BAD)]))
                if bad.name in SEQUENCE_BAD or bad.kept:
                    planted[keyword] = b""
            continue
        made = bad(keyword)
        if made is None:
            # Not applicable: a valid value, so that the header is complete and consistent (1C/2C relations).
            made = (vr, VALID_BINARY[vr]) if vr in VALID_BINARY else (vr, _valid(keyword))
        else:
            planted[keyword] = made[1]
        vr, value = made
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue())), planted


def _dciodvfy_errors(path: str | Path) -> list[str]:
    out = subprocess.run(["dciodvfy", path], capture_output=True, text=True, errors="replace", timeout=60, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _raw_value(ds: pydicom.Dataset, keyword: str) -> bytes | None:
    tag = tag_for_keyword(keyword)
    if tag not in ds:
        return None
    elem = ds.get_item(tag)
    return bytes(elem.value or b"") if elem.is_raw else None


_PREPARED: dict[str, object] = {}


def _prepared(ds: pydicom.Dataset) -> object:
    if "p" not in _PREPARED:
        _PREPARED["p"] = prepare(dicom_to_gray(ds), InputSpec())
    return _PREPARED["p"]


COMBINATIONS = sum(
    1 for bad in BADS for k in COPIED
    if bad(k) is not None or (k.endswith("CodeSequence") and (bad.name in SEQUENCE_BAD or bad.kept))
)


def test_combination_count() -> None:
    # The number of (attribute, kind) pairs tried; printed for the report.
    print(f"\n{len(COPIED)} attributes x {len(BADS)} kinds: {COMBINATIONS} applicable combinations")
    assert COMBINATIONS > 400


@needs_dciodvfy
@pytest.mark.parametrize("bad", BADS, ids=[b.name for b in BADS])
def test_bad_header_values_never_stop_a_result(bad: Bad, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source, planted = _source_with(bad)
    assert planted, "the kind applies to no attribute"
    caplog.set_level(logging.WARNING, logger="pacs_ai.write.header")
    out = write_results(source, _prepared(source), synthetic_prediction("densenet121", True), tmp_path).files
    for kind in ("sc", "sr"):
        assert _dciodvfy_errors(getattr(out, kind)) == [], f"{kind}: dciodvfy errors for {bad.name}"

    logged = [r.getMessage() for r in caplog.records]
    for kind, what in (("sc", "Secondary Capture"), ("sr", "Structured Report")):
        result = pydicom.dcmread(getattr(out, kind))
        lines = [m for m in logged if m.startswith(f"{what} header: ")]
        for keyword, value in planted.items():
            if keyword in SERIES_ATTRIBUTES and kind == "sr":
                continue
            named = [m for m in lines if m.split(": ", 1)[1].startswith(f"{keyword} ")]
            changed = [m for m in named if " blanked: " in m or " removed: " in m]
            if bad.kept:
                assert not changed, f"{kind} {keyword}: {bad.name} must be copied, got {changed}"
                assert keyword in result, f"{kind} {keyword} missing"
                if value:
                    got = _raw_value(result, keyword)
                    assert got is not None and got.rstrip(b"\x00 ") == value.rstrip(b"\x00 "), f"{kind} {keyword}: bytes changed"
            else:
                kept_as_is = keyword in result and _raw_value(result, keyword) is not None and (
                    _raw_value(result, keyword).rstrip(b"\x00 ") == value.rstrip(b"\x00 ")
                )
                assert kept_as_is or len(changed) == 1, f"{kind} {keyword}: neither copied nor reported once ({named})"
                if changed:
                    if " blanked: " in changed[0]:
                        assert keyword in result and result[keyword].is_empty
                    else:
                        assert keyword not in result
            for line in named:
                if value and len(value) >= 3:
                    assert value.decode("latin-1") not in line, "a value (possibly PHI) was logged"


# ----------------------------------------------------------------------------------------------------
# Character sets
# ----------------------------------------------------------------------------------------------------

JAPANESE_NAME = b"Anon^Case=\x1b$B;n83\x1b(B^\x1b$B45<T\x1b(B=\x1b$B$7$1$s\x1b(B^\x1b$B$+$s$8$c\x1b(B"
CHARSETS = [
    # (Specific Character Set as received, name bytes, expected charset in the results, name kept)
    (["", "ISO 2022 IR 87"], JAPANESE_NAME, ["", "ISO 2022 IR 87"], True),
    (["ISO 2022 IR 6", "ISO 2022 IR 87"], JAPANESE_NAME, ["ISO 2022 IR 6", "ISO 2022 IR 87"], True),
    (["ISO_IR 100"], b"M\xfcller^Hans", ["ISO_IR 100"], True),
    (["ISO_IR 192"], "Müller^Jürgen".encode(), ["ISO_IR 192"], True),
    (["GB18030"], "王^小明".encode("gb18030"), ["GB18030"], True),
    (["UTF-8"], "Müller^Jürgen".encode(), ["ISO_IR 192"], True),
    (["ISO-IR 100"], b"M\xfcller^Hans", ["ISO_IR 100"], True),
    (["iso_ir 100"], b"M\xfcller^Hans", ["ISO_IR 100"], True),
    (["NOT A CHARSET"], b"M\xfcller^Hans", None, False),
    (["NOT A CHARSET"], b"Plain^Ascii", None, True),
    ([""], b"Plain^Ascii", None, True),
    (["ISO_IR 192"], b"M\xfcller^Hans", ["ISO_IR 192"], False),  # latin-1 bytes are not UTF-8
]


@needs_dciodvfy
@pytest.mark.parametrize(("charset", "name", "expected", "kept"), CHARSETS, ids=[f"{'|'.join(c[0]) or 'empty'}-{i}" for i, c in enumerate(CHARSETS)])
def test_character_sets(charset: list[str], name: bytes, expected: list[str] | None, kept: bool, tmp_path: Path) -> None:
    ds = pydicom.dcmread(BASE)
    value = "\\".join(charset).encode()
    ds[0x00080005] = RawDataElement(0x00080005, "CS", len(value), value, 0, False, True)
    ds[0x00100010] = RawDataElement(0x00100010, "PN", len(name), name, 0, False, True)
    # Write the planted bytes as they are (pydicom would re-encode raw text for a changed character set).
    ds._read_charset = ds._character_set
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    source = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    out = write_results(source, _prepared(source), synthetic_prediction("resnet50", False), tmp_path).files
    for kind in ("sc", "sr"):
        assert _dciodvfy_errors(getattr(out, kind)) == [], f"{kind}: dciodvfy errors"
        result = pydicom.dcmread(getattr(out, kind))
        got = result.get("SpecificCharacterSet")
        got_list = None if got is None else ([got] if isinstance(got, str) else list(got))
        assert got_list == expected
        if kept:
            assert _raw_value(result, "PatientName").rstrip(b" ") == name, "name bytes changed"
        else:
            assert result["PatientName"].is_empty


def test_field_cases_keep_charset_and_name_bytes(tmp_path: Path) -> None:
    """c07/c07b: the results carry the source's Specific Character Set and Patient's Name bytes unchanged."""
    for name in ("c07_iso2022_ir87.dcm", "c07b_iso2022_ir6_ir87.dcm"):
        source = pydicom.dcmread(FIELD_CASES / name)
        raw = _raw_value(source, "PatientName")
        charset = list(source.SpecificCharacterSet)
        out = write_results(source, _prepared(source), synthetic_prediction("vgg16", True), tmp_path / name).files
        for kind in ("sc", "sr"):
            result = pydicom.dcmread(getattr(out, kind))
            assert list(result.SpecificCharacterSet) == charset
            assert _raw_value(result, "PatientName") == raw


def test_sex_u_is_blanked_and_logged_without_the_value(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = pydicom.dcmread(FIELD_CASES / "c01_patient_sex_u.dcm")
    caplog.set_level(logging.WARNING, logger="pacs_ai.write.header")
    out = write_results(source, _prepared(source), synthetic_prediction("resnet50", True), tmp_path).files
    for kind in ("sc", "sr"):
        result = pydicom.dcmread(getattr(out, kind))
        assert "PatientSex" in result and result["PatientSex"].is_empty
        assert result.PatientID == source.PatientID and result.PatientName == source.PatientName
    lines = [r.getMessage() for r in caplog.records if "PatientSex" in r.getMessage()]
    assert len(lines) == 2 and all("blanked" in m and "enumerated" in m for m in lines)
    assert np.all(["'U'" not in m and "<U>" not in m for m in lines])
