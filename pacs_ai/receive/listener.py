"""The DICOM listener: C-ECHO and C-STORE for projection radiographs.

The C-STORE handler only writes and acknowledges: it reads four UIDs from the head of the dataset
(pixel data is never decoded), writes the received bytes durably to the spool, commits the job, and only
then answers 0x0000. Any failure before that gets an error status (see contexts.py), so the sender keeps
its copy and retries. Decoding and inference run elsewhere (the worker), never on an association thread.

A resend is recognised by SOP Instance UID and the SHA-256 of the stored file: identical bytes are a
duplicate (acknowledged, no new job); different bytes (a corrected header, or the same instance
re-encoded by another sender, e.g. dcmtk re-encodes item lengths) re-queue the existing job.

A peer that aborts or disconnects in the middle of a C-STORE is logged (calling AE title, address, bytes
of the incomplete message received; nothing of it is stored, and it was never acknowledged, so the
sender still holds the image). The count comes from the P-DATA PDUs received since the last complete
DIMSE message.

Log lines name SOP Instance UIDs, job IDs and calling AE titles, never patient attributes.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType

from pacs_ai.config import ListenerConfig
from pacs_ai.errors import ConfigError, JobStoreError, PacsAiError, StorageError
from pacs_ai.ops.events import NullObserver, Observer
from pacs_ai.queue.jobstore import JobStore
from pacs_ai.receive import contexts as cx
from pacs_ai.store.digest import dataset_digest
from pacs_ai.store.spool import Spool

log = logging.getLogger("pacs_ai.receive")

_TAG_SOP_CLASS = 0x00080016
_TAG_SOP_INSTANCE = 0x00080018
_TAG_STUDY = 0x0020000D
_TAG_SERIES = 0x0020000E
_HEADER_LIMIT = 1 << 20  # bytes of a deflated dataset inflated to read its UIDs


def _stop_after_series(tag: Any, vr: Any, length: int) -> bool:
    return int(tag) > _TAG_SERIES


@dataclass(frozen=True)
class HeaderUids:
    """The four UIDs the listener reads from the head of a received data set to create a job.

    Each is the element's value stripped of padding (spaces, NUL), or ``""`` when the element is absent
    or not a string.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str

    def problems(self) -> list[str]:
        """The attribute names that are missing, empty or longer than 64 characters (a UID's limit)."""
        values = {
            "sop_instance_uid": self.sop_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_class_uid": self.sop_class_uid,
        }
        return [name for name, value in values.items() if not value or len(value) > 64]


def read_header_uids(stream: BytesIO, transfer_syntax: UID) -> HeaderUids:
    """SOP Class/Instance, Study and Series Instance UIDs from an encoded dataset, reading only its head.

    Raises whatever pydicom raises on a data set it cannot parse.
    """
    implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    if transfer_syntax.is_deflated:
        inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(stream.getvalue(), _HEADER_LIMIT)
        fp: BytesIO = BytesIO(inflated)
        implicit, little = False, True
    else:
        fp = stream
        fp.seek(0)
    ds: Dataset = read_dataset(fp, implicit, little, stop_when=_stop_after_series)

    def value(tag: int) -> str:
        elem = ds.get(tag)
        raw = elem.value if elem is not None else None
        return raw.strip().rstrip("\x00").strip() if isinstance(raw, str) else ""

    return HeaderUids(
        sop_class_uid=value(_TAG_SOP_CLASS),
        sop_instance_uid=value(_TAG_SOP_INSTANCE),
        study_instance_uid=value(_TAG_STUDY),
        series_instance_uid=value(_TAG_SERIES),
    )


