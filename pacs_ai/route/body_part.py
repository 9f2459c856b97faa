"""Body part of an image: Body Part Examined, or a recognised word in the image's descriptions.

In the field Body Part Examined (0018,0015) is often empty, or free text ("L HAND", "Hand re.",
"EXTREMITY"), and the region is only named in the Protocol Name or a description. ``resolve_body_part``
looks, in this order, at Body Part Examined, Protocol Name, Series Description, Study Description and
Requested Procedure Description, and returns the first recognised term with where it was found:

- a value that is a DICOM defined term known here (PS3.16 Annex L, e.g. ``HAND``, ``CHEST``) is taken
  as it is;
- otherwise the text is split into words and each word (and pair of words) is looked up in
  :data:`SYNONYMS` (English anatomical and everyday words, a few German and French ones), e.g.
  ``tibia`` -> ``LEG``, ``thorax`` -> ``CHEST``, ``finger`` -> ``FINGER``;
- a generic term (``EXTREMITY``, ``LOWER LIMB``...) is kept only when nothing more specific is found
  in the other attributes.

When nothing is recognised the body part is *unknown* (``term`` None); routing then follows
``[routing] unknown_body_part`` (analysed by default, see docs/operations.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `pacs-ai serve` validates routing before it starts its worker: pydicom is not loaded yet
    import pydicom

__all__ = ["GENERIC_TERMS", "SOURCES", "SYNONYMS", "BodyPart", "normalise_term", "resolve_body_part"]

SOURCES: tuple[str, ...] = (
    "BodyPartExamined",
    "ProtocolName",
    "SeriesDescription",
    "StudyDescription",
    "RequestedProcedureDescription",
)

# DICOM defined terms (PS3.16 Annex L) this module knows, with words that name them.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "HAND": ("HAND", "HANDS", "MANUS", "METACARPAL", "METACARPALS"),
    "FINGER": ("FINGER", "FINGERS", "THUMB", "PHALANX", "DIGIT", "FINGERS", "DAUMEN"),
    "WRIST": ("WRIST", "CARPAL", "SCAPHOID", "HANDGELENK", "POIGNET"),
    "FOREARM": ("FOREARM", "RADIUS", "ULNA", "UNTERARM", "AVANT BRAS"),
    "ELBOW": ("ELBOW", "ELLENBOGEN", "COUDE", "OLECRANON", "RADIAL HEAD"),
    "ARM": ("ARM", "UPPER ARM", "HUMERUS", "OBERARM"),
    "SHOULDER": ("SHOULDER", "SCHULTER", "EPAULE", "GLENOHUMERAL", "SCAPULA", "HUMERAL HEAD"),
    "CLAVICLE": ("CLAVICLE", "CLAVICULA", "SCHLUESSELBEIN"),
    "HIP": ("HIP", "HIPS", "HUEFTE", "HANCHE", "ACETABULUM", "FEMORAL NECK", "FEMORAL HEAD"),
    "PELVIS": ("PELVIS", "BECKEN", "BASSIN", "SACRUM"),
    "FEMUR": ("FEMUR", "THIGH", "OBERSCHENKEL"),
    "KNEE": ("KNEE", "KNIE", "GENOU", "PATELLA"),
    "LEG": ("LEG", "LOWER LEG", "TIBIA", "FIBULA", "TIB", "UNTERSCHENKEL", "JAMBE"),
    "ANKLE": ("ANKLE", "SPRUNGGELENK", "CHEVILLE", "MALLEOLUS"),
    "FOOT": ("FOOT", "FEET", "FUSS", "PIED", "CALCANEUS", "HEEL", "METATARSAL", "METATARSALS"),
    "TOE": ("TOE", "TOES", "ZEHE", "HALLUX"),
    "CHEST": ("CHEST", "THORAX", "LUNG", "LUNGS", "CXR", "RIB", "RIBS", "STERNUM", "THORAKS"),
    "ABDOMEN": ("ABDOMEN", "ABDOMINAL", "KUB"),
    "SKULL": ("SKULL", "SCHAEDEL", "CRANE", "CRANIUM"),
    "HEAD": ("HEAD", "KOPF"),
    "FACE": ("FACE", "FACIAL", "MANDIBLE", "ORBIT", "SINUS", "SINUSES", "NASAL"),
    "CSPINE": ("CSPINE", "C SPINE", "CERVICAL", "HWS"),
    "TSPINE": ("TSPINE", "T SPINE", "THORACIC SPINE", "BWS"),
    "LSPINE": ("LSPINE", "L SPINE", "LUMBAR", "LWS"),
    "SPINE": ("SPINE", "WIRBELSAEULE"),
    "BREAST": ("BREAST", "MAMMO", "MAMMOGRAPHY"),
}

GENERIC_TERMS: dict[str, tuple[str, ...]] = {
    "EXTREMITY": ("EXTREMITY", "EXTREMITIES", "LIMB"),
    "UPPER_LIMB": ("UPPER EXTREMITY", "UPPER LIMB", "UPPEREXTREMITY", "UPPER_LIMB", "ARM UPPER LIMB"),
    "LOWER_LIMB": ("LOWER EXTREMITY", "LOWER LIMB", "LOWEREXTREMITY", "LOWER_LIMB"),
}

_UMLAUTS = str.maketrans({"Ä": "AE", "Ö": "OE", "Ü": "UE", "ß": "SS", "É": "E", "È": "E", "Ê": "E", "À": "A"})


def _lookup(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for term, words in table.items():
        out[term] = term
        for word in words:
            out[word] = term
    return out


_SPECIFIC = _lookup(SYNONYMS)
_GENERIC = _lookup(GENERIC_TERMS)


def normalise_term(text: str) -> str:
    """Upper case, umlauts spelt out, runs of non-letters as one space (``"L. Hand"`` -> ``"L HAND"``)."""
    return re.sub(r"[^A-Z]+", " ", str(text).upper().translate(_UMLAUTS)).strip()


def _find(text: str) -> tuple[str | None, str | None]:
    """(specific term, generic term) named in ``text``: the whole text, then word pairs, then words."""
    norm = normalise_term(text)
    if not norm:
        return None, None
    if norm in _SPECIFIC:
        return _SPECIFIC[norm], None
    compact = norm.replace(" ", "")
    if compact in _SPECIFIC:
        return _SPECIFIC[compact], None
    words = norm.split()
    pairs = [" ".join(words[i : i + 2]) for i in range(len(words) - 1)]
    for candidate in pairs + words:
        if candidate in _SPECIFIC:
            return _SPECIFIC[candidate], None
    for candidate in [norm] + pairs + words:
        if candidate in _GENERIC:
            return None, _GENERIC[candidate]
    return None, None


@dataclass(frozen=True)
class BodyPart:
    """``term``: a defined term (or None when unknown); ``source``: the attribute it came from; ``raw``: the
    Body Part Examined value as received (None when absent)."""

    term: str | None
    source: str | None
    raw: str | None

    @property
    def known(self) -> bool:
        return self.term is not None

    def describe(self) -> str:
        raw = f"Body Part Examined {self.raw!r}" if self.raw else "no Body Part Examined"
        if self.term is None:
            return f"unknown ({raw}; no body part recognised in the descriptions)"
        if self.source == "BodyPartExamined":
            return f"{self.term} (from Body Part Examined {self.raw!r})"
        return f"{self.term} (from {self.source}; {raw})"


def resolve_body_part(ds: pydicom.Dataset) -> BodyPart:
    """The body part of ``ds``; see the module docstring for the order and the vocabulary."""
    raw_value = ds.get("BodyPartExamined")
    raw = str(raw_value).strip() if raw_value not in (None, "") else None
    generic: tuple[str, str] | None = None
    for keyword in SOURCES:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001, S112 - a malformed element reads as missing
            continue
        if value in (None, ""):
            continue
        specific, gen = _find(str(value))
        if specific:
            return BodyPart(specific, keyword, raw)
        if gen and generic is None:
            generic = (gen, keyword)
    if generic is not None:
        return BodyPart(generic[0], generic[1], raw)
    return BodyPart(None, None, raw)
