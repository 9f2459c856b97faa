"""Copy header attributes from a source image into a result object without ever failing on them.

Real modalities and routers send values the standard does not allow: a Patient's Sex of ``U``, dates
such as ``20240230`` or ``2024-03-14``, strings longer than their VR allows, values with control
characters or NUL padding, attributes written with the wrong VR, non-standard Specific Character Set terms
(``UTF-8``, ``ISO-IR 100``). ``copy_attributes`` copies every attribute it is given that the standard lets
a result object carry *as received* (the value bytes and the character set preserved, so ISO 2022 escape
sequences survive untouched), repairs only what has one exact standard spelling (a value stored under the
wrong VR that is valid under the right one, a character set term that names a standard one), and blanks
(Type 2) or removes (Type 3) what cannot be encoded. Each change is returned as a ``HeaderFix`` and
logged once, naming the attribute and the reason, never the value (it may be PHI).

Rules (PS3.5 6.2 value representations, 6.4 value multiplicity, 6.1.2.5 character sets; PS3.3
C.7.1.1 enumerated values): the value must decode in the declared character set, each value must pass
pydicom's VR validation (length, characters), DA/TM/DT values must be real dates/times, no control
characters other than ESC (and CR, LF, FF, TAB in LT/ST/UT), the value multiplicity must fit the data
dictionary, enumerated attributes must hold one of their values. A sequence is kept only when every
element inside it passes the same checks.
"""

from __future__ import annotations

import codecs
import copy
import datetime
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom import config as pydicom_config
from pydicom.charset import python_encoding
from pydicom.datadict import (
    dictionary_has_tag,
    dictionary_VM,
    dictionary_VR,
    keyword_for_tag,
    tag_for_keyword,
)
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.tag import BaseTag
from pydicom.valuerep import validate_value

__all__ = ["ENUMERATED", "TYPE2", "HeaderFix", "conform_character_set", "copy_attributes"]

log = logging.getLogger(__name__)

TYPE2: frozenset[str] = frozenset(
    {
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
        "ReferringPhysicianName", "StudyID", "AccessionNumber",
        # Type 2 of the Clinical Trial Subject / Study modules (when present)
        "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialTimePointID",
        # Type 2C: required (possibly empty) when their condition holds, as it does in a source that has them
        "Laterality", "PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
        "ResponsiblePerson", "ResponsibleOrganization", "PatientSexNeutered",
    }
)
"""Type 2 and 2C attributes of the result IODs (Patient, General Study, General Series): blanked, never
removed."""

ENUMERATED: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O"}),  # PS3.3 C.7.1.1
    "QualityControlSubject": frozenset({"YES", "NO"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),
    "SmokingStatus": frozenset({"YES", "NO", "UNKNOWN"}),
    "TypeOfPatientID": frozenset({"TEXT", "RFID", "BARCODE"}),
    "Laterality": frozenset({"R", "L"}),  # PS3.3 C.7.3.1
}
"""Attributes with enumerated values (the value must be one of them)."""

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_SINGLE_VALUE_VRS = frozenset({"LT", "ST", "UT", "UR"})
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")  # every C0 control but ESC (0x1b)
_CONTROL_LONG_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")  # TAB, LF, FF, CR allowed too
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


@dataclass(frozen=True)
class HeaderFix:
    """One change made while copying: ``action`` is ``blanked``, ``removed`` or ``repaired``."""

    keyword: str
    action: str
    reason: str

    def __str__(self) -> str:
        return f"{self.keyword} {self.action}: {self.reason}"


class _Invalid(ValueError):
    """A value that cannot be copied; the message is the reason (never the value)."""


# ----------------------------------------------------------------------------------------------------
# Specific Character Set
# ----------------------------------------------------------------------------------------------------


def _codec(name: str) -> str | None:
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def _standard_term(term: str, code_extensions: bool) -> str | None:
    """The standard Defined Term for a misspelt or Python-named character set, or None."""
    t = term.strip().upper()
    for candidate in (
        t,
        re.sub(r"^ISO[^_ ]?IR[ _-]?", "ISO_IR ", t),
        re.sub(r"^ISO[ _-]?2022[ _-]?IR[ _-]?", "ISO 2022 IR ", t),
    ):
        if candidate in python_encoding:
            return _prefer_form(candidate, code_extensions)
    codec = _codec(term.strip())
    if codec is None:
        return None
    matches = [k for k, v in python_encoding.items() if _codec(v) == codec]
    for k in sorted(matches, key=lambda k: (k.startswith("ISO 2022") != code_extensions, k)):
        return k
    return None


