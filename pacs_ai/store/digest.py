"""The content digest of a received data set: what makes a second reception "the same instance again".

A router or a PACS that resends an instance may wrap and encode the same data set differently:
another File Meta Information (Source Application Entity Title, implementation class and version);
with or without a Data Set Trailing Padding element (FFFC,FFFC) at the end (PS3.5 section 7.1: padding
"has no DICOM semantics"; dcmtk's ``storescu`` drops it, others keep it); sequences and their items
with defined or undefined length (PS3.5 section 7.5: both are conformant, and dcmtk's ``storescu``
rewrites undefined lengths as defined ones), with or without Group Length elements (gggg,0000), which
are retired (PS3.5 section 7.2) and only restate lengths. None of this changes the instance, so none of
it may count as changed content (which re-queues the job and sends its results again).

``dataset_digest(encoded, implicit_vr=..., little_endian=..., deflated=...)`` is the hex SHA-256 of the
data set's elements as parsed by pydicom (no decode of values): for each element its tag, its VR
(explicit VR transfer syntaxes only; implicit VR carries none), the byte count and the value bytes as
received; a sequence instead contributes its items in order, each recursively, so sequence and item
lengths and delimitation items never count. Pixel Data is hashed as received (for encapsulated pixel
data: the Basic Offset Table and fragment items as sent). Top-level trailing padding and group lengths
are skipped. A deflated data set is inflated first. The same data set in another transfer syntax gives
another digest by design (values such as pixel data differ in bytes): a re-encoded resend counts as
changed. A data set pydicom cannot parse is hashed as its raw bytes less trailing padding.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from typing import Any

from pydicom import config as pydicom_config
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_sequence
from pydicom.sequence import Sequence

__all__ = ["dataset_digest", "trailing_padding_start"]

_TAIL_WINDOW = 1 << 20
"""Where a trailing padding element is looked for: its header within the last 1 MiB (larger padding counts as content)."""

_TRAILING_PADDING = 0xFFFCFFFC
_ITEM_START = b"\x01item"
_ITEM_END = b"\x02end"
_FALLBACK = b"raw-bytes\x00"


def trailing_padding_start(encoded: bytes | bytearray | memoryview, *, implicit_vr: bool, little_endian: bool) -> int:
    """Offset where a top-level Data Set Trailing Padding element starts, or ``len(encoded)`` if none.

    The element is recognised only when its header (tag FFFC,FFFC; in explicit VR the VR OB and a 4-byte
    length) accounts exactly for the rest of the buffer, so bytes that merely look like the tag inside
    pixel data are never taken for it.
    """
    view = memoryview(encoded)
    size = len(view)
    start = max(0, size - _TAIL_WINDOW)
    tail = bytes(view[start:])
    order = "<" if little_endian else ">"
    tag = struct.pack(f"{order}HH", 0xFFFC, 0xFFFC)
    pos = tail.rfind(tag)
    while pos >= 0:
        if implicit_vr:
            header = 8
            fits = pos + header <= len(tail)
            length = struct.unpack_from(f"{order}I", tail, pos + 4)[0] if fits else -1
        else:
            header = 12
            fits = pos + header <= len(tail) and tail[pos + 4 : pos + 8] == b"OB\x00\x00"
            length = struct.unpack_from(f"{order}I", tail, pos + 8)[0] if fits else -1
        if fits and pos + header + length == len(tail):
            return start + pos
        pos = tail.rfind(tag, 0, pos)
    return size


def _is_sequence(elem: Any, implicit_vr: bool) -> bool:
    if isinstance(elem, DataElement):  # undefined-length sequences come parsed already
        return isinstance(elem.value, Sequence)
    if not implicit_vr:
        return bool(elem.VR == "SQ")
    try:
        return bool(dictionary_VR(elem.tag) == "SQ")
    except KeyError:  # private or unknown tag: its defined-length value stays bytes
        return False


def _items(elem: Any) -> Sequence | list[Dataset]:
    """The items of a sequence element, each a data set of raw (unconverted) elements.

    A defined-length sequence arrives as raw bytes and is parsed here with pydicom's ``read_sequence``
    rather than by ``Dataset.__getitem__``, which would also convert other elements (for instance Pixel
    Representation, to resolve ambiguous VRs) and so lose their bytes as received.
    """
    if isinstance(elem, DataElement):
        return list(elem.value)
    value = bytes(elem.value or b"")
    return list(read_sequence(io.BytesIO(value), elem.is_implicit_VR, elem.is_little_endian, len(value), default_encoding))


def _hash_dataset(sha: Any, ds: Dataset, *, implicit_vr: bool, top_level: bool) -> None:
    """Feed ``ds``'s elements (raw, as read) into ``sha`` in tag order, recursing into sequences."""
    for elem in ds.elements():
        tag = int(elem.tag)
        declared = getattr(elem, "length", None)
        if isinstance(elem.value, (bytes, bytearray)) and declared not in (None, 0xFFFFFFFF) and declared != len(elem.value):
            raise ValueError(f"element {tag:08X} is truncated")  # pydicom reads a short value silently
        if tag & 0xFFFF == 0 or (top_level and tag == _TRAILING_PADDING):
            continue  # group lengths restate lengths; trailing padding has no semantics
        sha.update(struct.pack("<I", tag))
        if _is_sequence(elem, implicit_vr):
            items = _items(elem)
            sha.update(b"SQ" if not implicit_vr else b"")
            sha.update(struct.pack("<Q", len(items)))
            for item in items:
                sha.update(_ITEM_START)
                _hash_dataset(sha, item, implicit_vr=implicit_vr, top_level=False)
                sha.update(_ITEM_END)
            continue
        value = elem.value
        if value is None or (isinstance(elem, DataElement) and elem.is_empty):
            value = b""  # pydicom yields some zero-length elements (implicit VR) already converted
        if not isinstance(value, (bytes, bytearray)):  # never expected: nothing here converts values
            raise ValueError(f"element {tag:08X} was converted; its bytes as received are unknown")
        sha.update(b"" if implicit_vr else str(elem.VR or "").encode("ascii", "replace"))
        sha.update(struct.pack("<Q", len(value)))
        sha.update(value)


def dataset_digest(
    encoded: bytes | bytearray | memoryview,
    *,
    implicit_vr: bool,
    little_endian: bool,
    deflated: bool = False,
) -> str:
    """Hex SHA-256 of the elements of ``encoded`` (a data set without File Meta Information).

    Independent of length encoding (defined/undefined sequences and items, delimitation items, group
    lengths) and of top-level Data Set Trailing Padding; see the module docstring. ``deflated``: the
    bytes are a raw deflate stream of an explicit VR little endian data set (PS3.5 A.5). Never raises
    on malformed input: a data set that does not parse is hashed as its bytes less trailing padding.
    """
    view = memoryview(encoded)
    data: bytes | memoryview = view
    if deflated:
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(view)
        except zlib.error:
            return hashlib.sha256(_FALLBACK + view).hexdigest()
    sha = hashlib.sha256()
    try:
        with pydicom_config.disable_value_validation():
            ds = read_dataset(io.BytesIO(data), implicit_vr, little_endian)
            _hash_dataset(sha, ds, implicit_vr=implicit_vr, top_level=True)
    except Exception:  # pydicom raises many types on malformed data; the bytes still identify it
        end = len(data) if deflated else trailing_padding_start(data, implicit_vr=implicit_vr, little_endian=little_endian)
        return hashlib.sha256(_FALLBACK + memoryview(data)[:end]).hexdigest()
    return sha.hexdigest()