class Listener:
    """A pynetdicom storage SCP that spools and queues what it receives."""

    STOP_GRACE_S = 10.0

    def __init__(
        self,
        config: ListenerConfig,
        spool: Spool,
        jobs: JobStore,
        *,
        observer: Observer | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.jobs = jobs
        self.observer: Observer = observer or NullObserver()
        self.ssl_context = ssl_context
        self._server: Any = None
        self._lock = threading.Lock()
        self._allowed = {a.strip() for a in config.allowed_calling_aets if a.strip()}
        self._partial: dict[int, int] = {}  # id(association) -> bytes of the message being received
        self._peer_aborted: set[int] = set()  # associations whose peer sent an A-ABORT
        self._partial_lock = threading.Lock()
        self.ae = self._build_ae()

    # -- lifecycle ---------------------------------------------------------------------------------

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu_size
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout = self.config.network_timeout_s
        ae.dimse_timeout = self.config.network_timeout_s
        ae.acse_timeout = min(30.0, self.config.network_timeout_s)
        if self._allowed:
            try:
                ae.require_calling_aet = sorted(self._allowed)
            except ValueError as exc:  # pynetdicom validates AE titles (1 to 16 characters, no backslash)
                raise ConfigError("listener.allowed_calling_aets", str(exc)) from exc
        for sop_class in cx.IMAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(cx.TRANSFER_SYNTAXES))
        ae.add_supported_context(cx.VERIFICATION_SOP_CLASS)
        return ae

    def start(self) -> None:
        """Start listening in background threads (returns at once)."""
        with self._lock:
            if self._server is not None:
                return
            handlers: list[EventHandlerType] = [
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_C_ECHO, self._on_echo),
                (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_REJECTED, self._on_rejected),
                (evt.EVT_PDU_RECV, self._on_pdu),
                (evt.EVT_DIMSE_RECV, self._on_message),
                (evt.EVT_ABORTED, self._on_ended),
                (evt.EVT_CONN_CLOSE, self._on_ended),
            ]
            address = (self.config.host, self.config.port)
            try:
                self._server = self.ae.start_server(
                    address, block=False, evt_handlers=handlers, ssl_context=self.ssl_context
                )
            except OSError as exc:
                raise PacsAiError(
                    f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
                ) from exc
        allowed = ", ".join(sorted(self._allowed))
        log.info(
            "listening as %s on %s:%d (%s)",
            self.config.ae_title,
            self.config.host,
            self.port,
            f"calling AE titles allowed: {allowed}" if allowed else "any calling AE title",
        )

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting associations, give those in flight ``grace_s`` seconds to end, abort the rest."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + (self.STOP_GRACE_S if grace_s is None else grace_s)
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:
            assoc.abort()
        if remaining:
            log.warning("stopped: aborted %d association(s) still open after the grace period", len(remaining))
        else:
            log.info("stopped listening")

    @property
    def port(self) -> int:
        server = self._server
        if server is not None:
            return int(server.server_address[1])
        return self.config.port

    @property
    def running(self) -> bool:
        return self._server is not None

    # -- event handlers ----------------------------------------------------------------------------

    @staticmethod
    def _peer(event: Any) -> tuple[str, str]:
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title or "").strip()
        return calling, f"{requestor.address}:{requestor.port}"

    def _notify(self, event: Callable[[], None], name: str) -> None:
        """Call ``event`` (a closure over one ``Observer`` method); an observer never breaks the service."""
        try:
            event()
        except Exception:  # an observer must never break the DICOM service
            log.exception("observer %s failed", name)

    def _on_echo(self, event: Any) -> int:
        return cx.STATUS_SUCCESS

    def _on_accepted(self, event: Any) -> None:
        calling, peer = self._peer(event)
        log.info("association accepted from %s at %s", calling, peer)
        self._notify(lambda: self.observer.association(calling, peer, True, ""), "association")

    def _on_rejected(self, event: Any) -> None:
        calling, peer = self._peer(event)
        if self._allowed and calling not in self._allowed:
            reason = "calling AE title not allowed"
        else:
            reason = f"too many associations (max_associations = {self.config.max_associations})"
        log.warning("association from %s at %s rejected: %s", calling, peer, reason)
        self._notify(lambda: self.observer.association(calling, peer, False, reason), "association")

    def _on_pdu(self, event: Any) -> None:
        pdu_type = getattr(getattr(event, "pdu", None), "pdu_type", None)
        if pdu_type == 0x04:  # P-DATA-TF: part of a DIMSE message
            with self._partial_lock:
                key = id(event.assoc)
                self._partial[key] = self._partial.get(key, 0) + int(getattr(event.pdu, "pdu_length", 0)) + 6
        elif pdu_type == 0x07:  # A-ABORT from the peer
            with self._partial_lock:
                self._peer_aborted.add(id(event.assoc))

    def _on_message(self, event: Any) -> None:
        with self._partial_lock:
            self._partial.pop(id(event.assoc), None)

    def _on_ended(self, event: Any) -> None:
        """Abort or connection close: log a C-STORE cut off in the middle (once per association)."""
        with self._partial_lock:
            received = self._partial.pop(id(event.assoc), 0)
            aborted = id(event.assoc) in self._peer_aborted
            self._peer_aborted.discard(id(event.assoc))
        if not received:
            return
        calling, peer = self._peer(event)
        how = "aborted (A-ABORT)" if aborted else "disconnected"
        log.warning(
            "association from %s at %s %s in the middle of a C-STORE: %d bytes of an incomplete message "
            "received, nothing stored (not acknowledged: the sender still holds the image)",
            calling or "(no AE title)", peer, how, received,
        )

    def _on_store(self, event: Any) -> int:
        try:
            status, reason = self._store(event)
        except Exception as exc:  # never let an exception escape into pynetdicom: a bug, logged and counted
            log.exception("C-STORE failed with an unexpected error; answering 0xA700")
            name = type(exc).__name__
            self._notify(lambda: self.observer.store_error(name), "store_error")
            status, reason = cx.STATUS_OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}"
        if status != cx.STATUS_SUCCESS:
            self._notify(lambda: self.observer.image_rejected(status, reason), "image_rejected")
        return status

    def _store(self, event: Any) -> tuple[int, str]:
        started = time.monotonic()
        calling, peer = self._peer(event)
        request = event.request
        affected_uid = str(request.AffectedSOPInstanceUID or "").strip()
        affected_class = str(request.AffectedSOPClassUID or "").strip()
        transfer_syntax = UID(str(event.context.transfer_syntax))

        def refuse(status: int, reason: str) -> tuple[int, str]:
            log.warning(
                "C-STORE of SOP Instance %s from %s at %s refused with 0x%04X (%s): %s",
                affected_uid or "(none)",
                calling,
                peer,
                status,
                cx.status_name(status),
                reason,
            )
            return status, reason

        try:
            uids = read_header_uids(request.DataSet, transfer_syntax)
        except Exception as exc:  # pydicom raises many types on garbage
            detail = str(exc).splitlines()[0][:160] if str(exc) else ""  # no element values beyond that
            return refuse(cx.STATUS_CANNOT_UNDERSTAND, f"dataset cannot be parsed ({type(exc).__name__}: {detail})")

        missing = uids.problems()
        if missing:
            return refuse(cx.STATUS_MISSING_UID, f"missing, empty or over-long: {', '.join(missing)}")
        if uids.sop_instance_uid != affected_uid:
            return refuse(
                cx.STATUS_INSTANCE_MISMATCH,
                f"dataset SOP Instance UID {uids.sop_instance_uid} differs from the request's",
            )
        if uids.sop_class_uid != affected_class or uids.sop_class_uid not in cx.IMAGE_SOP_CLASSES:
            return refuse(
                cx.STATUS_SOP_CLASS_MISMATCH,
                f"dataset SOP Class UID {uids.sop_class_uid} does not match the request's "
                f"{affected_class} or is not an accepted image class",
            )

        uid = uids.sop_instance_uid
        try:
            data = event.encoded_dataset(include_meta=True)
            stored = self.spool.store(uid, data)
            del data
            with request.DataSet.getbuffer() as encoded:  # the data set as received, no copy
                content = dataset_digest(
                    encoded,
                    implicit_vr=transfer_syntax.is_implicit_VR,
                    little_endian=transfer_syntax.is_little_endian,
                    deflated=transfer_syntax.is_deflated,
                )
            outcome = self.jobs.enqueue(
                sop_instance_uid=uid,
                study_instance_uid=uids.study_instance_uid,
                series_instance_uid=uids.series_instance_uid,
                sop_class_uid=uids.sop_class_uid,
                calling_aet=calling[:16],
                spool_path=str(stored.path),
                sha256=content,  # resends that differ only in file meta, length encoding or padding are duplicates
                size=stored.size,
            )
        except StorageError as exc:
            return refuse(cx.STATUS_OUT_OF_RESOURCES, f"spool write failed: {exc}")
        except JobStoreError as exc:
            return refuse(cx.STATUS_OUT_OF_RESOURCES, f"job commit failed: {exc}")
        except OSError as exc:
            return refuse(cx.STATUS_OUT_OF_RESOURCES, f"I/O error: {exc.strerror or exc}")

        elapsed_ms = (time.monotonic() - started) * 1000
        if outcome.created:
            log.info(
                "stored SOP Instance %s (%d bytes, %s) from %s as job %d in %.0f ms",
                uid, stored.size, transfer_syntax.name, calling, outcome.job_id, elapsed_ms,
            )
        elif outcome.content_changed:
            log.warning(
                "UID collision with changed content: SOP Instance %s from %s arrived again with "
                "different bytes (changed, or re-encoded by the sender); job %d re-queued with the "
                "new file (sha256 %s)",
                uid, calling, outcome.job_id, content[:16],
            )
        else:
            log.info(
                "duplicate: SOP Instance %s from %s is already job %d with the same content; no new job",
                uid, calling, outcome.job_id,
            )
        duplicate = not outcome.created and not outcome.content_changed
        self._notify(
            lambda: self.observer.image_received(outcome.job_id, uid, stored.size, duplicate), "image_received"
        )
        return cx.STATUS_SUCCESS, ""
