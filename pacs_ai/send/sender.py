"""C-STORE SCU: send result files to one destination over one association.

``send_objects(destination, objects, ...)`` proposes for every object its own transfer syntax plus
Explicit and Implicit VR Little Endian, and for an SR the other SR classes that can carry its content
(contexts.py); it opens one association, sends each object in what the peer accepted (converted by
pydicom when needed), and returns one ``ObjectOutcome`` per object, so that an SC stored while the SR
was refused is recorded as such and a retry sends only what is missing. ``send_files(destination,
paths, ...)`` is the all-or-nothing form: it raises :class:`~pacs_ai.errors.DeliveryError` unless every
file was stored.

Failures, as ``DeliveryError.permanent`` or ``ObjectOutcome.permanent``:

- ``permanent=False`` (retry later with backoff): the peer cannot be reached, the association is
  rejected or aborted, the peer does not answer in time, or it answers with a status that may change
  (0xA7xx out of resources, 0x0110 processing failure, unknown failures);
- ``permanent=True`` (retrying cannot help): a file is missing or not DICOM, the peer accepts none of the
  object's SOP classes in any of its transfer syntaxes, or it answers 0x0122 (SOP class not supported),
  0xA9xx (data set does not match SOP class) or 0xCxxx (cannot understand).

Warning statuses (0x0001, 0xBxxx) count as stored.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from pacs_ai.config import Destination
from pacs_ai.errors import DeliveryError
from pacs_ai.send.contexts import (
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    OutgoingObject,
    accepted_syntaxes,
    choose,
    dataset_to_send,
    propose,
    sop_class_alternatives,
    transfer_syntax_preference,
)
from pacs_ai.send.link import AssociationLink

__all__ = [
    "ContextsRefused",
    "DestinationUnreachable",
    "ObjectOutcome",
    "StoreAnswer",
    "c_store",
    "open_association",
    "is_permanent_status",
    "outgoing_object",
    "send_files",
    "send_objects",
]

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128


class DestinationUnreachable(DeliveryError):
    """No association could be established (connection refused or timed out, association rejected or
    aborted): nothing else will get through to this destination right now either.

    ``kind``: ``"rejected"`` (A-ASSOCIATE-RJ), ``"aborted"`` (aborted during negotiation) or
    ``"unreachable"`` (no connection: refused, unreachable, timed out, TLS handshake failed).
    """

    def __init__(self, destination: str, detail: str, *, kind: str = "unreachable") -> None:
        super().__init__(destination, detail, permanent=False)
        self.kind = kind


def is_permanent_status(status: int) -> bool:
    """True for C-STORE failure statuses that will not change when the same file is sent again."""
    return status == 0x0122 or (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000


def _is_success(status: int) -> bool:
    return status == 0x0000 or status == 0x0001 or (status & 0xF000) == 0xB000


@dataclass(frozen=True)
class ObjectOutcome:
    """What became of one object: stored, or not (``permanent``: retrying cannot help), and as what."""

    key: str
    stored: bool
    permanent: bool = False
    detail: str = ""
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    transfer_syntax_uid: str | None = None
    status: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def outgoing_object(destination: str, key: str, path: Path) -> OutgoingObject:
    """Read what the sender needs of a result file (meta information; an SR's content for alternatives).

    Raises DeliveryError (permanent) when the file is missing or not DICOM.
    """
    try:
        meta = read_file_meta_info(path)
        sop_class, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        sop_instance = str(meta.MediaStorageSOPInstanceUID)
        alternatives: tuple[str, ...] = ()
        if sop_class in (COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR):
            alternatives = sop_class_alternatives(pydicom.dcmread(path, stop_before_pixels=True))
        return OutgoingObject(key, Path(path), sop_class, sop_instance, ts, alternatives)
    except FileNotFoundError as exc:
        raise DeliveryError(destination, f"{path} does not exist", permanent=True) from exc
    except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
        raise DeliveryError(destination, f"{path} is not a readable DICOM file: {exc}", permanent=True) from exc


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    on_stored: Callable[[], None] | None = None,
) -> None:
    """C-STORE every file of ``paths`` to ``destination`` over one association; raise DeliveryError
    unless every one was stored (permanent only when every failure is).

    ``on_stored`` is called once every file was stored, before the association is released, so that the
    caller records the delivery as soon as the peer has the files: a crash after that point cannot make
    the files be sent again.
    """
    files = [Path(p) for p in paths]
    if not files:
        return
    objects = [outgoing_object(destination.name, f"{i}:{p.name}", p) for i, p in enumerate(files)]
    outcomes = send_objects(
        destination, objects, calling_ae_title=calling_ae_title, timeout_s=timeout_s, ssl_context=ssl_context,
        on_all_stored=on_stored,
    )
    failed = [o for o in outcomes if not o.stored]
    if failed:
        raise DeliveryError(destination.name, failed[0].detail, permanent=all(o.permanent for o in failed))


def send_objects(
    destination: Destination,
    objects: Sequence[OutgoingObject],
    *,
    calling_ae_title: str,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    on_object_stored: Callable[[ObjectOutcome], None] | None = None,
    on_all_stored: Callable[[], None] | None = None,
    link: AssociationLink | None = None,
    on_associated: Callable[[], None] | None = None,
    propose_for: Sequence[OutgoingObject] | None = None,
) -> list[ObjectOutcome]:
    """C-STORE ``objects`` to ``destination`` over one association; one outcome per object, in order.

    ``on_object_stored(outcome)`` is called as soon as the peer confirmed an object (before the next one
    and before the release: a crash later cannot make it be sent again); ``on_all_stored()`` once every
    object was stored. Raises :class:`DestinationUnreachable` when no association could be established
    (nothing was sent) and DeliveryError (permanent) when more contexts would be needed than allowed.

    With a ``link`` (``pacs_ai.send.link``) the association is the link's: reused when it is still open
    with the same contexts, and kept open afterwards instead of released. When a reused association turns
    out to be gone (the peer dropped it while it was idle), the objects not yet stored are sent again on a
    new one, once. ``on_associated()`` is called once, as soon as an association is established (before
    the first C-STORE). ``propose_for``: the objects whose presentation contexts are proposed (default
    ``objects``): associations that share a job's objects propose the same contexts, so any of them can
    carry any object and stays reusable for the next job.
    """
    name = destination.name
    if not objects:
        return []
    contexts = propose(propose_for if propose_for is not None else objects)
    if len(contexts) > MAX_CONTEXTS:
        raise DeliveryError(name, f"{len(contexts)} presentation contexts needed, at most {MAX_CONTEXTS}", permanent=True)
    where = _where(destination)
    if link is None:
        try:
            assoc = open_association(
                destination, contexts, calling_ae_title=calling_ae_title, timeout_s=timeout_s, ssl_context=ssl_context
            )
        except ContextsRefused:
            return [_refused_all(obj, where) for obj in objects]
        try:
            if on_associated is not None:
                on_associated()
            outcomes = _send_all(assoc, objects, where, on_object_stored)
            if on_all_stored is not None and all(o.stored for o in outcomes):
                on_all_stored()
            if assoc.is_established:
                assoc.release()
        except BaseException:
            assoc.abort()
            raise
        finally:
            assoc.ae.shutdown()
        return outcomes

    results: dict[str, ObjectOutcome] = {}
    pending = list(objects)
    while pending:
        try:
            assoc, reused = link.acquire(contexts)
        except ContextsRefused:
            for obj in pending:
                results[obj.key] = _refused_all(obj, where)
            break
        try:
            if on_associated is not None:
                on_associated()
                on_associated = None
            outcomes = _send_all(assoc, pending, where, on_object_stored)
        except BaseException:
            link.discard(assoc, abort=True)
            raise
        lost = reused and not assoc.is_established and any(not o.stored and o.status is None for o in outcomes)
        for obj, outcome in zip(pending, outcomes, strict=True):
            results[obj.key] = outcome
        if lost:
            # The peer had dropped the association while it was idle: send what it did not store again.
            link.discard(assoc, abort=True)
            log.info("the association with %s was closed by the peer; sending again on a new one", where)
            pending = [obj for obj, o in zip(pending, outcomes, strict=True) if not o.stored and o.status is None]
            continue
        try:
            final = [results[obj.key] for obj in objects]
            if on_all_stored is not None and all(o.stored for o in final):
                on_all_stored()
        except BaseException:
            link.discard(assoc)
            raise
        link.keep(assoc)
        break
    return [results[obj.key] for obj in objects]


def _send_all(
    assoc: Association,
    objects: Sequence[OutgoingObject],
    where: str,
    on_object_stored: Callable[[ObjectOutcome], None] | None,
) -> list[ObjectOutcome]:
    """C-STORE each object on ``assoc`` in turn; an object after the association ended is not sent."""
    accepted = accepted_syntaxes(assoc.accepted_contexts)
    outcomes: list[ObjectOutcome] = []
    for obj in objects:
        if not assoc.is_established:
            outcomes.append(ObjectOutcome(obj.key, False, False, f"not sent: the association with {where} ended"))
            continue
        outcome = _send_one(assoc, obj, accepted, where)
        outcomes.append(outcome)
        if outcome.stored and on_object_stored is not None:
            on_object_stored(outcome)
    return outcomes


def _where(destination: Destination) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


class ContextsRefused(DeliveryError):
    """The peer accepted none of the proposed presentation contexts (permanent: it will not change)."""


def open_association(
    destination: Destination,
    contexts: Sequence[PresentationContext],
    *,
    calling_ae_title: str,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    evt_handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
) -> Association:
    """Open one association with ``destination`` proposing ``contexts`` (pynetdicom), over TLS when an
    ``ssl_context`` is given (the peer's host name is passed for SNI/host checks). Unlimited PDU size.

    Returns the established association (its ``ae`` must be shut down by the caller after release).
    Raises :class:`ContextsRefused` when the peer accepted none of the contexts and
    :class:`DestinationUnreachable` when no association could be established (connection refused or timed
    out, TLS handshake failed, association rejected or aborted), with the reason.
    """
    name = destination.name
    ae = AE(ae_title=calling_ae_title or "PACSAI")
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    tls_args = (ssl_context, destination.host) if ssl_context is not None else None
    where = _where(destination)
    answer: dict[str, object] = {}

    def on_acse(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)
        if primitive is not None and getattr(primitive, "result", None) in (0x01, 0x02):
            answer["rejected"] = f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"
            answer["permanent"] = primitive.result == 0x01

    def on_open(event: evt.Event) -> None:
        answer["connected"] = True

    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=list(contexts),
            ae_title=destination.ae_title,
            max_pdu=0,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_ACSE_RECV, on_acse), (evt.EVT_CONN_OPEN, on_open), *evt_handlers],
        )
    except (OSError, ssl.SSLError) as exc:
        ae.shutdown()
        raise DestinationUnreachable(name, f"cannot connect to {where}: {exc}") from exc
    if assoc.is_established:
        return assoc
    ae.shutdown()
    if assoc.is_rejected or "rejected" in answer:
        # Even a "permanent" rejection (unknown AE title...) is usually a configuration that someone will
        # fix: retry with backoff; the delivery is dead-lettered after the configured attempts anyway.
        raise DestinationUnreachable(
            name, f"association rejected by {where} ({answer.get('rejected', 'no reason')})", kind="rejected"
        )
    if assoc.is_aborted and not assoc.accepted_contexts and assoc.rejected_contexts:
        raise ContextsRefused(name, f"{where} accepts none of the proposed presentation contexts", permanent=True)
    if assoc.is_aborted and answer.get("connected"):
        # A peer that rejects and closes at once can make the rejection itself be lost (a TCP reset
        # discards it): from here a rejection and an abort during negotiation look the same.
        raise DestinationUnreachable(
            name,
            f"association with {where} aborted during negotiation (the peer rejected or dropped it, or did not answer)",
            kind="aborted",
        )
    raise DestinationUnreachable(name, f"cannot connect to {where} (connection refused, unreachable or timed out)")


NO_RESPONSE = "no response (timeout or abort)"


@dataclass(frozen=True)
class StoreAnswer:
    """The peer's answer to one C-STORE: ``status`` (None when none came: timeout, abort, or the request
    could not be sent, then ``error`` says why) and its Error Comment."""

    status: int | None
    comment: str = ""
    error: str = ""

    @property
    def stored(self) -> bool:
        """Success or warning (0x0000, 0x0001, 0xBxxx): the peer has the object."""
        return self.status is not None and _is_success(self.status)

    @property
    def permanent(self) -> bool:
        """A failure that will not change when the same object is sent again."""
        return self.status is not None and is_permanent_status(self.status)


def c_store(assoc: Association, dataset: Path | pydicom.Dataset, *, msg_id: int = 1) -> StoreAnswer:
    """Send one object (a file as it is on disk, or a dataset pynetdicom encodes for the accepted context)
    on an established association; never raises for a DIMSE failure (see ``StoreAnswer``)."""
    try:
        status_ds = assoc.send_c_store(dataset, msg_id=msg_id)
    except ValueError as exc:  # pynetdicom: no accepted presentation context for the object
        text = str(exc)
        return StoreAnswer(None, error="no accepted presentation context" if "context" in text else text)
    except (OSError, RuntimeError, AttributeError) as exc:
        return StoreAnswer(None, error=f"{type(exc).__name__}: {exc}")
    status = getattr(status_ds, "Status", None) if status_ds is not None else None
    if status is None:
        return StoreAnswer(None, error=NO_RESPONSE)
    return StoreAnswer(int(status), str(getattr(status_ds, "ErrorComment", "") or ""))


def _refused_all(obj: OutgoingObject, where: str) -> ObjectOutcome:
    offered = ", ".join(f"{c} ({', '.join(transfer_syntax_preference(obj.transfer_syntax_uid))})" for c in obj.sop_classes)
    return ObjectOutcome(obj.key, False, True, f"{where} accepts none of the presentation contexts: {offered}")


def _send_one(assoc: Any, obj: OutgoingObject, accepted: dict[str, list[str]], where: str) -> ObjectOutcome:
    """C-STORE one object in the context ``choose`` picks; its outcome (never raises for a DIMSE failure)."""
    choice = choose(obj, accepted)
    if choice is None:
        return _refused_all(obj, where)
    try:
        ds = dataset_to_send(obj, choice)
    except FileNotFoundError:
        return ObjectOutcome(obj.key, False, True, f"{obj.path} does not exist")
    except Exception as exc:  # noqa: BLE001 - unreadable or not convertible: sending it again cannot help
        return ObjectOutcome(obj.key, False, True, f"cannot prepare {obj.path.name} for {where}: {type(exc).__name__}: {exc}")
    sop_instance_uid = obj.sop_instance_uid if isinstance(ds, Path) else str(ds.SOPInstanceUID)
    sent: dict[str, Any] = {
        "sop_class_uid": choice.sop_class_uid, "sop_instance_uid": sop_instance_uid, "transfer_syntax_uid": choice.transfer_syntax_uid
    }
    if choice.sop_class_uid != obj.sop_class_uid or choice.transfer_syntax_uid != obj.transfer_syntax_uid:
        log.info(
            "%s: sending %s as %s in %s (what the peer accepted)",
            where, obj.path.name, UID(choice.sop_class_uid).name, UID(choice.transfer_syntax_uid).name,
        )
    answer = c_store(assoc, ds)
    if answer.status is None:
        if answer.error == NO_RESPONSE:
            detail = f"no C-STORE response from {where} for {obj.path.name} (timeout or abort)"
        else:
            detail = f"sending {obj.path.name} to {where} failed: {answer.error}"
        return ObjectOutcome(obj.key, False, False, detail, **sent)
    status = answer.status
    if not answer.stored:
        detail = f"{where} refused {obj.path.name} with status 0x{status:04X}" + (f": {answer.comment}" if answer.comment else "")
        return ObjectOutcome(obj.key, False, answer.permanent, detail, status=status, **sent)
    if status != 0x0000:
        log.warning("%s stored %s with warning status 0x%04X", where, obj.path.name, status)
    return ObjectOutcome(obj.key, True, False, "", status=status, **sent)
