"""The content digest of a received data set: what makes a second reception "the same instance again".

A router or a PACS that resends an instance may wrap the same data set differently: another File Meta
Information (Source Application Entity Title, implementation class and version), or with or without a
Data Set Trailing Padding element (FFFC,FFFC) at the end (PS3.5 section 7.1: padding "has no DICOM
semantics"; dcmtk's ``storescu`` drops it, others keep it). Neither changes the instance, so neither may
count as changed content (which re-queues the job and sends its results again).

``dataset_digest(encoded, implicit_vr=..., little_endian=..., deflated=...)`` is the hex SHA-256 of the
data set as encoded on the wire (no File Meta Information), without a top-level trailing padding element.
A deflated data set is hashed as received (its padding is inside the compressed stream). A different
transfer syntax gives a different digest (the bytes differ): a re-encoded resend counts as changed.
"""

from __future__ import annotations

import hashlib
import struct

__all__ = ["dataset_digest", "trailing_padding_start"]

_TAIL_WINDOW = 1 << 20
"""Where a trailing padding element is looked for: its header within the last 1 MiB (larger padding counts as content)."""


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


def dataset_digest(
    encoded: bytes | bytearray | memoryview,
    *,
    implicit_vr: bool,
    little_endian: bool,
    deflated: bool = False,
) -> str:
    """Hex SHA-256 of ``encoded`` (a data set without File Meta Information) less its trailing padding."""
    view = memoryview(encoded)
    end = len(view) if deflated else trailing_padding_start(view, implicit_vr=implicit_vr, little_endian=little_endian)
    return hashlib.sha256(view[:end]).hexdigest()
