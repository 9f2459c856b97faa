"""A destination PACS for tests: a pynetdicom Storage SCP on 127.0.0.1 that records what it receives.

``DestSCP`` accepts every storage SOP class in the usual transfer syntaxes and records, for each received
SOP Instance UID, how many times it arrived, its SOP class, Study Instance UID and arrival times. It can be
told to refuse some objects with an error status (``refuse``) and can be stopped and started again on the
same port (``stop()`` / ``start()``), so tests can simulate a PACS that is down or that rejects objects.

    with DestSCP() as dest:                       # listening on dest.port, AE title dest.ae_title
        ...
        dest.wait_for(lambda d: d.total() >= 2, timeout=30)
        dest.counts()                             # {sop_instance_uid: times received}

Used by tests/test_faults.py, tests/test_bad_inputs.py and benchmarks/bench_latency.py.
"""

from __future__ import annotations

import ssl
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from support.common import free_port

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SR_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        COMPREHENSIVE_3D_SR,
    }
)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]


@dataclass
class Received:
    """One object as the destination received it."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str
    at: float  # time.time() when the C-STORE arrived
    status: int  # what we answered
    referenced_sop_instance_uids: tuple[str, ...] = ()
    transfer_syntax: str = ""  # of the presentation context it came in
    association: int = 0  # which association it came in: 1 for the first this SCP accepted, 2 ...


@dataclass
class _Refusal:
    predicate: Callable[[Dataset], bool]
    status: int


@dataclass
class Hold:
    """The next dataset ``predicate`` accepts is held inside the C-STORE handler until ``release``.

    ``entered`` is set when the handler holds it (the whole dataset has arrived; the sender waits for the
    answer); ``assoc`` is that association. ``release(store=True)`` stores and answers success, like a PACS
    that commits on receipt; ``release(store=False)`` answers 0xA700 and keeps nothing, like a PACS that
    commits only with its answer.
    """

    predicate: Callable[[Dataset], bool]
    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    store: bool = True
    assoc: object = None
    sop_instance_uid: str = ""

    def release(self, store: bool) -> None:
        self.store = store
        self.released.set()


@dataclass
class DestSCP:
    """A recording Storage SCP. ``start()`` / ``stop()`` may be called repeatedly; the port stays the same.

    ``keep_datasets=True`` keeps every stored dataset in ``datasets`` (by SOP Instance UID; the last one
    received wins); ``save_dir`` writes each as ``<sop>.dcm`` there as well.
    """

    ae_title: str = "DESTSCP"
    port: int = 0
    keep_datasets: bool = False
    save_dir: Path | None = None
    transfer_syntaxes: list[str] | None = None
    """Accept only these transfer syntaxes (like a restrictive PACS: ``[ImplicitVRLittleEndian]``)."""
    refuse_sop_classes: frozenset[str] = frozenset()
    """SOP classes whose presentation contexts are rejected (e.g. ``{COMPREHENSIVE_3D_SR}``)."""
    ssl_context: ssl.SSLContext | None = None
    """A TLS server context: the destination speaks DICOM TLS (mutual when it requires client certificates)."""
    maximum_associations: int = 10
    """Associations accepted at once; more are rejected (A-ASSOCIATE-RJ, local limit exceeded), as a PACS
    that allows one association per calling AE title does."""
    received: list[Received] = field(default_factory=list)
    datasets: dict[str, Dataset] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
        self._lock = threading.Condition()
        self._refusals: list[_Refusal] = []
        self._holds: list[Hold] = []
        self._server = None
        self._ae: AE | None = None
        self._assoc_numbers: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._assoc_count = 0
        self.associations_ended: list[tuple[int, str]] = []
        """(association number, "released" or "aborted") in the order they ended."""
        self._abort_on: list[Callable[[Dataset], bool]] = []

    # -- configuration ------------------------------------------------------------------------------

    def refuse(self, predicate: Callable[[Dataset], bool], status: int = 0xC000) -> None:
        """Answer ``status`` (not stored, not counted as delivered) to every dataset ``predicate`` accepts."""
        with self._lock:
            self._refusals.append(_Refusal(predicate, status))

    def refuse_studies(self, study_uids: set[str] | frozenset[str], status: int = 0xC000) -> None:
        """Refuse every object of the given studies (results keep the source image's study)."""
        studies = frozenset(study_uids)
        self.refuse(lambda ds: str(ds.get("StudyInstanceUID", "")) in studies, status)

    def hold(self, predicate: Callable[[Dataset], bool]) -> Hold:
        """Hold the next dataset ``predicate`` accepts in the handler (see :class:`Hold`)."""
        hold = Hold(predicate)
        with self._lock:
            self._holds.append(hold)
        return hold

    def abort_on(self, predicate: Callable[[Dataset], bool]) -> None:
        """Abort the association (A-ABORT, no C-STORE response, nothing stored) when the next dataset
        ``predicate`` accepts arrives: a PACS that drops the connection in the middle of a transfer."""
        with self._lock:
            self._abort_on.append(predicate)

    def drop_associations(self) -> int:
        """Abort every open association from this side (a PACS closing idle connections); how many."""
        server = self._server
        active = list(server.active_associations) if server is not None else []
        for assoc in active:
            assoc.abort()
        return len(active)

    def associations(self) -> int:
        """How many associations this SCP has accepted so far."""
        with self._lock:
            return self._assoc_count

    def clear_refusals(self) -> None:
        with self._lock:
            self._refusals.clear()

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> DestSCP:
        if self._server is not None:
            return self
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        ae.maximum_associations = self.maximum_associations
        ae.network_timeout = 30
        ae.acse_timeout = 30
        ae.dimse_timeout = 30
        contexts = {c.abstract_syntax for c in AllStoragePresentationContexts}
        contexts |= {SECONDARY_CAPTURE, *SR_CLASSES}
        for uid in sorted(contexts - set(self.refuse_sop_classes)):
            ae.add_supported_context(uid, self.transfer_syntaxes or TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, lambda event: self._on_ended(event, "released")),
            (evt.EVT_ABORTED, lambda event: self._on_ended(event, "aborted")),
        ]
        deadline = time.monotonic() + 10
        while True:  # the port may linger briefly after a stop
            try:
                self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers,
                                               ssl_context=self.ssl_context)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._ae = ae
        return self

    def stop(self) -> None:
        """Stop listening and drop open associations (like a PACS going down)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def __enter__(self) -> DestSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the handler -------------------------------------------------------------------------------

    def _on_established(self, event) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            if event.assoc not in self._assoc_numbers:
                self._assoc_count += 1
                self._assoc_numbers[event.assoc] = self._assoc_count
            self._lock.notify_all()

    def _on_ended(self, event, how: str) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            number = self._assoc_numbers.get(event.assoc, 0)
            if number and all(n != number for n, _ in self.associations_ended):
                self.associations_ended.append((number, how))
            self._lock.notify_all()

    def _on_store(self, event) -> int:  # type: ignore[no-untyped-def]
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception:  # noqa: BLE001 - a dataset we cannot parse
            return 0xC210
        with self._lock:
            abort = next((p for p in self._abort_on if p(ds)), None)
            if abort is not None:
                self._abort_on.remove(abort)
        if abort is not None:
            event.assoc.abort()
            return 0xA700  # never sent: the association is gone
        with self._lock:
            hold = next((h for h in self._holds if not h.entered.is_set() and h.predicate(ds)), None)
            if hold is not None:
                hold.assoc, hold.sop_instance_uid = event.assoc, str(ds.get("SOPInstanceUID", ""))
                hold.entered.set()
        if hold is not None and not hold.released.wait(300):  # bounded: a test that forgot to release
            raise AssertionError("a held C-STORE was never released")
        with self._lock:
            status = 0x0000 if hold is None or hold.store else 0xA700
            for refusal in self._refusals if status == 0x0000 else ():
                try:
                    if refusal.predicate(ds):
                        status = refusal.status
                        break
                except Exception:  # noqa: BLE001
                    continue
        refs: list[str] = []
        for item in ds.get("ReferencedImageSequence", []) or []:
            refs.append(str(item.get("ReferencedSOPInstanceUID", "")))
        for item in ds.get("SourceImageSequence", []) or []:
            refs.append(str(item.get("ReferencedSOPInstanceUID", "")))
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []) or []:
            for series in study.get("ReferencedSeriesSequence", []) or []:
                for item in series.get("ReferencedSOPSequence", []) or []:
                    refs.append(str(item.get("ReferencedSOPInstanceUID", "")))
        rec = Received(
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            study_instance_uid=str(ds.get("StudyInstanceUID", "")),
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            calling_ae=str(event.assoc.requestor.ae_title).strip(),
            at=time.time(),
            status=status,
            referenced_sop_instance_uids=tuple(dict.fromkeys(r for r in refs if r)),
            transfer_syntax=str(event.context.transfer_syntax),
            association=self._assoc_numbers.get(event.assoc, 0),
        )
        if status == 0x0000 and self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            ds.save_as(self.save_dir / f"{rec.sop_instance_uid}.dcm", enforce_file_format=True)
        with self._lock:
            self.received.append(rec)
            if status == 0x0000 and self.keep_datasets:
                self.datasets[rec.sop_instance_uid] = ds
            self._lock.notify_all()
        return status

    # -- what was received --------------------------------------------------------------------------

    def stored(self) -> list[Received]:
        """Every object answered with success, in arrival order (repeats included)."""
        with self._lock:
            return [r for r in self.received if r.status == 0x0000]

    def refused(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.status != 0x0000]

    def counts(self) -> Counter[str]:
        """Times each SOP Instance UID was stored (success only)."""
        return Counter(r.sop_instance_uid for r in self.stored())

    def duplicates(self) -> dict[str, int]:
        """SOP Instance UIDs stored more than once, with their counts."""
        return {uid: n for uid, n in self.counts().items() if n > 1}

    def total(self) -> int:
        return len(self.stored())

    def by_study(self) -> dict[str, set[str]]:
        """{study UID: SOP class UIDs stored for it}."""
        out: dict[str, set[str]] = {}
        for r in self.stored():
            out.setdefault(r.study_instance_uid, set()).add(r.sop_class_uid)
        return out

    def results_for_studies(self, study_uids: set[str]) -> dict[str, tuple[float | None, float | None]]:
        """{study: (first SC arrival, first SR arrival)} for the given studies (None if not yet)."""
        out: dict[str, list[float | None]] = {s: [None, None] for s in study_uids}
        for r in self.stored():
            slot = out.get(r.study_instance_uid)
            if slot is None:
                continue
            i = 0 if r.sop_class_uid == SECONDARY_CAPTURE else 1 if r.sop_class_uid in SR_CLASSES else None
            if i is not None and slot[i] is None:
                slot[i] = r.at
        return {s: (v[0], v[1]) for s, v in out.items()}

    def complete_studies(self, study_uids: set[str]) -> set[str]:
        """Studies among ``study_uids`` for which both an SC and an SR were stored."""
        return {s for s, (sc, sr) in self.results_for_studies(study_uids).items() if sc and sr}

    def wait_for(self, condition: Callable[[DestSCP], bool], timeout: float) -> bool:
        """Wait (bounded) until ``condition(self)`` holds; returns whether it did."""
        deadline = time.monotonic() + timeout
        with self._lock:  # an RLock: the helpers above may take it again
            while not condition(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.5))
            return True
