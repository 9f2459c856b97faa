"""The durable spool: every received instance is written here before it is acknowledged.

Each instance is written with ``pacs_ai.store.atomic.write_atomic`` (temporary file, fsync, rename,
folder fsync), so after it returns the file survives a crash or power loss, and a reader never sees a
half-written file. ``Spool`` lays instances out as ``root/<2 hex>/<uid>.dcm``, the
two hex digits being the start of the SHA-1 of the SOP Instance UID (256 folders, evenly filled).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pacs_ai.errors import StorageError
from pacs_ai.store.atomic import TEMP_SUFFIX, describe_os_error, fsync_dir, temp_writer_pid, write_atomic

_CLEAN_UID = re.compile(r"^[0-9.]{1,64}$")


@dataclass(frozen=True)
class StoredFile:
    path: Path
    sha256: str
    size: int


def spool_name(sop_instance_uid: str) -> str:
    """The file name for a UID: the UID itself when it is a plain UID, else a sanitised name + hash."""
    uid = sop_instance_uid.strip().rstrip("\x00")
    if _CLEAN_UID.match(uid) and uid not in (".", ".."):
        return f"{uid}.dcm"
    clean = re.sub(r"[^0-9A-Za-z.\-]", "_", uid)[:64].strip(".") or "uid"
    digest = hashlib.sha1(uid.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{clean}_{digest}.dcm"


class Spool:
    """Received instances, one file per SOP Instance UID, written with :func:`write_atomic`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, sop_instance_uid: str) -> Path:
        uid = sop_instance_uid.strip().rstrip("\x00")
        prefix = hashlib.sha1(uid.encode("utf-8", "surrogateescape")).hexdigest()[:2]
        return self.root / prefix / spool_name(uid)

    def _ensure_dir(self, folder: Path) -> None:
        if folder.is_dir():
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            folder.mkdir(exist_ok=True)
            fsync_dir(self.root)
        except OSError as exc:
            raise StorageError(describe_os_error(exc, folder)) from exc

    def store(self, sop_instance_uid: str, data: bytes) -> StoredFile:
        """Write ``data`` as the file of ``sop_instance_uid`` (replacing an older copy) durably."""
        if not sop_instance_uid or not sop_instance_uid.strip():
            raise StorageError("cannot store an instance without a SOP Instance UID")
        path = self.path_for(sop_instance_uid)
        self._ensure_dir(path.parent)
        sha256 = hashlib.sha256(data).hexdigest()
        write_atomic(path, data)
        return StoredFile(path=path, sha256=sha256, size=len(data))

    def remove_stale_temp(
        self, older_than_s: float = 3600.0, *, writer_alive: Callable[[int], bool] | None = None
    ) -> int:
        """Delete temporary files left by a crash in the middle of a write; returns how many.

        A temporary file (``.<name>.<pid>.<hex>.tmp``, ``pacs_ai.store.atomic.temp_path``) goes when it is
        older than ``older_than_s``, or, with ``writer_alive``, when the process that wrote it is gone
        (``writer_alive(pid)`` false): what a listener killed during a write left (that C-STORE was never
        acknowledged, so its sender sends the image again). With listeners on several hosts sharing one
        spool a live writer elsewhere with the same pid number could lose its file in that moment; its
        C-STORE then fails and is sent again.
        """
        removed = 0
        cutoff = time.time() - older_than_s
        if not self.root.is_dir():
            return 0
        for tmp in self.root.glob(f"*/.*{TEMP_SUFFIX}"):
            try:
                gone = writer_alive is not None and not writer_alive(temp_writer_pid(tmp))
            except ValueError:  # not our naming: only the age counts
                gone = False
            try:
                if gone or tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except OSError:
                continue
        return removed
