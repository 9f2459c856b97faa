"""Delivery processing: the job store's delivery records -> C-STORE to each destination (or the outbox).

Each finished job has one delivery record per destination (created by the job store when the job is
done). ``DeliveryProcessor.run_once()`` gives every destination its own worker thread, which claims
that destination's due deliveries (up to ``batch_size``), sends each job's SC and SR, and records the
outcome. The association to a destination is kept open across deliveries while jobs keep coming and
released after ``keep_open_s`` idle seconds (``pacs_ai.send.link``); a peer that dropped it gets a new one.
With ``associations`` above 1 a job's objects go side by side, each on its own association to the
destination (up to that many, each kept open the same way): the PACS stores the SC and the SR at the
same time (Orthanc: about 110 ms for both instead of 200 ms).

- success (every object stored) -> ``jobs.complete_delivery`` with as what each object went (class,
  transfer syntax), recorded before the association is released, and ``observer.delivered`` (seconds
  since the image was received);
- failure -> ``jobs.fail_delivery`` with each object's outcome: the delivery keeps a state per object (an
  SC stored while the SR was refused shows as such, and a retry sends only what is missing); the store
  applies exponential backoff and dead-letters after the configured attempts, or at once when every
  missing object was refused for good; and ``observer.delivery_failed``. When the destination cannot be reached at all, the
  rest of its batch is failed with the same reason without trying again in this round.

A destination that is down or slow never blocks the others: ``run_once`` waits at most ``max_wait_s``
for the destinations' threads and collects a slow one's outcome in a later call, while the other
destinations go on being served; a destination is never worked on by two threads at once.

With no destination configured, the only destination is the pseudo-destination ``OUTBOX``: "delivering"
copies ``sc.dcm`` and ``sr.dcm`` into ``outbox_dir/<StudyInstanceUID>/<SOPInstanceUID>.dcm``.

With a study store (``studies``), each destination's thread also sends the due study SRs
(``pacs_ai.studies``), after the image results of its round, with the same retries and dead letters.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info

from pacs_ai.config import Destination
from pacs_ai.errors import DeliveryError, LeaseLostError, PacsAiError, ResultFormatError
from pacs_ai.ops.events import NullObserver, Observer
from pacs_ai.queue.records import Delivery, Job
from pacs_ai.results import JobResult, StudyResult
from pacs_ai.send.contexts import OutgoingObject
from pacs_ai.send.link import AssociationLink
from pacs_ai.send.sender import DestinationUnreachable, ObjectOutcome, outgoing_object, send_files, send_objects
from pacs_ai.store.atomic import write_atomic

__all__ = ["OUTBOX", "DeliveryProcessor", "ObjectsNotDelivered", "destination_names", "result_file_map", "result_files"]

log = logging.getLogger(__name__)

OUTBOX = "outbox"
"""The pseudo-destination used when no ``[[destinations]]`` are configured."""

_CLEAN_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


def destination_names(destinations: Sequence[Destination]) -> list[str]:
    """The delivery destinations for a job: the configured names, or ``[OUTBOX]`` when there are none."""
    names = [d.name for d in destinations]
    return names or [OUTBOX]


def result_file_map(result: JobResult | None) -> dict[str, Path]:
    """The DICOM files to deliver by object key, SC first: ``{"sc": ..., "sr": ...}`` (those the result has).

    Raises DeliveryError (permanent) when there is nothing to deliver.
    """
    if result is None:
        raise DeliveryError("-", "the job has no result", permanent=True)
    files = result.files.dicom_files() if result.files is not None else {}
    if not files:
        raise DeliveryError("-", "the job's result names no DICOM files to deliver", permanent=True)
    return files


def result_files(result: JobResult | None) -> list[Path]:
    """The DICOM files to deliver (SC then SR) from a job's result; raises like ``result_file_map``."""
    return list(result_file_map(result).values())