def _prefer_form(term: str, code_extensions: bool) -> str:
    """ISO_IR n <-> ISO 2022 IR n depending on whether code extensions are used."""
    if code_extensions and term.startswith("ISO_IR "):
        other = "ISO 2022 IR " + term[7:]
        return other if other in python_encoding else term
    return term


def conform_character_set(source: pydicom.Dataset) -> tuple[list[str] | None, list[HeaderFix]]:
    """The Specific Character Set to give a result object copying text from ``source``.

    Returns the values (None when the source has none: the default repertoire) and the fixes made.
    Standard terms are kept as received, including an empty first value (PS3.3 C.12.1.1.2: the
    default repertoire with code extensions). A non-standard term naming a standard character set with
    the same byte encoding (``UTF-8`` -> ``ISO_IR 192``, ``ISO-IR 100`` -> ``ISO_IR 100``) is replaced by
    it; one that names none is removed (text that then does not decode is blanked or removed).
    """
    elem = source.get("SpecificCharacterSet")
    if elem is None:
        return None, []
    raw = source["SpecificCharacterSet"].value
    values = [str(v) for v in raw] if isinstance(raw, (list, tuple, pydicom.multival.MultiValue)) else [str(raw or "")]
    values = [v.strip() for v in values]
    code_extensions = len(values) > 1
    out: list[str] = []
    fixes: list[HeaderFix] = []
    for i, value in enumerate(values):
        if value == "" and (i == 0 and code_extensions or len(values) == 1):
            out.append("")
            continue
        if value in python_encoding:
            out.append(value)
            continue
        term = _standard_term(value, code_extensions)
        if term is not None:
            out.append(term)
            fixes.append(HeaderFix("SpecificCharacterSet", "repaired", f"value {i + 1} is not a Defined Term; {term} names its encoding"))
        else:
            fixes.append(HeaderFix("SpecificCharacterSet", "repaired", f"value {i + 1} names no known character set: removed"))
    while len(out) > 1 and out[-1] == "":
        out.pop()
    if not out or out == [""]:
        return None, fixes
    return out, fixes


# ----------------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------------


def _vm_ok(count: int, vm: str) -> bool:
    """Whether ``count`` values fit a data dictionary VM such as ``1``, ``1-3``, ``1-n`` or ``2-2n``."""
    if count == 0:
        return True
    vm = vm.strip()
    if "-" not in vm:
        return count == int(vm)
    lo, hi = vm.split("-", 1)
    if hi.endswith("n"):
        step = int(hi[:-1] or 1)
        return count >= int(lo) and count % step == 0
    return int(lo) <= count <= int(hi)


def _check_date(value: str) -> None:
    if not re.fullmatch(r"\d{8}", value):
        raise _Invalid("not a DA value (YYYYMMDD)")
    try:
        datetime.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError as exc:
        raise _Invalid("not a calendar date") from exc


