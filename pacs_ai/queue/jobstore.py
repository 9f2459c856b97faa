"""The job store facade: one job per received SOP instance, leased claims, retries with backoff, deliveries.

The parts, one job each: ``records`` (rows as frozen dataclasses, states), ``retry`` (the retry/dead
decision), ``engine`` (SQLAlchemy engine, SQLite pragmas, transactions), ``leases`` (the leased state
machine jobs, deliveries and study deliveries share), ``models`` and ``migrations`` (the schema). This
module keeps the API the rest of pacs-ai uses. All times are timezone-aware UTC.

Attempts are counted when a job (or delivery) is claimed; ``release`` gives the attempt back. A job whose
lease expires is claimable again; once it has used ``max_attempts`` claims it is dead-lettered instead,
so an image that crashes the worker every time cannot loop forever.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from pacs_ai.errors import JobStoreError
from pacs_ai.queue import leases, migrations
from pacs_ai.queue.engine import Database, missing_sqlite_file, short_error
from pacs_ai.queue.leases import LeasedKind
from pacs_ai.queue.models import deliveries as D
from pacs_ai.queue.models import jobs as J
from pacs_ai.queue.records import (
    MAX_ERROR_CHARS,
    Delivery,
    DeliveryState,
    EnqueueOutcome,
    Job,
    JobState,
    delivery_from_row,
    job_from_row,
    merge_objects,
)
from pacs_ai.queue.retry import RetryPolicy
from pacs_ai.results import JobResult

if TYPE_CHECKING:
    from pacs_ai.config import Config

__all__ = [
    "DELIVERY_LEASES",
    "JOB_LEASES",
    "MAX_ERROR_CHARS",
    "Delivery",
    "DeliveryState",
    "EnqueueOutcome",
    "Job",
    "JobState",
    "JobStore",
    "RetryPolicy",
    "open_job_store",
]

_CHUNK = 500

JOB_LEASES = LeasedKind(
    J,
    "job",
    "jobs",
    fresh=JobState.QUEUED,
    leased=JobState.RUNNING,
    done=JobState.DONE,
    failed=JobState.FAILED,
    dead=JobState.DEAD,
    started_column="started_at",
    finished_column="finished_at",
    expired_detail=" (the worker crashed or hung while processing this image)",
)
DELIVERY_LEASES = LeasedKind(
    D,
    "delivery",
    "deliveries",
    fresh=DeliveryState.PENDING,
    leased=DeliveryState.SENDING,
    done=DeliveryState.DONE,
    failed=DeliveryState.FAILED,
    dead=DeliveryState.DEAD,
    delivered_column="delivered_at",
)


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


class JobStore:
    """Jobs and deliveries in a SQL database (SQLite file or PostgreSQL URL).

    ``job_policy`` and ``delivery_policy`` decide retries (:class:`RetryPolicy`); ``busy_timeout_s`` is how
    long an SQLite writer waits for the lock; ``clock`` returns the current time (tests pass their own).

    Opening does not migrate: without ``upgrade`` the schema version is only read, and a database that
    does not exist, or whose schema is older or newer than this program's, is refused with a
    JobStoreError (naming ``pacs-ai db upgrade`` when an upgrade would help), with nothing written.
    ``upgrade=True`` creates or upgrades the schema first (:func:`migrations.upgrade`); ``upgraded``
    then says from which version to which.
    """

    def __init__(
        self,
        url: str,
        job_policy: RetryPolicy = RetryPolicy(),
        delivery_policy: RetryPolicy = RetryPolicy(10, 15.0, 3600.0),
        *,
        busy_timeout_s: float = 30.0,
        clock: Callable[[], datetime] | None = None,
        upgrade: bool = False,
    ) -> None:
        self.url = url
        self.job_policy = job_policy
        self.delivery_policy = delivery_policy
        self._clock = clock or (lambda: datetime.now(UTC))
        missing = None if upgrade else missing_sqlite_file(url)
        if missing is not None:  # connecting would create an empty file
            raise JobStoreError(f"no job database at {missing}: {migrations.UPGRADE_HINT}")
        self.db = Database(url, busy_timeout_s=busy_timeout_s, create=upgrade)
        self.dialect = self.db.dialect
        self.upgraded: migrations.SchemaUpgrade | None = None
        try:
            if upgrade:
                self.upgraded = migrations.upgrade(self.db.engine)
                self.schema_version = self.upgraded.after
            else:
                self.schema_version = migrations.check(self.db)
        except JobStoreError:
            self.db.close()
            raise
        except (sa.exc.SQLAlchemyError, sqlite3.Error, OSError, ImportError) as exc:
            # sqlite3.Error: the driver's own error escapes SQLAlchemy when the connect hook's PRAGMA meets a
            # file that is not an SQLite database.
            self.db.close()
            raise JobStoreError(f"cannot open the job database {self.db.parsed!r}: {short_error(exc)}") from exc

    def now(self) -> datetime:
        return self._clock()

    def close(self) -> None:
        self.db.close()

    # -- jobs --------------------------------------------------------------------------------------

    def enqueue(
        self,
        *,
        sop_instance_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_class_uid: str,
        calling_aet: str,
        spool_path: str,
        sha256: str,
        size: int,
    ) -> EnqueueOutcome:
        """Queue a job for an instance, or recognise a resend (same content) or a changed instance."""
        fields = dict(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_class_uid=sop_class_uid,
            calling_aet=calling_aet,
            spool_path=str(spool_path),
            sha256=sha256,
            size=int(size),
        )
        for attempt in (1, 2):
            now = self.now()
            try:
                with self.db.engine.begin() as conn:
                    query = sa.select(J.c.id, J.c.sha256).where(J.c.sop_instance_uid == sop_instance_uid)
                    row = conn.execute(self.db.for_update(query)).first()
                    if row is None:
                        result = conn.execute(
                            J.insert().values(
                                sop_instance_uid=sop_instance_uid,
                                state=JobState.QUEUED.value,
                                attempts=0,
                                received_at=now,
                                updated_at=now,
                                **fields,
                            )
                        )
                        key = result.inserted_primary_key
                        assert key is not None  # SQLAlchemy sets it for every single-row INSERT
                        return EnqueueOutcome(int(key[0]), True, False)
                    if row.sha256 == sha256:
                        return EnqueueOutcome(int(row.id), False, False)
                    conn.execute(
                        J.update()
                        .where(J.c.id == row.id)
                        .values(
                            **leases.renew_values(JOB_LEASES, now),
                            result=None,
                            received_at=now,
                            started_at=None,
                            **fields,
                        )
                    )
                    return EnqueueOutcome(int(row.id), False, True)
            except sa.exc.IntegrityError as exc:
                # Two connections inserted the same UID at once (PostgreSQL): the loser looks again.
                if attempt == 2:
                    raise JobStoreError(f"job database error: {short_error(exc)}") from exc
            except sa.exc.SQLAlchemyError as exc:
                raise JobStoreError(f"job database error: {short_error(exc)}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def claim(self, owner: str, limit: int = 1, lease_seconds: float = 300.0) -> list[Job]:
        """Lease up to ``limit`` claimable jobs to ``owner``, oldest first."""
        if limit <= 0:
            return []
        now = self.now()
        query = (
            sa.select(J.c.id, J.c.state, J.c.attempts)
            .where(leases.claimable(JOB_LEASES, now))
            .order_by(J.c.id)
            .limit(limit)
        )
        with self.db.write() as conn:
            ids = leases.claim(
                self.db, conn, JOB_LEASES, query, owner=owner, lease_seconds=lease_seconds, now=now,
                policy=self.job_policy,
            )
            if not ids:
                return []
            return [job_from_row(r) for r in conn.execute(sa.select(J).where(J.c.id.in_(ids)).order_by(J.c.id))]

    def extend_lease(self, job_id: int, owner: str, lease_seconds: float) -> datetime:
        """Heartbeat of a long job: its lease now ends ``lease_seconds`` from now (returned).

        Raises LeaseLostError when ``owner`` no longer holds it.
        """
        now = self.now()
        with self.db.write() as conn:
            return leases.extend(self.db, conn, JOB_LEASES, job_id, owner, lease_seconds, now)

    def complete(self, job_id: int, owner: str, result: JobResult, destinations: Sequence[str]) -> None:
        """Mark a leased job done with ``result`` (stored as ``result.to_json()``) and create one pending
        delivery per destination, atomically. Raises LeaseLostError when ``owner`` no longer holds it."""
        now = self.now()
        with self.db.write() as conn:
            leases.owned(self.db, conn, JOB_LEASES, job_id, owner, "complete")
            leases.complete(conn, JOB_LEASES, job_id, now, result=result.to_json())
            existing = {
                r.destination: r.id
                for r in conn.execute(sa.select(D.c.id, D.c.destination).where(D.c.job_id == job_id))
            }
            for destination in dict.fromkeys(destinations):
                values = leases.renew_values(DELIVERY_LEASES, now)
                if destination in existing:  # the job ran again (changed content, manual retry)
                    conn.execute(D.update().where(D.c.id == existing[destination]).values(**values))
                else:
                    conn.execute(D.insert().values(job_id=job_id, destination=destination, created_at=now, **values))

    def fail(self, job_id: int, owner: str, reason: str, *, permanent: bool = False) -> JobState:
        """Record a failed attempt: FAILED (retried after a backoff) or DEAD (out of attempts/permanent)."""
        now = self.now()
        with self.db.write() as conn:
            row = leases.owned(self.db, conn, JOB_LEASES, job_id, owner, "fail")
            return JobState(leases.fail(conn, JOB_LEASES, row, self.job_policy, reason, now, permanent=permanent))

    def skip(self, job_id: int, owner: str, result: JobResult) -> None:
        """End a leased job as SKIPPED (routing excluded it) with ``result`` (its ``routing``, stored as
        ``result.to_json()``); no delivery is created. Raises LeaseLostError when ``owner`` no longer holds it."""
        now = self.now()
        with self.db.write() as conn:
            leases.owned(self.db, conn, JOB_LEASES, job_id, owner, "skip")
            leases.complete(conn, JOB_LEASES, job_id, now, state=JobState.SKIPPED.value, result=result.to_json())

    def release(self, job_id: int, owner: str) -> None:
        """Give a leased job back to the queue without counting the attempt (orderly shutdown)."""
        now = self.now()
        with self.db.write() as conn:
            row = leases.owned(self.db, conn, JOB_LEASES, job_id, owner, "release")
            leases.release(conn, JOB_LEASES, row, now)

    def retry(self, job_id: int) -> None:
        """Queue a failed, dead or skipped job again with its attempts reset."""
        allowed = (JobState.FAILED, JobState.DEAD, JobState.SKIPPED)
        with self.db.write() as conn:
            leases.retry(self.db, conn, JOB_LEASES, job_id, allowed, self.now())

    def retry_dead(self) -> int:
        """Queue every dead job again; returns how many."""
        with self.db.write() as conn:
            return leases.retry_dead(conn, JOB_LEASES, self.now())

    def lease_owners(self) -> set[str]:
        """Owners holding a lease now: of running jobs and of deliveries being sent."""
        with self.db.read() as conn:
            return leases.lease_owners(conn, JOB_LEASES) | leases.lease_owners(conn, DELIVERY_LEASES)

    def expire_leases(self, owners: Sequence[str]) -> tuple[int, int]:
        """End the leases of ``owners`` now (their process is gone), so the work is claimed again at once.

        The attempt the owner made still counts, so an image that kills its worker every time ends dead
        after ``max_attempts`` instead of looping. Returns (jobs, deliveries) whose lease was ended.
        """
        if not owners:
            return 0, 0
        now = self.now()
        with self.db.write() as conn:
            return leases.expire(conn, JOB_LEASES, owners, now), leases.expire(conn, DELIVERY_LEASES, owners, now)

    def get(self, job_id: int) -> Job:
        with self.db.read() as conn:
            row = conn.execute(sa.select(J).where(J.c.id == job_id)).first()
        if row is None:
            raise JobStoreError(f"job {job_id} does not exist")
        return job_from_row(row)

    def find_by_sop_uid(self, sop_instance_uid: str) -> Job | None:
        with self.db.read() as conn:
            row = conn.execute(sa.select(J).where(J.c.sop_instance_uid == sop_instance_uid)).first()
        return None if row is None else job_from_row(row)

    def list_jobs(self, state: JobState | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first, optionally only those in ``state``."""
        query = sa.select(J).order_by(J.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(J.c.state == JobState(state).value)
        with self.db.read() as conn:
            return [job_from_row(r) for r in conn.execute(query)]

    def counts(self) -> dict[str, int]:
        """Number of jobs per state (every state present, zeros included)."""
        counts = {s.value: 0 for s in JobState}
        with self.db.read() as conn:
            for state, n in conn.execute(sa.select(J.c.state, sa.func.count()).group_by(J.c.state)):
                counts[state] = int(n)
        return counts

    def oldest_queued(self) -> Job | None:
        """The queued job received longest ago (for queue-age metrics)."""
        query = sa.select(J).where(J.c.state == JobState.QUEUED.value).order_by(J.c.received_at, J.c.id).limit(1)
        with self.db.read() as conn:
            row = conn.execute(query).first()
        return None if row is None else job_from_row(row)

    def finished_since(self, since: datetime, limit: int = 1000) -> list[Job]:
        """Jobs that reached done, dead or skipped after ``since``, oldest first (for metrics across processes)."""
        query = (
            sa.select(J)
            .where(
                J.c.state.in_([JobState.DONE.value, JobState.DEAD.value, JobState.SKIPPED.value]),
                J.c.finished_at > since,
            )
            .order_by(J.c.finished_at)
            .limit(limit)
        )
        with self.db.read() as conn:
            return [job_from_row(r) for r in conn.execute(query)]

    def finished_counts(self, since: datetime) -> dict[str, int]:
        """Jobs that reached done or dead after ``since``, counted per state (throughput): ``{"done": n,
        "dead": m}``, both keys always present."""
        counts = {JobState.DONE.value: 0, JobState.DEAD.value: 0}
        query = (
            sa.select(J.c.state, sa.func.count())
            .where(J.c.state.in_(list(counts)), J.c.finished_at > since)
            .group_by(J.c.state)
        )
        with self.db.read() as conn:
            for state, n in conn.execute(query):
                counts[state] = int(n)
        return counts

    def purge(
        self,
        older_than: timedelta,
        states: Sequence[JobState] = (JobState.DONE, JobState.DEAD, JobState.SKIPPED),
    ) -> list[Job]:
        """Delete jobs in ``states`` finished before now - ``older_than``, with their deliveries.

        A done job that still has a delivery pending, sending or failed is kept. Returns the deleted
        jobs so the caller can remove their spool and result files.
        """
        cutoff = self.now() - older_than
        open_delivery = (
            sa.select(D.c.id)
            .where(D.c.job_id == J.c.id, D.c.state.notin_([DeliveryState.DONE.value, DeliveryState.DEAD.value]))
            .exists()
        )
        query = sa.select(J).where(
            J.c.state.in_([JobState(s).value for s in states]),
            sa.func.coalesce(J.c.finished_at, J.c.updated_at) < cutoff,
            sa.not_(open_delivery),
        )
        with self.db.write() as conn:
            purged = [job_from_row(r) for r in conn.execute(self.db.for_update(query.order_by(J.c.id)))]
            for chunk in _chunks([j.id for j in purged]):
                conn.execute(D.delete().where(D.c.job_id.in_(chunk)))
                conn.execute(J.delete().where(J.c.id.in_(chunk)))
        return purged

    # -- deliveries --------------------------------------------------------------------------------

    def claim_deliveries(
        self,
        owner: str,
        limit: int = 10,
        lease_seconds: float = 120.0,
        destination: str | None = None,
    ) -> list[Delivery]:
        """Lease up to ``limit`` deliveries that are due, for jobs that are done, oldest first."""
        if limit <= 0:
            return []
        now = self.now()
        job_done = sa.select(J.c.id).where(J.c.id == D.c.job_id, J.c.state == JobState.DONE.value).exists()
        query = sa.select(D.c.id, D.c.state, D.c.attempts).where(leases.claimable(DELIVERY_LEASES, now), job_done)
        if destination is not None:
            query = query.where(D.c.destination == destination)
        query = query.order_by(D.c.id).limit(limit)
        with self.db.write() as conn:
            ids = leases.claim(
                self.db, conn, DELIVERY_LEASES, query, owner=owner, lease_seconds=lease_seconds, now=now,
                policy=self.delivery_policy,
            )
            if not ids:
                return []
            return [delivery_from_row(r) for r in conn.execute(sa.select(D).where(D.c.id.in_(ids)).order_by(D.c.id))]

    def extend_delivery_lease(self, delivery_id: int, owner: str, lease_seconds: float) -> datetime:
        """Heartbeat of a long delivery: its lease now ends ``lease_seconds`` from now (returned).

        Raises LeaseLostError when ``owner`` no longer holds it.
        """
        now = self.now()
        with self.db.write() as conn:
            return leases.extend(self.db, conn, DELIVERY_LEASES, delivery_id, owner, lease_seconds, now)

    def record_stored_objects(self, delivery_id: int, owner: str, objects: dict[str, dict[str, Any]]) -> None:
        """Record objects the destination has confirmed while the delivery is still under way (its state
        and lease unchanged), as ``complete_delivery`` records them: if the sender dies before the
        delivery completes, the retry sends only the objects not recorded (``Delivery.delivered_objects``).

        Raises LeaseLostError when ``owner`` no longer holds the delivery.
        """
        now = self.now()
        with self.db.write() as conn:
            row = leases.owned(self.db, conn, DELIVERY_LEASES, delivery_id, owner, "record the objects of")
            merged = merge_objects(row.objects, objects, now, dead=False)
            table = DELIVERY_LEASES.table
            conn.execute(table.update().where(table.c.id == delivery_id).values(objects=merged, updated_at=now))

    def complete_delivery(self, delivery_id: int, owner: str, objects: dict[str, dict[str, Any]] | None = None) -> None:
        """Mark a delivery done; ``objects`` says as what each object went (``{"sc": {"sop_class_uid": ...}}``)."""
        now = self.now()
        with self.db.write() as conn:
            row = leases.owned(self.db, conn, DELIVERY_LEASES, delivery_id, owner, "complete")
            merged = merge_objects(row.objects, objects or {}, now, dead=False)
            leases.complete(conn, DELIVERY_LEASES, delivery_id, now, objects=merged)

    def fail_delivery(
        self,
        delivery_id: int,
        owner: str,
        reason: str,
        *,
        permanent: bool = False,
        objects: dict[str, dict[str, Any]] | None = None,
    ) -> DeliveryState:
        """Record a failed attempt: retried with backoff, or dead when ``permanent`` or out of attempts.

        ``objects`` gives this attempt's outcome per object: ``{"sc": {"stored": True, "sop_class_uid":
        ...}, "sr": {"stored": False, "error": ..., "permanent": bool}}``; objects stored in an earlier
        attempt stay so.
        """
        now = self.now()
        with self.db.write() as conn:
            row = leases.owned(self.db, conn, DELIVERY_LEASES, delivery_id, owner, "fail")

            def per_object(dead: bool) -> dict[str, Any]:
                return {"objects": merge_objects(row.objects, objects or {}, now, dead=dead, reason=reason)}

            state = leases.fail(
                conn, DELIVERY_LEASES, row, self.delivery_policy, reason, now, permanent=permanent, values=per_object
            )
            return DeliveryState(state)

    def retry_delivery(self, delivery_id: int) -> None:
        """Send a failed or dead delivery again with its attempts reset."""
        allowed = (DeliveryState.FAILED, DeliveryState.DEAD)
        with self.db.write() as conn:
            leases.retry(self.db, conn, DELIVERY_LEASES, delivery_id, allowed, self.now())

    def retry_dead_deliveries(self) -> int:
        """Send every dead delivery again; returns how many."""
        with self.db.write() as conn:
            return leases.retry_dead(conn, DELIVERY_LEASES, self.now())

    def list_deliveries(
        self, job_id: int | None = None, state: DeliveryState | None = None, limit: int = 100
    ) -> list[Delivery]:
        query = sa.select(D).order_by(D.c.id).limit(limit)
        if job_id is not None:
            query = query.where(D.c.job_id == job_id)
        if state is not None:
            query = query.where(D.c.state == DeliveryState(state).value)
        with self.db.read() as conn:
            return [delivery_from_row(r) for r in conn.execute(query)]

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """destination -> state -> number of deliveries (states with none are left out)."""
        counts: dict[str, dict[str, int]] = {}
        query = sa.select(D.c.destination, D.c.state, sa.func.count()).group_by(D.c.destination, D.c.state)
        with self.db.read() as conn:
            for destination, state, n in conn.execute(query):
                counts.setdefault(destination, {})[state] = int(n)
        return counts

    def partly_delivered_counts(self) -> dict[str, int]:
        """destination -> deliveries not done of which at least one object was stored (e.g. the SC
        delivered while the SR was refused); destinations with none are left out."""
        counts: dict[str, int] = {}
        query = sa.select(D.c.destination, D.c.objects).where(
            D.c.state != DeliveryState.DONE.value, D.c.objects.is_not(None)
        )
        with self.db.read() as conn:
            for destination, objects in conn.execute(query):
                if any(isinstance(v, dict) and v.get("state") == "done" for v in (objects or {}).values()):
                    counts[destination] = counts.get(destination, 0) + 1
        return counts

    def all_delivered(self, job_id: int) -> bool:
        """True when every delivery of the job is done (also when it has none)."""
        query = sa.select(sa.func.count()).where(D.c.job_id == job_id, D.c.state != DeliveryState.DONE.value)
        with self.db.read() as conn:
            return int(conn.execute(query).scalar() or 0) == 0


def open_job_store(config: Config, *, upgrade: bool = False, connect_timeout_s: int | None = None) -> JobStore:
    """The job store the configuration names, with its retry policies and busy timeout: the one way every
    command, ``serve`` and ``worker`` open it.

    ``upgrade``: create or upgrade the schema (``serve``/``worker`` start, ``pacs-ai db upgrade``); without
    it nothing is written by opening, and an SQLite file that does not exist is refused (an admin who forgot
    ``--config`` is told so, instead of getting an empty queue created in the current folder).
    ``connect_timeout_s``: a PostgreSQL server that does not answer fails within that many seconds.
    Raises JobStoreError (see :class:`JobStore`).
    """
    url = config.database_url
    missing = None if upgrade else missing_sqlite_file(url)
    if missing is not None:
        raise JobStoreError(
            f"no database at {missing} (the service has not run with this configuration; "
            f"configuration: {config.source or 'embedded defaults'}; pass --config FILE)"
        )
    if connect_timeout_s is not None:
        url = _with_connect_timeout(url, connect_timeout_s)
    worker, delivery = config.worker, config.delivery
    return JobStore(
        url,
        RetryPolicy(worker.max_attempts, worker.backoff_base_s, worker.backoff_max_s),
        RetryPolicy(delivery.max_attempts, delivery.backoff_base_s, delivery.backoff_max_s),
        busy_timeout_s=config.database.busy_timeout_s,
        upgrade=upgrade,
    )


def _with_connect_timeout(url: str, seconds: int) -> str:
    """A PostgreSQL URL with ``connect_timeout`` (unless it has one); other URLs as they are."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - JobStore reports a malformed URL
        return url
    if parsed.get_backend_name() != "postgresql" or "connect_timeout" in parsed.query:
        return url
    return parsed.update_query_dict({"connect_timeout": str(seconds)}).render_as_string(hide_password=False)