class ObjectsNotDelivered(DeliveryError):
    """Some objects of a delivery were not stored; ``outcomes`` has every object's outcome of this attempt."""

    def __init__(self, destination: str, outcomes: Sequence[ObjectOutcome]) -> None:
        failed = [o for o in outcomes if not o.stored]
        stored = [o.key for o in outcomes if o.stored]
        detail = "; ".join(f"{o.key}: {o.detail}" for o in failed)
        if stored:
            detail = f"{', '.join(stored)} delivered; " + detail
        super().__init__(destination, detail, permanent=all(o.permanent for o in failed))
        self.outcomes = list(outcomes)

    def object_outcomes(self) -> dict[str, dict[str, Any]]:
        """Every object's outcome, for ``JobStore.fail_delivery(objects=...)``."""
        return {o.key: {**o.to_dict(), "stored": o.stored, "error": o.detail, "permanent": o.permanent} for o in self.outcomes}


def _safe_name(uid: str) -> str:
    uid = uid.strip().rstrip("\x00")
    return uid if _CLEAN_UID.match(uid) else re.sub(r"[^0-9A-Za-z.\-]", "_", uid)[:64] or "unknown"


def _seconds_since(now: datetime, then: datetime | None) -> float:
    if then is None:
        return 0.0
    if (now.tzinfo is None) != (then.tzinfo is None):
        now = now.replace(tzinfo=None) if then.tzinfo is None else now.replace(tzinfo=UTC)
    return max(0.0, (now - then).total_seconds())


class _StudyRef:
    """What ``_to_outbox`` needs of a job, for a study SR."""

    def __init__(self, study_instance_uid: str, id: str) -> None:
        self.study_instance_uid = study_instance_uid
        self.id = id


