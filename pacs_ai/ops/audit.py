"""Audit log: who connected and what was delivered where, one JSON object per line.

``AuditLog`` is an :class:`~pacs_ai.ops.events.Observer`. It records each association request (calling AE
title, peer address, accepted or rejected with the reason), each result delivered (job ID,
destination, seconds from receipt to delivery) and each action asked for on the admin dashboard
(sign-in, retries: who, what, done or refused). Each event is appended to the audit file *and* logged
on the ``pacs_ai.audit`` logger (so it reaches journald too). No patient data is ever written: the
events carry AE titles, addresses and job IDs only.

The file is opened in append mode for each event, so ``logrotate`` may simply move it away (no
``copytruncate`` needed); it is created with mode 0640.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pacs_ai.config import Config
from pacs_ai.errors import StorageError
from pacs_ai.ops.events import NullObserver

__all__ = ["AuditLog", "audit_path"]

logger = logging.getLogger("pacs_ai.audit")


def audit_path(config: Config) -> Path:
    """The audit file of ``config``: ``logging.audit_file``, default ``<data_dir>/audit.log``."""
    return config.logging.audit_file or config.storage.data_dir / "audit.log"


class AuditLog(NullObserver):
    """Appends association and delivery events to ``path`` (JSON lines) and to logger ``pacs_ai.audit``;
    the other Observer events are not audited (NullObserver's)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the audit log folder {self.path.parent}: {exc.strerror or exc}") from exc

    def _write(self, event: str, message: str, fields: dict[str, Any]) -> None:
        entry = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event, **fields}
        line = json.dumps(entry, default=str, ensure_ascii=False) + "\n"
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                try:
                    os.write(fd, line.encode("utf-8"))
                finally:
                    os.close(fd)
            except OSError as exc:  # never let auditing break the DICOM service; say so loudly
                logger.error("cannot write the audit log %s: %s", self.path, exc.strerror or exc)
        logger.info(message, extra={"audit_event": event, **fields})

    # -- Observer events that are audited ---------------------------------------------------------------
    def association(self, calling_aet: str, peer: str, accepted: bool, reason: str = "") -> None:
        fields: dict[str, Any] = {"calling_aet": calling_aet, "peer": peer, "accepted": accepted}
        if reason:
            fields["reason"] = reason
        verdict = "accepted" if accepted else f"rejected ({reason})" if reason else "rejected"
        self._write("association", f"association from {calling_aet!r} at {peer} {verdict}", fields)

    def delivered(self, job_id: int, destination: str, end_to_end_s: float) -> None:
        fields = {"job_id": job_id, "destination": destination, "end_to_end_s": round(float(end_to_end_s), 3)}
        self._write("delivered", f"job {job_id} results delivered to {destination}", fields)

    # -- the admin dashboard ----------------------------------------------------------------------------
    def admin_action(self, action: str, peer: str, ok: bool, detail: str = "", **fields: Any) -> None:
        """An action asked for on the dashboard (``sign_in``, ``retry_job``, ``retry_delivery`` ...), by
        the client at ``peer``, done (``ok``) or refused with ``detail``; ``fields`` name the target
        (``job_id=..``)."""
        entry: dict[str, Any] = {"action": action, "peer": peer, "ok": ok, **fields}
        if detail:
            entry["detail"] = detail
        target = " ".join(f"{k}={v}" for k, v in fields.items())
        verdict = "done" if ok else f"refused ({detail})" if detail else "refused"
        self._write("admin", f"dashboard {action} {target} from {peer}: {verdict}".replace("  ", " "), entry)
