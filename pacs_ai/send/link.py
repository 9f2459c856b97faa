"""One association to a destination, kept open across a burst of deliveries (issue 12).

Opening an association costs a TCP connection, the negotiation and, at the end, the release (on
loopback with Orthanc 4-9 ms and 12 ms; more over a network or with TLS). While jobs keep coming, the
delivery thread of a destination sends every job's objects over the same association and releases it
only when nothing was sent for ``keep_open_s`` seconds (``release_idle``, called by every delivery
round), or when asked to (``close``, at shutdown).

``AssociationLink.acquire(contexts)`` returns the open association when it was negotiated with the same
presentation contexts and is still established, else opens a new one (``sender.open_association``: the
same errors, ``DestinationUnreachable`` and ``ContextsRefused``). A peer may release or abort an idle
association at any time (Orthanc, dcmtk and most PACSs close idle ones after a while): a dropped
association is noticed at the next ``acquire`` and replaced, and ``sender.send_objects`` sends again, on a
fresh association, the objects whose C-STORE found a reused association gone. Nothing about what counts
as delivered changes: an object is recorded as stored only when the peer answered a success status.

A link is used by one delivery thread at a time (the processor never runs two for a destination);
``release_idle`` and ``close`` may come from another thread and never take an association that is in use.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from pacs_ai.config import Destination

__all__ = ["AssociationLink", "contexts_key"]

log = logging.getLogger(__name__)

ContextsKey = tuple[tuple[str, tuple[str, ...]], ...]


def contexts_key(contexts: Sequence[PresentationContext]) -> ContextsKey:
    """What was proposed, comparable: (abstract syntax, transfer syntaxes) per context, in order."""
    return tuple((str(c.abstract_syntax), tuple(str(ts) for ts in c.transfer_syntax)) for c in contexts)


class AssociationLink:
    """The association kept open to one destination (see the module docstring)."""

    def __init__(
        self,
        destination: Destination,
        *,
        calling_ae_title: str,
        timeout_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        keep_open_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.destination = destination
        self.calling_ae_title = calling_ae_title
        self.timeout_s = float(timeout_s)
        self.ssl_context = ssl_context
        self.keep_open_s = float(keep_open_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._assoc: Association | None = None
        self._key: ContextsKey | None = None
        self._last_used = 0.0
        self._in_use = False
        self.opened = 0
        """Associations opened so far (for tests and the log)."""

    @property
    def is_open(self) -> bool:
        """True while an association is held (it may have been dropped by the peer since)."""
        with self._lock:
            return self._assoc is not None

    @property
    def is_established(self) -> bool:
        """True while an association is held and still established (the peer has not dropped it)."""
        with self._lock:
            return self._assoc is not None and bool(self._assoc.is_established)

    def acquire(self, contexts: Sequence[PresentationContext]) -> tuple[Association, bool]:
        """(an established association proposing ``contexts``, whether it was reused).

        Raises what ``sender.open_association`` raises when a new one cannot be opened.
        """
        from pacs_ai.send.sender import open_association

        key = contexts_key(contexts)
        with self._lock:
            assoc, self._assoc = self._assoc, None
            stale = assoc is not None and (
                self._key != key or not assoc.is_established or self.clock() - self._last_used > self.keep_open_s
            )
            self._in_use = True
        if assoc is not None and stale:
            _end(assoc, release=assoc.is_established)
            assoc = None
        if assoc is not None:
            return assoc, True
        try:
            assoc = open_association(
                self.destination,
                contexts,
                calling_ae_title=self.calling_ae_title,
                timeout_s=self.timeout_s,
                ssl_context=self.ssl_context,
            )
        except BaseException:
            with self._lock:
                self._in_use = False
            raise
        self.opened += 1
        with self._lock:
            self._key = key
        return assoc, False

    def keep(self, assoc: Association) -> None:
        """Hand back an association after use: kept open (until idle) when it is still established."""
        if self.keep_open_s <= 0 or not assoc.is_established:
            self.discard(assoc, abort=not assoc.is_established)
            return
        with self._lock:
            self._assoc = assoc
            self._last_used = self.clock()
            self._in_use = False

    def discard(self, assoc: Association, *, abort: bool = False) -> None:
        """End an association after use (released, or aborted when ``abort`` or no longer usable)."""
        with self._lock:
            if self._assoc is assoc:
                self._assoc = None
            self._in_use = False
        _end(assoc, release=not abort and assoc.is_established)

    def release_idle(self) -> bool:
        """Release the held association when unused for ``keep_open_s``; True when one was released."""
        with self._lock:
            assoc = self._assoc
            if assoc is None or self._in_use or self.clock() - self._last_used < self.keep_open_s:
                return False
            self._assoc = None
        log.debug("releasing the idle association with %s", self.destination.name)
        _end(assoc, release=assoc.is_established)
        return True

    def close(self) -> None:
        """Release the held association now (shutdown)."""
        with self._lock:
            assoc, self._assoc = self._assoc, None
        if assoc is not None:
            _end(assoc, release=assoc.is_established)


def _end(assoc: Association, *, release: bool) -> None:
    try:
        if release:
            assoc.release()
        else:
            assoc.abort()
    except Exception as exc:  # noqa: BLE001 - the peer went away meanwhile: nothing left to end
        log.debug("ending an association: %s: %s", type(exc).__name__, exc)
    finally:
        assoc.ae.shutdown()