class DeliveryProcessor:
    """Claims due deliveries and sends them; see the module docstring."""

    def __init__(
        self,
        jobs: Any,
        destinations: Sequence[Destination],
        outbox_dir: Path,
        *,
        calling_ae_title: str,
        owner: str,
        timeout_s: float = 30.0,
        ssl_contexts: Mapping[str, ssl.SSLContext] | None = None,
        observer: Observer | None = None,
        batch_size: int = 8,
        max_wait_s: float | None = None,
        studies: Any = None,
        keep_open_s: float = 5.0,
        associations: int = 1,
    ) -> None:
        """``keep_open_s``: how long an association to a destination stays open after its last C-STORE
        (``pacs_ai.send.link``; 0: one association per job, released at once). ``associations``: how many
        associations to a destination one job's objects may use at once (at least 1)."""
        self.jobs = jobs
        self.destinations: dict[str, Destination | None] = {d.name: d for d in destinations}
        if not self.destinations:
            self.destinations = {OUTBOX: None}
        self.outbox_dir = Path(outbox_dir)
        self.calling_ae_title = calling_ae_title
        self.owner = owner
        self.timeout_s = float(timeout_s)
        self.ssl_contexts = dict(ssl_contexts or {})
        self.observer: Observer = observer or NullObserver()
        self.batch_size = max(1, int(batch_size))
        # One association per job: connect + negotiate + two C-STOREs, each bounded by timeout_s.
        self.lease_seconds = 60.0 + 4.0 * self.timeout_s * self.batch_size
        self.max_wait_s = float(max_wait_s) if max_wait_s is not None else self.timeout_s + 5.0
        self.studies = studies
        lanes = max(1, int(associations))
        self.links: dict[str, list[AssociationLink]] = {
            d.name: [
                AssociationLink(
                    d,
                    calling_ae_title=calling_ae_title,
                    timeout_s=self.timeout_s,
                    ssl_context=self.ssl_contexts.get(d.name),
                    keep_open_s=keep_open_s,
                )
                for _ in range(lanes)
            ]
            for d in destinations
        }
        """Each destination's associations (kept open between jobs); a job's objects are dealt out over them."""
        self._one_association: set[str] = set()
        """Destinations that refused a second association: sent to over their first one only."""
        self._side_lanes = (
            ThreadPoolExecutor(max_workers=(lanes - 1) * len(self.links), thread_name_prefix="deliver-side")
            if lanes > 1 and self.links
            else None
        )
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._done: list[int] = []

    def dead_letter_unconfigured(self) -> int:
        """Dead-letter open deliveries to destinations no longer in the configuration; returns how many.

        Without this they would wait for ever: nobody claims deliveries for a name that is not configured.
        Adding the destination back and running ``pacs-ai jobs retry --dead --deliveries`` sends them.
        """
        count = 0
        for name, states in self.jobs.delivery_counts().items():
            if name in self.destinations or not any(states.get(s, 0) for s in ("pending", "failed", "sending")):
                continue
            reason = f"destination {name!r} is no longer configured"
            for delivery in self.jobs.claim_deliveries(self.owner, limit=100_000, destination=name):
                self.jobs.fail_delivery(delivery.id, self.owner, reason, permanent=True)
                self.observer.delivery_failed(delivery.job_id, name, reason, True)
                count += 1
            log.warning("%d delivery(ies) to %r dead-lettered: %s", count, name, reason)
        return count

    # -- the round ---------------------------------------------------------------------------------

    def run_once(self) -> int:
        """One delivery round; returns the number of deliveries attempted whose outcome was collected.

        Starts a thread for every destination that has none running, then waits up to ``max_wait_s`` for
        the threads; outcomes of threads still running are counted by a later call. First releases the
        associations that were kept open but not used for ``keep_open_s``.
        """
        self.release_idle()
        started: list[threading.Thread] = []
        with self._lock:
            for name in self.destinations:
                running = self._threads.get(name)
                if running is not None and running.is_alive():
                    continue
                thread = threading.Thread(
                    target=self._run_destination, args=(name,), name=f"deliver-{name}", daemon=True
                )
                self._threads[name] = thread
                started.append(thread)
        for thread in started:
            thread.start()
        deadline = time.monotonic() + self.max_wait_s
        for thread in started:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            handled = sum(self._done)
            self._done.clear()
        return handled

    def release_idle(self) -> int:
        """Release the associations kept open but idle for ``keep_open_s``; returns how many."""
        return sum(1 for lanes in self.links.values() for link in lanes if link.release_idle())

    def close(self, timeout_s: float = 5.0) -> None:
        """At shutdown: wait up to ``timeout_s`` for running deliveries, then release every association."""
        self.wait_idle(timeout_s)
        for lanes in self.links.values():
            for link in lanes:
                link.close()
        if self._side_lanes is not None:
            self._side_lanes.shutdown(wait=True)

    def busy(self) -> list[str]:
        """Destinations whose delivery thread is still running."""
        with self._lock:
            return [n for n, t in self._threads.items() if t.is_alive()]

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no delivery thread runs (for shutdown and tests); True when idle."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not self.busy()

    def _run_destination(self, name: str) -> None:
        handled = 0
        try:
            handled = self._deliver_batch(name)
            if self.studies is not None:
                handled += self._deliver_study_batch(name)
        except Exception:  # a broken database must not kill the thread silently
            log.exception("delivery round for %s failed", name)
        finally:
            with self._lock:
                self._done.append(handled)

    def _deliver_batch(self, name: str) -> int:
        deliveries = self.jobs.claim_deliveries(
            self.owner, limit=self.batch_size, lease_seconds=self.lease_seconds, destination=name
        )
        unreachable: DeliveryError | None = None
        for delivery in deliveries:
            if unreachable is not None:
                self._failed(delivery, DeliveryError(name, f"not attempted: {unreachable.detail}"))
                continue
            recorded = False
            try:
                job = self.jobs.get(delivery.job_id)

                def record(
                    objects: dict[str, dict[str, Any]] | None = None, delivery: Delivery = delivery, job: Job = job
                ) -> None:
                    nonlocal recorded
                    self._succeeded(delivery, job, objects)
                    recorded = True

                self._deliver_job(name, job, on_stored=record, delivery=delivery)
            except DeliveryError as exc:
                if recorded:  # the files were stored and recorded; only the release went wrong
                    log.warning("delivery %d to %s: stored, but: %s", delivery.id, name, exc.detail)
                    continue
                if isinstance(exc, DestinationUnreachable):
                    unreachable = exc
                self._failed(delivery, exc if exc.destination == name else DeliveryError(name, exc.detail, permanent=exc.permanent))
            except LeaseLostError as exc:
                log.warning("delivery %d to %s: %s", delivery.id, name, exc)
            except PacsAiError as exc:
                if not recorded:
                    self._failed(delivery, DeliveryError(name, str(exc)))
            except Exception as exc:  # noqa: BLE001 - any other failure is retried with backoff
                log.exception("delivery %d to %s failed unexpectedly", delivery.id, name)
                if not recorded:
                    self._failed(delivery, DeliveryError(name, f"{type(exc).__name__}: {exc}"))
            else:
                if not recorded:
                    self._succeeded(delivery, job)
        return len(deliveries)

    def _deliver_study_batch(self, name: str) -> int:
        """Send the due study SRs to ``name``; returns how many were attempted."""
        deliveries = self.studies.claim_deliveries(
            self.owner, limit=self.batch_size, lease_seconds=self.lease_seconds, destination=name
        )
        for delivery in deliveries:
            try:
                study = self.studies.study_of_delivery(delivery)
                try:
                    study_result = StudyResult.read(study.result)
                except ResultFormatError as exc:
                    raise DeliveryError(name, f"study {study.study_instance_uid}: {exc}", permanent=True) from exc
                if study_result is None:
                    raise DeliveryError(name, f"study {study.study_instance_uid} has no study SR", permanent=True)
                path = study_result.sr
                destination = self.destinations.get(name)
                if destination is None:
                    ref = _StudyRef(study.study_instance_uid, f"study{study.id}")
                    self._to_outbox(ref, [path])
                else:
                    send_files(
                        destination,
                        [path],
                        calling_ae_title=self.calling_ae_title,
                        timeout_s=self.timeout_s,
                        ssl_context=self.ssl_contexts.get(name),
                    )
            except LeaseLostError as exc:
                log.warning("study delivery %d to %s: %s", delivery.id, name, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - DeliveryError and anything else: retried or dead
                permanent = isinstance(exc, DeliveryError) and exc.permanent
                detail = exc.detail if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
                try:
                    state = self.studies.fail_delivery(delivery.id, self.owner, detail, permanent=permanent)
                except LeaseLostError as lost:
                    log.warning("study delivery %d to %s: %s", delivery.id, name, lost)
                    continue
                log.warning("study delivery %d to %s failed (%s): %s", delivery.id, name, state.value, detail)
                continue
            try:
                self.studies.complete_delivery(delivery.id, self.owner)
            except LeaseLostError as exc:
                log.warning("study delivery %d to %s was stored but: %s", delivery.id, name, exc)
                continue
            log.info("study %s (revision %d) delivered to %s", study.study_instance_uid, study.revision, name)
        return len(deliveries)

    # -- one job -----------------------------------------------------------------------------------

    def _deliver_job(
        self,
        name: str,
        job: Job,
        on_stored: Callable[..., None] | None = None,
        delivery: Delivery | None = None,
    ) -> None:
        """Send the job's result objects that ``delivery`` has not delivered yet (all without a delivery).

        Raises ObjectsNotDelivered (some objects stored, some not) or DeliveryError.
        """
        try:
            files = result_file_map(job.job_result())
        except DeliveryError as exc:
            raise DeliveryError(name, f"job {job.id}: {exc.detail}", permanent=True) from exc
        except ResultFormatError as exc:
            raise DeliveryError(name, f"job {job.id}: {exc}", permanent=True) from exc
        destination = self.destinations.get(name)
        if destination is None:
            self._to_outbox(job, list(files.values()))
            return
        done = delivery.delivered_objects() if delivery is not None else set()
        missing = {key: path for key, path in files.items() if key not in done}
        if done:
            log.info("job %d to %s: %s already delivered, sending %s", job.id, name, ", ".join(sorted(done)), ", ".join(missing) or "nothing")
        if not missing:
            if on_stored is not None:
                on_stored()
            return
        if delivery is None:
            send_files(
                destination, list(missing.values()), calling_ae_title=self.calling_ae_title,
                timeout_s=self.timeout_s, ssl_context=self.ssl_contexts.get(name), on_stored=on_stored,
            )
            return
        objects = [outgoing_object(name, key, path) for key, path in missing.items()]
        stored: dict[str, dict[str, Any]] = {}
        confirming = threading.Lock()  # side-by-side lanes confirm from two threads

        def confirmed(outcome: ObjectOutcome) -> None:
            with confirming:
                stored[outcome.key] = outcome.to_dict()
                others_unconfirmed = len(stored) < len(objects)
            # Recorded at once while others are unconfirmed (a crash then resends only those); the last
            # one is recorded with the whole delivery.
            if others_unconfirmed:
                try:
                    self.jobs.record_stored_objects(delivery.id, self.owner, {outcome.key: outcome.to_dict()})
                except PacsAiError as exc:  # e.g. the lease was lost: completing the delivery will say so
                    log.warning("delivery %d to %s: %s stored but not recorded yet: %s", delivery.id, name, outcome.key, exc)

        def all_stored() -> None:
            if on_stored is not None:
                on_stored(stored)

        lanes = self.links[name][: len(objects)]

        def send(
            group: Sequence[OutgoingObject],
            link: AssociationLink | None,
            last: Callable[[], None] | None,
            associated: Callable[[], None] | None = None,
        ) -> list[ObjectOutcome]:
            return send_objects(
                destination,
                group,
                calling_ae_title=self.calling_ae_title,
                timeout_s=self.timeout_s,
                ssl_context=self.ssl_contexts.get(name),
                on_object_stored=confirmed,
                on_all_stored=last,
                link=link,
                on_associated=associated,
                propose_for=objects,
            )

        if len(lanes) <= 1 or self._side_lanes is None or name in self._one_association:
            outcomes = send(objects, lanes[0], all_stored)
        else:
            outcomes = self._send_side_by_side(name, objects, lanes, send)
            if all(o.stored for o in outcomes):
                all_stored()
        if not all(o.stored for o in outcomes):
            raise ObjectsNotDelivered(name, outcomes)

    def _send_side_by_side(
        self,
        name: str,
        objects: Sequence[OutgoingObject],
        lanes: Sequence[AssociationLink],
        send: Callable[..., list[ObjectOutcome]],
    ) -> list[ObjectOutcome]:
        """``objects`` dealt out over ``lanes`` (object i on lane i mod n); one outcome per object, in order.

        The first lane associates first and the others start once it is established (a PACS that takes
        one association at a time rejects the second, not the first); then all send at once. A lane that
        could not associate has its objects sent over the first lane after it, and the destination is
        served over one association from then on; a lane that failed otherwise gives its objects an
        outcome "not stored" with the reason. Raises the first lane's error when that lane failed (the
        others never started).
        """
        assert self._side_lanes is not None
        side_lanes = self._side_lanes
        groups = [list(objects[i :: len(lanes)]) for i in range(len(lanes))]
        futures: list[Future[list[ObjectOutcome]]] = []

        def start_the_others() -> None:
            futures.extend(side_lanes.submit(send, group, link, None) for group, link in zip(groups[1:], lanes[1:], strict=True))

        try:
            first = send(groups[0], lanes[0], None, start_the_others)
        finally:
            results: list[list[ObjectOutcome] | DeliveryError] = []
            for future in futures:  # always collected: no lane is left running behind this job
                try:
                    results.append(future.result())
                except DeliveryError as exc:
                    results.append(exc)
        if not futures:  # the first lane's contexts were all refused, nothing associated: the rest in turn
            for group in groups[1:]:
                try:
                    results.append(send(group, lanes[0], None))
                except DeliveryError as exc:
                    results.append(exc)
        elif any(isinstance(r, DestinationUnreachable) for r in results):
            # The PACS took one association but not a second (some allow one per calling AE title): the
            # other objects go over the first association now, and from now on everything does.
            with self._lock:
                self._one_association.add(name)
            log.warning("%s refused a second association; sending to it over one association from now on", name)
            for i, result in enumerate(results):
                if isinstance(result, DestinationUnreachable):
                    try:
                        results[i] = send(groups[i + 1], lanes[0], None)
                    except DeliveryError as exc:
                        results[i] = exc
        by_key: dict[str, ObjectOutcome] = {o.key: o for o in first}
        for group, result in zip(groups[1:], results, strict=True):
            for i, obj in enumerate(group):
                if isinstance(result, DeliveryError):
                    by_key[obj.key] = ObjectOutcome(obj.key, False, result.permanent, result.detail)
                else:
                    by_key[obj.key] = result[i]
        return [by_key[obj.key] for obj in objects]

    def _to_outbox(self, job: Job | _StudyRef, paths: Sequence[Path]) -> None:
        folder = self.outbox_dir / _safe_name(str(job.study_instance_uid or "unknown-study"))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DeliveryError(OUTBOX, f"cannot create {folder}: {exc.strerror or exc}") from exc
        for path in paths:
            try:
                data = path.read_bytes()
            except FileNotFoundError as exc:
                raise DeliveryError(OUTBOX, f"{path} does not exist", permanent=True) from exc
            except OSError as exc:
                raise DeliveryError(OUTBOX, f"cannot read {path}: {exc.strerror or exc}") from exc
            try:
                uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
            except Exception:  # noqa: BLE001 - fall back to the file's own name
                uid = f"{job.id}-{path.stem}"
            try:
                write_atomic(folder / f"{_safe_name(uid)}.dcm", data)
            except PacsAiError as exc:
                raise DeliveryError(OUTBOX, str(exc)) from exc

    # -- outcomes ----------------------------------------------------------------------------------

    def _succeeded(self, delivery: Delivery, job: Job, objects: dict[str, dict[str, Any]] | None = None) -> None:
        try:
            if objects:
                self.jobs.complete_delivery(delivery.id, self.owner, objects)
            else:
                self.jobs.complete_delivery(delivery.id, self.owner)
        except LeaseLostError as exc:
            log.warning("delivery %d to %s was stored but: %s", delivery.id, delivery.destination, exc)
            return
        now = self.jobs.now() if hasattr(self.jobs, "now") else datetime.now(UTC)
        seconds = _seconds_since(now, job.received_at)
        log.info("job %d delivered to %s (%.1f s after receipt)", job.id, delivery.destination, seconds)
        self.observer.delivered(job.id, delivery.destination, seconds)

    def _failed(self, delivery: Delivery, exc: DeliveryError) -> None:
        try:
            if isinstance(exc, ObjectsNotDelivered):
                state = self.jobs.fail_delivery(
                    delivery.id, self.owner, exc.detail, permanent=exc.permanent, objects=exc.object_outcomes()
                )
            else:
                state = self.jobs.fail_delivery(delivery.id, self.owner, exc.detail, permanent=exc.permanent)
        except LeaseLostError as lost:
            log.warning("delivery %d to %s: %s", delivery.id, delivery.destination, lost)
            return
        dead = str(getattr(state, "value", state)) == "dead"
        log.warning(
            "delivery of job %d to %s failed%s: %s",
            delivery.job_id,
            delivery.destination,
            " (dead, no more attempts)" if dead else " (will retry)",
            exc.detail,
        )
        self.observer.delivery_failed(delivery.job_id, delivery.destination, exc.detail, dead)