def _check_time(value: str) -> None:
    m = _TM.fullmatch(value)
    if not m:
        raise _Invalid("not a TM value (HHMMSS.FFFFFF)")
    hh, mm, ss = int(m[1]), int(m[2] or 0), int(m[3] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        raise _Invalid("not a time of day")


def _check_datetime(value: str) -> None:
    m = _DT.fullmatch(value)
    if not m:
        raise _Invalid("not a DT value (YYYYMMDDHHMMSS.FFFFFF&ZZXX)")
    try:
        datetime.date(int(m[1]), int(m[2] or 1), int(m[3] or 1))
    except ValueError as exc:
        raise _Invalid("not a calendar date") from exc
    if int(m[4] or 0) > 23 or int(m[5] or 0) > 59 or int(m[6] or 0) > 60:
        raise _Invalid("not a time of day")
    if m[8] and not (int(m[8][1:3]) <= 14 and int(m[8][3:5]) <= 59):
        raise _Invalid("not a UTC offset")


def _values(elem: DataElement) -> list[Any]:
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return list(value)
    return [value]


def _check_value(keyword: str, vr: str, value: Any) -> None:
    """Raise _Invalid when one value of ``vr`` cannot be written as it is."""
    text = str(value) if vr in _TEXT_VRS else None
    if text is not None:
        control = _CONTROL_LONG_TEXT if vr in ("LT", "ST", "UT") else _CONTROL
        if control.search(text):
            raise _Invalid("control characters")
        if "\ufffd" in text:
            raise _Invalid("bytes that do not decode in the character set")
    try:
        validate_value(vr, text if text is not None else value, pydicom_config.RAISE)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        if "exceeds the maximum" in msg or "length" in msg.lower():
            raise _Invalid(f"longer than {vr} allows") from None
        raise _Invalid(f"not a valid {vr} value") from None
    if text is None:  # not a text VR: validate_value above was the whole check
        return
    if vr == "DA":
        _check_date(text.strip())
    elif vr == "TM":
        _check_time(text.strip())
    elif vr == "DT":
        _check_datetime(text.strip())
    elif vr == "PN" and (len(text.split("=")) > 3 or any(len(g.split("^")) > 5 for g in text.split("="))):
        raise _Invalid("more than 3 component groups or 5 components")
    allowed = ENUMERATED.get(keyword)
    if allowed is not None and text.strip() not in allowed:
        raise _Invalid(f"not one of the enumerated values {', '.join(sorted(allowed))}")


def _decoded(raw: RawDataElement, vr: str, encodings: list[str] | None) -> DataElement:
    """Decode ``raw`` as ``vr`` (bytes that do not decode become U+FFFD, refused by ``_check_value``)."""
    raw = raw._replace(VR=vr)
    with _quiet_decoding():
        try:
            return convert_raw_data_element(raw, encoding=encodings or _python_encodings(None))
        except (UnicodeError, LookupError) as exc:
            raise _Invalid("bytes that do not decode in the character set") from exc
        except Exception as exc:
            raise _Invalid(f"bytes that are not a {vr} value") from exc


class _quiet_decoding:
    """Decode without pydicom's value validation (ours follows) and without its warnings: bytes that do not
    decode come back as U+FFFD, which ``_check_value`` refuses."""

    def __enter__(self) -> None:
        import warnings

        self._mode = pydicom_config.settings.reading_validation_mode
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._warnings.__exit__(None, None, None)
        pydicom_config.settings.reading_validation_mode = self._mode


def _raw_bytes(elem: DataElement | RawDataElement, encodings: list[str] | None) -> bytes | None:
    """The value bytes of a text element as received (or re-encoded when only the decoded value remains)."""
    if isinstance(elem, RawDataElement):
        return bytes(elem.value or b"")
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    try:
        write_data_element(fp, elem, encodings or _python_encodings(None))
    except Exception:  # noqa: BLE001
        return None
    return fp.getvalue()[8:]  # tag (4) + length (4) in implicit VR little endian


def _checked_element(
    tag: int, elem: DataElement | RawDataElement, encodings: list[str] | None, keyword: str
) -> tuple[DataElement | RawDataElement, HeaderFix | None]:
    """The element to put into the result (raw bytes for text), or raise _Invalid; a repair if one was made."""
    dict_vr = dictionary_VR(tag) if dictionary_has_tag(tag) else None
    vr = elem.VR if elem.VR else dict_vr
    repair = None
    if dict_vr and " or " not in dict_vr and vr != dict_vr:
        repair = HeaderFix(keyword, "repaired", f"received with VR {vr}, written with its dictionary VR {dict_vr}")
        vr = dict_vr
    if vr is None:
        raise _Invalid("unknown VR")
    if vr == "SQ":
        value = elem.value if isinstance(elem, DataElement) else None
        if not isinstance(value, (list, pydicom.sequence.Sequence)):
            raise _Invalid("a sequence that cannot be read")
        _check_items(value, encodings)
        return copy.deepcopy(elem), None

    if vr in _TEXT_VRS:
        data = _raw_bytes(elem, encodings)
        if data is None:
            raise _Invalid("a value that cannot be encoded")
        data = data.rstrip(b"\x00 ")  # padding (space, or NUL from some modalities) is not value
        if vr not in ("LT", "ST", "UT"):
            data = data.lstrip(b"\x00")
        raw = RawDataElement(BaseTag(tag), vr, len(data), data, 0, False, True)
        decoded = _decoded(raw, vr, encodings)
        values = _values(decoded)
        if vr in _SINGLE_VALUE_VRS:
            values = values[:1]
        for value in values:
            _check_value(keyword, vr, value)
        vm = dictionary_VM(tag) if dictionary_has_tag(tag) else "1-n"
        if vr not in _SINGLE_VALUE_VRS and not _vm_ok(len(values), vm):
            raise _Invalid(f"{len(values)} values where the dictionary allows {vm}")
        if len(data) % 2:
            data += b"\x00" if vr == "UI" else b" "
        return RawDataElement(BaseTag(tag), vr, len(data), data, 0, False, True), repair

    # Binary VRs (US, FD, SQ handled above ...): decoded values, checked, deep-copied.
    if isinstance(elem, RawDataElement):
        decoded = _decoded(elem, vr, encodings)
    else:
        decoded = copy.deepcopy(elem)
        if decoded.VR != vr:
            raise _Invalid(f"received with VR {decoded.VR}, which cannot be read as {vr}")
    for value in _values(decoded):
        _check_value(keyword, vr, value)
    return decoded, repair


def _check_items(items: Iterable[pydicom.Dataset], encodings: list[str] | None) -> None:
    """Raise _Invalid naming the first element inside ``items`` (recursively) that cannot be copied."""
    for item in items:
        for inner in item:
            if inner.tag.is_private:
                continue
            inner_kw = keyword_for_tag(inner.tag) or str(inner.tag)
            try:
                if inner.VR == "SQ":
                    _check_items(inner.value or [], encodings)
                else:
                    _checked_element(inner.tag, inner, encodings, inner_kw)
            except _Invalid as exc:
                raise _Invalid(f"item attribute {inner_kw}: {exc}") from None


def copy_attributes(
    source: pydicom.Dataset,
    target: pydicom.Dataset,
    keywords: Iterable[str],
    *,
    character_set: tuple[list[str] | None, Sequence[HeaderFix]] | None = None,
    what: str = "result",
) -> list[HeaderFix]:
    """Copy ``keywords`` present in ``source`` into ``target`` as received, conformed; return the fixes.

    Also sets ``target``'s Specific Character Set to the source's (conformed, see
    ``conform_character_set``; pass ``character_set`` to reuse one already computed). Each fix is logged
    once at WARNING as ``<what> header: <Keyword> <action>: <reason>`` (no values: they may be PHI).
    Never raises for a value; attributes missing from ``source`` are left as they are in ``target``.
    """
    charset, charset_fixes = character_set if character_set is not None else conform_character_set(source)
    fixes: list[HeaderFix] = list(charset_fixes)
    source_encodings = _source_encodings(source)
    target_encodings = _python_encodings(charset)
    if charset:
        target.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    elif "SpecificCharacterSet" in target:
        del target.SpecificCharacterSet
    seven_bit = not _high_bytes_allowed(charset)
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in source:
            continue
        try:
            elem = source.get_item(tag)
            if isinstance(elem, RawDataElement) and (elem.VR == "SQ" or dictionary_VR(tag) == "SQ"):
                elem = source[tag]  # sequences are checked item by item on their decoded form
        except Exception:  # noqa: BLE001 - an element pydicom cannot even read
            elem = None
        try:
            if elem is None:
                raise _Invalid("cannot be read")
            # Text must decode in the source's character set and in the one written (same bytes).
            new, repair = _checked_element(tag, elem, source_encodings, keyword)
            if isinstance(new, RawDataElement) and new.VR in _CHARSET_VRS:
                if seven_bit and any(b >= 0x80 for b in new.value or b""):
                    raise _Invalid("bytes outside the character set (no Specific Character Set for them)")
                if target_encodings != source_encodings:
                    _decoded(new, new.VR, target_encodings)
            target[tag] = new
            if repair is not None:
                fixes.append(repair)
        except _Invalid as exc:
            if tag in target:
                del target[tag]
            if keyword in TYPE2:
                target[tag] = DataElement(tag, dictionary_VR(tag), None)
                fixes.append(HeaderFix(keyword, "blanked", str(exc)))
            else:
                fixes.append(HeaderFix(keyword, "removed", str(exc)))
    _keep_conditions(target, set(keywords), fixes)
    for fix in fixes:
        log.warning("%s header: %s", what, fix)
    return fixes


_ANIMAL_ONLY = ("PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence")
_TRIAL_SUBJECT = (
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
)


def _remove(target: pydicom.Dataset, keywords: Iterable[str], reason: str, fixes: list[HeaderFix]) -> None:
    """Remove ``keywords`` from ``target``; one fix per attribute (an earlier one is merged into it)."""
    for keyword in keywords:
        if keyword in target:
            del target[keyword]
            earlier = [f for f in fixes if f.keyword == keyword]
            for fix in earlier:
                fixes.remove(fix)
            text = "; ".join([f.reason for f in earlier] + [reason])
            fixes.append(HeaderFix(keyword, "removed", text))


def _keep_conditions(target: pydicom.Dataset, copied: set[str], fixes: list[HeaderFix]) -> None:
    """Keep the conditional (1C/2C) relations of the copied modules true after values were removed.

    PS3.3 C.7.1.1 (Patient: animal attributes need a species; Responsible Person Role goes with a
    Responsible Person; the alternative-calendar dates need their calendar), C.7.1.3 (Clinical Trial
    Subject: Sponsor Name, Protocol ID and one Subject ID are Type 1), C.7.2.3 (Clinical Trial Study:
    Longitudinal Temporal Event Type goes with its Offset from Event).
    """
    species = ("PatientSpeciesDescription" in target) or ("PatientSpeciesCodeSequence" in target)
    if not species:
        _remove(target, [k for k in _ANIMAL_ONLY if k in copied], "only allowed for an animal (no species could be copied)", fixes)
    person = target.get("ResponsiblePerson")
    if person and "ResponsiblePersonRole" not in target and "ResponsiblePerson" in copied:
        target.ResponsiblePerson = None
        fixes.append(HeaderFix("ResponsiblePerson", "blanked", "its Responsible Person Role could not be copied"))
    if not target.get("ResponsiblePerson") and "ResponsiblePersonRole" in copied:
        _remove(target, ["ResponsiblePersonRole"], "only allowed with a Responsible Person", fixes)
    alternative_dates = [k for k in ("PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar") if k in copied]
    if "PatientAlternativeCalendar" not in target:
        _remove(target, alternative_dates, "needs Patient's Alternative Calendar, which could not be copied", fixes)
    elif not any(k in target for k in alternative_dates) and "PatientAlternativeCalendar" in copied:
        _remove(target, ["PatientAlternativeCalendar"], "only allowed with a date in the alternative calendar", fixes)
    present = [k for k in _TRIAL_SUBJECT if k in target and k in copied]
    subject = "ClinicalTrialSubjectID" in target or "ClinicalTrialSubjectReadingID" in target
    if present and not (target.get("ClinicalTrialSponsorName") and target.get("ClinicalTrialProtocolID") and subject):
        _remove(target, present, "the Clinical Trial Subject module lost a Type 1 attribute", fixes)
    offset, event = "LongitudinalTemporalOffsetFromEvent", "LongitudinalTemporalEventType"
    if event in target and offset not in target and event in copied:
        _remove(target, [event], "only allowed with Longitudinal Temporal Offset from Event", fixes)
    elif offset in target and event not in target and offset in copied:
        _remove(target, [offset], "needs Longitudinal Temporal Event Type, which could not be copied", fixes)


_SEVEN_BIT_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6", "ISO 2022 IR 87", "ISO 2022 IR 159"})


def _high_bytes_allowed(terms: Sequence[str] | None) -> bool:
    """Whether bytes 0x80-0xFF can occur in text under these Specific Character Set values (PS3.5 6.1):
    not in the default repertoire nor in the 7-bit ISO 2022 sets (JIS X 0208/0212 via escapes)."""
    return terms is not None and any(t not in _SEVEN_BIT_TERMS for t in terms)


def _python_encodings(terms: Sequence[str] | None) -> list[str]:
    """pydicom's Python encodings for Specific Character Set values (unknown terms: the default)."""
    import warnings

    from pydicom.charset import convert_encodings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_encodings(list(terms) if terms else None)


def _source_encodings(source: pydicom.Dataset) -> list[str]:
    """The Python encodings pydicom decodes ``source``'s text with."""
    if "SpecificCharacterSet" not in source:
        return _python_encodings(None)
    raw = source["SpecificCharacterSet"].value
    values = [str(v) for v in raw] if isinstance(raw, (list, tuple, pydicom.multival.MultiValue)) else [str(raw or "")]
    return _python_encodings([v.strip() for v in values])
