"""A real Orthanc PACS for tests (Debian package ``orthanc``), started and stopped from the test.

``OrthancServer`` writes its own JSON configuration into a temporary folder (storage and index there
too), picks free local ports for DICOM and HTTP, starts ``Orthanc CONFIG.json`` as a subprocess, waits
(bounded) until ``GET /system`` answers, and stops it on ``stop()`` / context exit. It can be stopped and
started again on the same ports and storage (a PACS going down and coming back). ``RemoteAccessAllowed``
is false and authentication is off: only local HTTP clients are served. (Orthanc 1.10 has no bind
address option: its DICOM port listens on all interfaces.)

    with OrthancServer(tmp_path / "orthanc", modalities={"pacsai": ("PACSAI", "127.0.0.1", 11112)}) as pacs:
        pacs.storescu(paths)                           # upload with dcmtk, each file in its own syntax
        pacs.get("/studies")                           # REST, JSON decoded
        pacs.post("/modalities/pacsai/store", [...])   # forward instances to a modality

Also usable as a pytest fixture through ``orthanc_server`` (skips when Orthanc is not installed).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from support.common import free_port

__all__ = ["ORTHANC_BINARY", "OrthancError", "OrthancServer", "orthanc_available", "orthanc_server", "storescu"]

ORTHANC_BINARY = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed."""


def orthanc_available() -> bool:
    return ORTHANC_BINARY is not None


class OrthancServer:
    """One Orthanc process with its own configuration, storage and ports (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.extra_config = dict(extra_config or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "orthanc.log"
        self.config_path = self.folder / "orthanc.json"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # -- lifecycle ------------------------------------------------------------------------------------

    def write_config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": f"pacs-ai-test-{self.aet}",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: list(spec) for name, spec in self.modalities.items()},
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "OverwriteInstances": True,
            "SaveJobs": False,
            "Plugins": [],
            "ConcurrentJobs": 2,
            "HttpTimeout": 60,
            "StableAge": 2,
        }
        config.update(self.extra_config)
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return self.config_path

    def start(self, timeout_s: float = START_TIMEOUT_S) -> OrthancServer:
        if self.process is not None and self.process.poll() is None:
            return self
        if ORTHANC_BINARY is None:
            raise OrthancError("Orthanc is not installed (Debian package orthanc)")
        self.write_config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
        try:
            self.process = subprocess.Popen(
                [ORTHANC_BINARY, str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.folder,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.process.returncode} at start:\n{self.log_tail()}")
            try:
                self.get("/system", timeout=2)
                return self
            except (OrthancError, OSError):
                time.sleep(0.2)
        self.stop()
        raise OrthancError(f"Orthanc did not answer /system within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after ``timeout_s``); storage and index stay for a restart."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def restart(self) -> OrthancServer:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- REST ---------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 60.0, raw: bool = False) -> Any:
        data = None
        headers = {}
        if body is not None:
            if isinstance(body, (bytes, bytearray)):
                data = bytes(body)
            elif isinstance(body, str):
                data = body.encode("utf-8")
            else:
                data = json.dumps(body).encode("utf-8")
                headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - local test server
                payload = resp.read()
                content_type = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {detail}") from exc
        except urllib.error.URLError as exc:
            raise OrthancError(f"{method} {path}: {exc.reason}") from exc
        if raw:
            return payload, content_type
        if "json" in content_type:
            return json.loads(payload or b"null")
        return payload

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, body, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    # -- conveniences -------------------------------------------------------------------------------

    def upload(self, paths: Sequence[Path]) -> list[str]:
        """Upload files through REST (POST /instances); returns Orthanc instance IDs."""
        ids = []
        for path in paths:
            answer = self.post("/instances", Path(path).read_bytes())
            ids.append(answer["ID"])
        return ids

    def storescu(self, paths: Sequence[Path], *, calling_aet: str = "STORESCU", timeout_s: float = 120.0) -> None:
        """Send files to this Orthanc with dcmtk ``storescu`` (see :func:`storescu`)."""
        storescu(paths, "127.0.0.1", self.dicom_port, self.aet, calling_aet=calling_aet, timeout_s=timeout_s)

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Main DICOM tags of every instance of the study with this StudyInstanceUID (empty when unknown)."""
        found = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        if not found:
            return []
        return list(self.get(f"/studies/{found[0]}/instances"))

    def sop_uids(self) -> list[str]:
        """SOP Instance UIDs of every instance stored, one per instance (repeats show duplicates)."""
        out = []
        for study in self.get("/studies"):
            for inst in self.get(f"/studies/{study}/instances"):
                out.append(inst["MainDicomTags"]["SOPInstanceUID"])
        return out


_TS_FLAGS = {
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu(
    paths: Sequence[Path], host: str, port: int, called_aet: str, *, calling_aet: str = "STORESCU",
    timeout_s: float = 120.0,
) -> None:
    """Send each file with dcmtk ``storescu`` in its own transfer syntax (``-R`` plus that syntax's ``-x``
    option: storescu keeps only the last ``-x`` option given, so one call per file). Raises OrthancError."""
    binary = shutil.which("storescu")
    if binary is None:
        raise OrthancError("storescu (dcmtk) is not installed")
    for path in paths:
        cmd = [binary, "-R", _storescu_flag(Path(path)) or "-xe", "-aet", calling_aet, "-aec", called_aet, host,
               str(port), str(path)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise OrthancError(f"storescu {Path(path).name} failed ({out.returncode}): {out.stderr[-800:]}")


def _storescu_flag(path: Path) -> str | None:
    try:
        from pydicom.filereader import read_file_meta_info

        return _TS_FLAGS.get(str(read_file_meta_info(path).TransferSyntaxUID))
    except Exception:  # noqa: BLE001
        return None


@pytest.fixture
def orthanc_server(tmp_path: Path) -> Iterator[OrthancServer]:
    """A started Orthanc with no modalities (tests needing modalities build their own OrthancServer)."""
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    server = OrthancServer(tmp_path / "orthanc")
    try:
        yield server.start()
    finally:
        server.stop()
