"""What to propose to a Storage SCP and what to send in what it accepted (PS3.7 / PS3.8 negotiation).

Every object is proposed in its own transfer syntax plus Explicit and Implicit VR Little Endian
(Implicit is the DICOM default every Storage SCP must accept, PS3.5 10.1), one presentation context per
(SOP class, transfer syntax). A Comprehensive 3D SR
without 3D coordinates is also proposed as Comprehensive SR and Enhanced SR (same content, classes a
PACS that does not know the 3D class usually takes; PS3.3 A.35.2/A.35.3 allow every value type and
relationship pacs-ai writes, except that Enhanced SR has no by-reference relationships).

After negotiation, ``choose`` picks for each object the first of its classes the peer accepted
(its own class first) in the first accepted transfer syntax of its preference (own, Explicit,
Implicit), and ``dataset_to_send`` makes that object: same content, the chosen SOP class (a converted
SR gets its own SOP Instance UID, derived from the SR's and the class's: uids.py ``sr-class``); a
compressed object going out uncompressed is decompressed with pydicom, and pynetdicom encodes the
dataset in the accepted uncompressed transfer syntax (Explicit -> Implicit VR Little Endian).

These are plain functions so that an association reused across a burst of jobs can propose the union
of the contexts of the objects it will carry, and then choose per object.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import PresentationContext, build_context

from pacs_ai.write.uids import derive_uid

__all__ = [
    "COMPREHENSIVE_3D_SR",
    "COMPREHENSIVE_SR",
    "ENHANCED_SR",
    "Choice",
    "OutgoingObject",
    "accepted_syntaxes",
    "choose",
    "dataset_to_send",
    "propose",
    "sop_class_alternatives",
    "transfer_syntax_preference",
]

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
_SR_FALLBACKS = {COMPREHENSIVE_3D_SR: (COMPREHENSIVE_SR, ENHANCED_SR), COMPREHENSIVE_SR: (ENHANCED_SR,)}


@dataclass(frozen=True)
class OutgoingObject:
    """A result file to send: ``key`` names it in the delivery record (``sc``, ``sr`` or a file name).

    ``alternatives`` are the SOP classes it may also be sent as, in order of preference (after its own).
    """

    key: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    alternatives: tuple[str, ...] = ()

    @property
    def sop_classes(self) -> tuple[str, ...]:
        return (self.sop_class_uid, *self.alternatives)


@dataclass(frozen=True)
class Choice:
    """How one object goes to the peer: SOP class and transfer syntax of an accepted context."""

    sop_class_uid: str
    transfer_syntax_uid: str


def transfer_syntax_preference(own: str) -> list[str]:
    """Own transfer syntax, then Explicit VR Little Endian, then Implicit VR Little Endian (no repeats)."""
    return list(dict.fromkeys([str(own), str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]))


def _content_types(items: Iterable[pydicom.Dataset]) -> tuple[set[str], bool]:
    """Value types used in an SR content tree and whether it has by-reference relationships."""
    types: set[str] = set()
    by_reference = False
    stack = list(items)
    while stack:
        item = stack.pop()
        if "ValueType" in item:
            types.add(str(item.ValueType))
        if "ReferencedContentItemIdentifier" in item:
            by_reference = True
        stack.extend(item.get("ContentSequence", []) or [])
    return types, by_reference


def sop_class_alternatives(ds: pydicom.Dataset) -> tuple[str, ...]:
    """Other SR classes that can carry the same content as ``ds`` (empty for anything else).

    No SCOORD3D: Comprehensive SR; and no by-reference relationship either: Enhanced SR.
    """
    fallbacks = _SR_FALLBACKS.get(str(ds.get("SOPClassUID", "")), ())
    if not fallbacks:
        return ()
    types, by_reference = _content_types(ds.get("ContentSequence", []) or [])
    if "SCOORD3D" in types:
        return ()
    return tuple(c for c in fallbacks if not (c == ENHANCED_SR and by_reference))


def propose(objects: Sequence[OutgoingObject]) -> list[PresentationContext]:
    """One presentation context per (SOP class, transfer syntax) any object may be sent as: each object's
    own transfer syntax, Explicit and Implicit VR Little Endian, in that order, without repeats.

    One transfer syntax per context, because a peer accepts at most one per context (PS3.8 9.3.2.2): a
    class proposed with several syntaxes in one context would carry only the first the peer supports,
    and two objects of one class in different syntaxes could not both go as they are.
    """
    wanted: dict[tuple[str, str], None] = {}
    for obj in objects:
        for sop_class in obj.sop_classes:
            for ts in transfer_syntax_preference(obj.transfer_syntax_uid):
                wanted[(sop_class, ts)] = None
    return [build_context(sop_class, [ts]) for sop_class, ts in wanted]


def accepted_syntaxes(contexts: Iterable[PresentationContext]) -> dict[str, list[str]]:
    """SOP class -> transfer syntaxes the peer accepted for it (from ``assoc.accepted_contexts``)."""
    out: dict[str, list[str]] = {}
    for cx in contexts:
        for ts in cx.transfer_syntax:
            out.setdefault(str(cx.abstract_syntax), []).append(str(ts))
    return out


def choose(obj: OutgoingObject, accepted: Mapping[str, Sequence[str]]) -> Choice | None:
    """The SOP class and transfer syntax to send ``obj`` in, or None when the peer took none of them."""
    for sop_class in obj.sop_classes:
        syntaxes = accepted.get(sop_class, ())
        for ts in transfer_syntax_preference(obj.transfer_syntax_uid):
            if ts in syntaxes:
                return Choice(sop_class, ts)
    return None


def dataset_to_send(obj: OutgoingObject, choice: Choice) -> Path | pydicom.Dataset:
    """The object as it goes to the peer: class and transfer syntax of ``choice``, content unchanged.

    The file itself when it goes as it is (pynetdicom sends it), else the converted dataset.
    Raises ValueError (from pydicom) when a compressed object cannot be decompressed.
    """
    if choice == Choice(obj.sop_class_uid, obj.transfer_syntax_uid):
        return obj.path
    ds = pydicom.dcmread(obj.path)
    if choice.sop_class_uid != obj.sop_class_uid:
        ds = copy.deepcopy(ds)
        ds.SOPClassUID = choice.sop_class_uid
        ds.SOPInstanceUID = derive_uid(obj.sop_instance_uid, choice.sop_class_uid, "sr-class")
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    own = UID(obj.transfer_syntax_uid)
    if choice.transfer_syntax_uid != own and own.is_compressed:
        ds.decompress()  # pydicom: native pixel data, Explicit VR Little Endian
    # Between uncompressed transfer syntaxes pynetdicom re-encodes the dataset for the accepted context.
    return ds
