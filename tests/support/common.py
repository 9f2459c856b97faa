"""What tests share besides fixtures: paths of the committed samples, ports, copies, the result UID rule.

- ``REPO_ROOT``, ``TEST_DATA`` (the committed samples), ``WG04_SMALL`` and ``UNDECODABLE`` (see
  tests/data/make_samples.py), ``SHARED_DATA`` / ``SHARED_DICOM`` (../shared/data, may be absent).
- ``free_port()``: a TCP port on 127.0.0.1 free right now (the one implementation).
- ``copies(source, folder, n)``: re-UID'd copies of a file; ``have_tool(name)``.
- ``expected_result_uid(source_uid, model_version, kind)``: the documented result UID rule, computed here.
- ``STORE_ERROR_LINE``: what the listener logs when its C-STORE handler raises.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = REPO_ROOT / "tests" / "data"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_DICOM = SHARED_DATA / "dicom"
WG04_SMALL = TEST_DATA / "wg04"
UNDECODABLE = TEST_DATA / "undecodable"

STORE_ERROR_LINE = "C-STORE failed with an unexpected error"
"""What the listener logs, with the traceback, when its C-STORE handler raises (pacs_ai/receive/listener.py)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


def expected_result_uid(source_uid: str, model_version: str, kind: str) -> str:
    """The result UID the README and pacs_ai/write/uids.py document, computed here independently.

    Rule: SHA-256 of ``"pacs-ai/result-uid/v1" US source US model_version US kind`` (US = 0x1F), its first 16
    bytes made an RFC 4122 version-5 UUID (version nibble 5, variant bits 10), written as ``2.25.<integer>``
    (PS3.5 B.2). Bit operations by hand, no ``uuid`` module, no product code.
    """
    text = "\x1f".join(["pacs-ai/result-uid/v1", source_uid.strip(), model_version, kind]).encode("utf-8")
    raw = bytearray(hashlib.sha256(text).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50
    raw[8] = (raw[8] & 0x3F) | 0x80
    return f"2.25.{int.from_bytes(raw, 'big')}"


def copies(source: Path, folder: Path, n: int, *, new_study: bool = False, prefix: str = "copy") -> list[Path]:
    """``n`` copies of ``source`` with their own SOP Instance UIDs (and Study/Series UIDs if ``new_study``),
    written as ``folder/<prefix>NNNN.dcm`` (pixels as they are)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    out = []
    for i in range(n):
        if new_study:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{prefix}{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out
