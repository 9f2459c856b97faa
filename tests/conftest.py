"""Fixtures shared by every test (helpers live in tests/support: ``from support.common import free_port``).

Fixtures: ``shared_dicom`` (../shared/data/dicom or skip: only for tests that need the full-size set),
``wg04_files`` (the ten committed small WG-04 files: two images in five encodings, tests/data/wg04),
``undecodable_files`` (the two committed lossy JPEGs the decoders refuse, tests/data/undecodable),
``sample_files`` (the committed tests/data/*.dcm), ``sample_file`` (the small MONOCHROME2 CR), ``tmpfs``,
and an autouse check that no C-STORE handler raised during the test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from support.common import SHARED_DICOM, STORE_ERROR_LINE, TEST_DATA, UNDECODABLE, WG04_SMALL


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
    (a listener the test runs) or in a daemon the test started (tests/support/daemon_harness.py keeps their logs).
    A 0xA700 answer is only right for a resource fault, never for a bug. Tests that provoke one on purpose
    carry ``@pytest.mark.store_errors_expected``."""
    from support.daemon_harness import STARTED_LOGS

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
