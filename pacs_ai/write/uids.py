"""Deterministic UIDs for the result objects.

Every result UID is derived from the source image's SOP Instance UID, the model version and the kind of
UID, so processing the same image again with the same model produces the same Series and SOP Instance
UIDs: a PACS then *replaces* the earlier result instead of storing a duplicate. A new model version gives
new UIDs (a new, separate result series).

The UIDs are ``2.25.<decimal>`` UIDs (PS3.5 B.2: a UUID-derived UID needing no registered root); the UUID
is a name-based one (RFC 4122 version 5 layout) made from a SHA-256 of the inputs. (pydicom's
``generate_uid(prefix=None, ...)`` ignores its entropy sources and returns a random UUID, so it cannot be
used here.)
"""

from __future__ import annotations

import hashlib
import uuid

from pydicom.uid import UID

__all__ = ["KINDS", "derive_uid"]

KINDS: tuple[str, ...] = (
    "sc-series", "sc", "sr-series", "sr", "tracking", "roi-tracking", "device",
    "study-sr-series", "study-sr", "study-tracking", "sr-class",
)
"""The kinds of UID pacs-ai derives from a source image (``device`` is per model, not per image; the
``study-*`` kinds are derived from a Study Instance UID: the study result, one per study and model;
``sr-class`` is an SR re-sent in another SR SOP class: derived from the SR's own UID and that class)."""

_NAMESPACE = "pacs-ai/result-uid/v1"


def derive_uid(source_sop_instance_uid: str, model_version: str, kind: str) -> str:
    """Return the UID of kind ``kind`` for the results of ``model_version`` on the given source image.

    ``kind`` is one of :data:`KINDS`. Same inputs, same UID; any different input, a different UID.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown UID kind {kind!r} (known: {', '.join(KINDS)})")
    source = str(source_sop_instance_uid or "").strip()
    if not source:
        raise ValueError("the source SOP Instance UID is empty")
    text = "\x1f".join([_NAMESPACE, source, str(model_version), kind])
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    value = uuid.UUID(bytes=digest[:16], version=5).int
    return str(UID(f"2.25.{value}"))
