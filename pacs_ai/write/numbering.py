"""Series/Instance Numbers and Series Descriptions of the result objects, per source image.

Every source image gets its own SC series and SR series (their UIDs derive from the source SOP Instance
UID, see uids.py). So that the results of several images of one study stay apart in a viewer, their
numbers and descriptions are per source too:

- Series Number: ``SC_SERIES_BASE + code`` (SC) and ``SR_SERIES_BASE + code`` (SR), where ``code`` is
  a number in 0..999999 from a SHA-256 of the source SOP Instance UID: deterministic (reprocessing the
  image keeps its numbers, like its UIDs) and unique in a study with probability 1 - n(n-1)/2e6 for n
  images (about 0.99998 for 7 images), whatever Series and Instance Numbers the modality sent (many
  send 1 and 1 for every image).
- Instance Number: ``code + 1``, so results of different images never share one either.
- Series Description: what the results are, where they come from (body part, laterality, view
  position, source series and instance number, as far as the source says) and the warning, within the
  64 characters of LO: ``AI Fracture Heatmap HIP R AP S2 I1 - NOT FOR DIAGNOSTIC USE``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import pydicom

__all__ = ["SC_SERIES_BASE", "SR_SERIES_BASE", "WARNING", "ResultNumbering", "number_results", "source_label"]

SC_SERIES_BASE = 99_000_000
SR_SERIES_BASE = 98_000_000
WARNING = "NOT FOR DIAGNOSTIC USE"
_LO_MAX = 64
_CS_TOKEN = re.compile(r"[^A-Z0-9 _]")


@dataclass(frozen=True)
class ResultNumbering:
    """Numbers and descriptions of the two result objects of one source image."""

    sc_series_number: int
    sr_series_number: int
    instance_number: int
    sc_series_description: str
    sr_series_description: str
    source_label: str


def _token(source: pydicom.Dataset, keyword: str, allowed: tuple[str, ...] | None = None) -> str:
    """A short CS-like token from the source (invalid characters dropped), or ''."""
    try:
        value = source.get(keyword)
    except Exception:  # noqa: BLE001 - an unreadable value names nothing
        return ""
    if value is None or not isinstance(value, (str, bytes)):
        return ""
    text = value.decode("ascii", "ignore") if isinstance(value, bytes) else value
    text = _CS_TOKEN.sub("", text.strip().upper())[:16].strip()
    if allowed is not None and text not in allowed:
        return ""
    return text


def _number(source: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = source.get(keyword)
        n = int(str(value).strip()) if value not in (None, "") else None
    except Exception:  # noqa: BLE001
        return None
    return n if n is not None and 0 <= n <= 2**31 - 1 else None


def _label_tokens(source: pydicom.Dataset) -> list[tuple[str, str]]:
    laterality = _token(source, "Laterality", ("R", "L")) or _token(source, "ImageLaterality", ("R", "L", "B"))
    tokens = [("body", _token(source, "BodyPartExamined")), ("laterality", laterality), ("view", _token(source, "ViewPosition"))]
    series, instance = _number(source, "SeriesNumber"), _number(source, "InstanceNumber")
    tokens.append(("series", f"S{series}" if series is not None else ""))
    tokens.append(("instance", f"I{instance}" if instance is not None else ""))
    return [(k, v) for k, v in tokens if v]


def source_label(source: pydicom.Dataset, max_length: int = _LO_MAX) -> str:
    """``HIP R AP S2 I1``: body part, laterality, view position, source series/instance number ('' if none).

    When longer than ``max_length``, whole words go first: body part, then view position, then
    laterality; the series/instance numbers are kept (cut only as a last resort).
    """
    tokens = _label_tokens(source)
    for drop in ("body", "view", "laterality"):
        if len(" ".join(v for _, v in tokens)) <= max_length:
            break
        tokens = [(k, v) for k, v in tokens if k != drop]
    return " ".join(v for _, v in tokens)[: max(0, max_length)].rstrip()


def _description(what: str, source: pydicom.Dataset) -> str:
    tail = f" - {WARNING}"
    label = source_label(source, _LO_MAX - len(what) - len(tail) - 1)
    return f"{what} {label}{tail}" if label else f"{what}{tail}"


def number_results(source: pydicom.Dataset, sc_title: str, sr_title: str) -> ResultNumbering:
    """The numbering of the SC (``sc_title``) and SR (``sr_title``) made from ``source``.

    ``source`` must have a SOP Instance UID (the writers check it first).
    """
    uid = str(source.get("SOPInstanceUID", "") or "").strip()
    code = int.from_bytes(hashlib.sha256(uid.encode("ascii", "replace")).digest()[:8], "big") % 1_000_000
    return ResultNumbering(
        sc_series_number=SC_SERIES_BASE + code,
        sr_series_number=SR_SERIES_BASE + code,
        instance_number=code + 1,
        sc_series_description=_description(sc_title, source),
        sr_series_description=_description(sr_title, source),
        source_label=source_label(source),
    )
