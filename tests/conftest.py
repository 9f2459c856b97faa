"""Shared test helpers and fixtures. Keep this generic: test-specific fixtures go in their own test files.

Helpers importable from any test (``from conftest import free_port, TEST_DATA``):
- ``free_port()``: a TCP port on 127.0.0.1 free right now.
- ``REPO_ROOT``, ``TEST_DATA`` (the committed samples), ``SHARED_DATA`` (../shared/data, may be absent).
Fixtures: ``shared_dicom`` (../shared/data/dicom or skip: only for tests that need the full-size set),
``wg04_files`` (the ten committed small WG-04 files: two images in five encodings, tests/data/wg04),
``undecodable_files`` (the two committed lossy JPEGs the decoders refuse, tests/data/undecodable),
``sample_files`` (the committed tests/data/*.dcm), ``sample_file`` (the small MONOCHROME2 CR).
tests/data/make_samples.py records how the committed samples were made from ../shared.
"""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_DICOM = SHARED_DATA / "dicom"
WG04_SMALL = TEST_DATA / "wg04"
UNDECODABLE = TEST_DATA / "undecodable"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expected_result_uid(source_uid: str, model_version: str, kind: str) -> str:
    """The result UID the README and pacs_ai/write/uids.py document, computed here independently.

    Rule: SHA-256 of ``"pacs-ai/result-uid/v1" US source US model_version US kind`` (US = 0x1F), its first 16
    bytes made an RFC 4122 version-5 UUID (version nibble 5, variant bits 10), written as ``2.25.<integer>``
    (PS3.5 B.2). Bit operations by hand, no ``uuid`` module, no product code.
    """
    import hashlib

    text = "\x1f".join(["pacs-ai/result-uid/v1", source_uid.strip(), model_version, kind]).encode("utf-8")
    raw = bytearray(hashlib.sha256(text).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50
    raw[8] = (raw[8] & 0x3F) | 0x80
    return f"2.25.{int.from_bytes(raw, 'big')}"


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


@pytest.fixture(scope="session")
def shared_dicom() -> Path:
    if not SHARED_DICOM.is_dir():
        pytest.skip(f"shared DICOM data not found at {SHARED_DICOM} (only on the project machine)")
    return SHARED_DICOM


@pytest.fixture(scope="session")
def wg04_files() -> list[Path]:
    """RG2 (MONOCHROME2 hip) and RG3 (MONOCHROME1 tibia), each as UNC, RLE, J2KR, JLSL and JPLL (8x smaller)."""
    files = sorted(WG04_SMALL.glob("*.dcm"))
    assert len(files) == 10, f"the committed WG-04 samples are missing from {WG04_SMALL}"
    return files


@pytest.fixture(scope="session")
def undecodable_files() -> list[Path]:
    files = sorted(UNDECODABLE.glob("*.dcm"))
    assert len(files) == 2, f"the committed undecodable samples are missing from {UNDECODABLE}"
    return files


@pytest.fixture(scope="session")
def sample_files() -> list[Path]:
    files = sorted(TEST_DATA.glob("*.dcm"))
    assert files, f"the committed samples are missing from {TEST_DATA}"
    return files


@pytest.fixture(scope="session")
def sample_file() -> Path:
    return TEST_DATA / "cr_hip_mono2_small.dcm"


STORE_ERROR_LINE = "C-STORE failed with an unexpected error"
"""What the listener logs, with the traceback, when its C-STORE handler raises (pacs_ai/receive/listener.py)."""


class _StoreErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(STORE_ERROR_LINE):
            self.records.append(record)


@pytest.fixture(autouse=True)
def _no_store_handler_errors(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Fail every test during which a C-STORE handler raised an unexpected exception: in this process
    (a listener the test runs) or in a daemon the test started (tests/daemon_harness.py keeps their logs).
    A 0xA700 answer is only right for a resource fault, never for a bug. Tests that provoke one on purpose
    carry ``@pytest.mark.store_errors_expected``."""
    from daemon_harness import STARTED_LOGS

    handler = _StoreErrors()
    logger = logging.getLogger("pacs_ai.receive")
    logger.addHandler(handler)
    STARTED_LOGS.clear()
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if request.node.get_closest_marker("store_errors_expected"):
        return
    found = [f"in this process: {r.getMessage()}\n{logging.Formatter().formatException(r.exc_info)}"
             for r in handler.records if r.exc_info]
    for log in STARTED_LOGS:
        text = log.read_text(errors="replace") if log.is_file() else ""
        at = text.find(STORE_ERROR_LINE)
        if at >= 0:
            found.append(f"in the daemon ({log}):\n{text[at:at + 3000]}")
    if found:
        pytest.fail("unexpected exception(s) in the C-STORE handler (answered 0xA700):\n" + "\n".join(found[:3]),
                    pytrace=False)


class Tmpfs:
    """A small tmpfs mounted for one test: a real full disk (ENOSPC) or read-only file system (EROFS)."""

    def __init__(self, path: Path, size_kb: int) -> None:
        self.path = path
        self.size_kb = size_kb

    def _mount(self, *options: str) -> None:
        import subprocess

        subprocess.run(["mount", *options, self.path], check=True, capture_output=True, timeout=10)

    def resize(self, size_kb: int) -> None:
        self._mount("-o", f"remount,size={size_kb}k")
        self.size_kb = size_kb

    def read_only(self, flag: bool = True) -> None:
        self._mount("-o", "remount," + ("ro" if flag else "rw"))


@pytest.fixture
def tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory ``tmpfs(size_kb) -> Tmpfs``; skips where mounting is not permitted (needs root)."""
    import subprocess

    mounted: list[Path] = []

    def make(size_kb: int = 512) -> Tmpfs:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path)],
            capture_output=True,
            timeout=10,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(path)
        return Tmpfs(path, size_kb)

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def copies(source: Path, folder: Path, n: int, *, new_study: bool = False) -> list[Path]:
    """``n`` copies of ``source`` with their own SOP Instance UIDs (and Study/Series UIDs if ``new_study``)."""
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
        path = folder / f"copy{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out
