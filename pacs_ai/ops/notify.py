"""systemd notifications (``sd_notify``) without libsystemd: READY, STATUS, WATCHDOG, STOPPING.

Under a ``Type=notify`` unit systemd sets ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
socket) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC``. Outside systemd both are unset and every method is
a no-op, so the daemon calls them unconditionally. Send errors are logged once, never raised: a lost
notification must not take the DICOM service down.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]

logger = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send ``message`` (``KEY=VALUE`` lines); True when sent, False when disabled or failed."""
        if self._address is None:
            return False
        address = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(message.encode("utf-8"), address)
                return True
            except OSError as exc:
                if not self._warned:
                    logger.warning("cannot notify systemd at %s: %s", self._address, exc)
                    self._warned = True
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                return False

    def ready(self) -> bool:
        """The service is up: systemd considers the start finished."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify("STATUS=" + " ".join(text.split()))

    def watchdog(self) -> bool:
        """Keep-alive for ``WatchdogSec=``; send it every :meth:`watchdog_interval` seconds."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd gives up on the current start or stop."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` calls: half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
        recommends; None when the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2_000_000 if usec > 0 else None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
