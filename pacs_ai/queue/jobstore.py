"""The job store: one job per received SOP instance, leased claims, retries with backoff, deliveries.

SQLite (the default) runs in WAL mode with ``synchronous=FULL`` and a busy timeout; every writing
transaction starts with ``BEGIN IMMEDIATE``, so claims are atomic across threads and processes.
PostgreSQL claims with ``SELECT ... FOR UPDATE SKIP LOCKED``. The schema is created and upgraded on open
(see migrations.py). All times are timezone-aware UTC.

Attempts are counted when a job (or delivery) is claimed; ``release`` gives the attempt back. A job whose
lease expires is claimable again; once it has used ``max_attempts`` claims it is dead-lettered instead,
so an image that crashes the worker every time cannot loop forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

from pacs_ai.errors import JobStoreError, LeaseLostError
from pacs_ai.queue import migrations
from pacs_ai.queue.models import deliveries as D
from pacs_ai.queue.models import jobs as J

MAX_ERROR_CHARS = 2000
_CHUNK = 500


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    SKIPPED = "skipped"
    """Outside the routing rules: stored, not analysed, nothing sent (``result["routing"]`` names the rule)."""


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base_s: float = 10.0
    backoff_max_s: float = 3600.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based): base * 2**(attempt-1), capped."""
        exponent = max(attempt, 1) - 1
        if exponent > 60:
            return self.backoff_max_s
        return min(self.backoff_base_s * (2**exponent), self.backoff_max_s)

    def next_attempt_at(self, attempts: int, now: datetime, *, permanent: bool = False) -> datetime | None:
        """The one retry decision for jobs, deliveries and study deliveries after a failed attempt.

        ``attempts`` is how many claims the failed item has used. Returns when to try again (``now`` plus
        :meth:`delay`), or None when it goes dead: a ``permanent`` error, or ``max_attempts`` used.
        """
        if permanent or attempts >= self.max_attempts:
            return None
        return now + timedelta(seconds=self.delay(attempts))


@dataclass(frozen=True)
class Job:
    id: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    calling_aet: str
    spool_path: str
    sha256: str
    size: int
    state: JobState
    attempts: int
    next_attempt_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    result: dict | None
    received_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    lease_owner: str | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    objects: dict | None = None
    """Per result object (``sc``, ``sr``): ``{"state", "at", "error", "sop_class_uid", ...}``; None before
    anything was recorded for one."""

    def delivered_objects(self) -> set[str]:
        """Keys of the objects this destination already stored (a retry sends only the others)."""
        return {k for k, v in (self.objects or {}).items() if isinstance(v, dict) and v.get("state") == "done"}


@dataclass(frozen=True)
class EnqueueOutcome:
    job_id: int
    created: bool
    content_changed: bool


_JOB_FIELDS = [f for f in Job.__dataclass_fields__]
_DELIVERY_FIELDS = [f for f in Delivery.__dataclass_fields__]


def _job(row: Any) -> Job:
    m = row._mapping
    values = {f: m[f] for f in _JOB_FIELDS}
    values["state"] = JobState(values["state"])
    return Job(**values)


def _delivery(row: Any) -> Delivery:
    m = row._mapping
    values = {f: m[f] for f in _DELIVERY_FIELDS}
    values["state"] = DeliveryState(values["state"])
    return Delivery(**values)


def _short_error(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _merge_objects(
    recorded: dict | None, outcomes: dict[str, dict[str, Any]], now: datetime, *, dead: bool, reason: str = ""
) -> dict | None:
    """Per-object delivery state after an attempt: stored objects ``done`` (with as what they went), the
    others ``failed`` or ``dead`` with their error; an object done earlier stays done. None if nothing."""
    merged = dict(recorded or {})
    for key, info in outcomes.items():
        if isinstance(merged.get(key), dict) and merged[key].get("state") == "done":
            continue
        details = {k: v for k, v in info.items() if k not in ("stored", "permanent", "state", "error")}
        if info.get("stored", True):
            merged[key] = {**details, "state": "done", "at": now.isoformat()}
        else:
            object_dead = dead or bool(info.get("permanent"))
            error = _clip(str(info.get("error") or reason))
            merged[key] = {**details, "state": "dead" if object_dead else "failed", "error": error, "at": now.isoformat()}
    return merged or None


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


def _claimable(table: sa.Table, fresh: StrEnum, failed: StrEnum, leased: StrEnum, now: datetime) -> Any:
    """Rows that may be claimed now: new ones, failed ones whose backoff has passed, expired leases."""
    return sa.or_(
        table.c.state == fresh.value,
        sa.and_(
            table.c.state == failed.value,
            sa.or_(table.c.next_attempt_at.is_(None), table.c.next_attempt_at <= now),
        ),
        sa.and_(table.c.state == leased.value, table.c.lease_expires_at <= now),
    )


class JobStore:
    """Jobs and deliveries in a SQL database (SQLite file or PostgreSQL URL)."""

    def __init__(
        self,
        url: str,
        job_policy: RetryPolicy = RetryPolicy(),
        delivery_policy: RetryPolicy = RetryPolicy(10, 15.0, 3600.0),
        *,
        busy_timeout_s: float = 30.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.url = url
        self.job_policy = job_policy
        self.delivery_policy = delivery_policy
        self._clock = clock or (lambda: datetime.now(UTC))
        try:
            parsed = make_url(url)
        except Exception as exc:  # sqlalchemy raises ArgumentError and others for a malformed URL
            raise JobStoreError(f"invalid database URL {url!r}: {exc}") from exc
        self.dialect = parsed.get_backend_name()
        self._lock = threading.Lock()
        try:
            if self.dialect == "sqlite":
                self._engine = self._sqlite_engine(parsed, busy_timeout_s)
            else:
                self._engine = sa.create_engine(parsed, pool_pre_ping=True, future=True)
            self.schema_version = migrations.upgrade(self._engine)
        except JobStoreError:
            raise
        except (sa.exc.SQLAlchemyError, OSError, ImportError) as exc:
            raise JobStoreError(f"cannot open the job database {parsed!r}: {_short_error(exc)}") from exc

    # -- engine and transactions -------------------------------------------------------------------

    @staticmethod
    def _sqlite_engine(parsed: sa.URL, busy_timeout_s: float) -> sa.Engine:
        database = parsed.database or ""
        memory = database in ("", ":memory:") or database.startswith("file::memory:")
        if not memory:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {
            "connect_args": {"check_same_thread": False, "timeout": busy_timeout_s},
        }
        if memory:
            kwargs["poolclass"] = sa.pool.StaticPool
        engine = sa.create_engine(parsed, **kwargs)
        busy_ms = int(busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's BEGIN below be the only transaction control (pysqlite's own is off).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout={busy_ms}")
                if not memory:
                    cur.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed job survives power loss too, not only a process crash.
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA foreign_keys=ON")
            finally:
                cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            read_only = conn.get_execution_options().get("pacs_ai_read_only", False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except JobStoreError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise JobStoreError(f"job database error: {_short_error(exc)}") from exc

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        try:
            with self._engine.connect() as conn:
                conn.execution_options(pacs_ai_read_only=True)
                with conn.begin():
                    yield conn
        except JobStoreError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise JobStoreError(f"job database error: {_short_error(exc)}") from exc

    def _for_update(self, query: sa.Select[Any], *, skip_locked: bool = False) -> sa.Select[Any]:
        if self.dialect == "sqlite":  # BEGIN IMMEDIATE already holds the write lock
            return query
        return query.with_for_update(skip_locked=skip_locked)

    def now(self) -> datetime:
        return self._clock()

    def close(self) -> None:
        self._engine.dispose()

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
                with self._engine.begin() as conn:
                    query = sa.select(J.c.id, J.c.sha256).where(J.c.sop_instance_uid == sop_instance_uid)
                    row = conn.execute(self._for_update(query)).first()
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
                        return EnqueueOutcome(int(result.inserted_primary_key[0]), True, False)
                    if row.sha256 == sha256:
                        return EnqueueOutcome(int(row.id), False, False)
                    conn.execute(
                        J.update()
                        .where(J.c.id == row.id)
                        .values(
                            state=JobState.QUEUED.value,
                            attempts=0,
                            next_attempt_at=None,
                            lease_owner=None,
                            lease_expires_at=None,
                            last_error=None,
                            result=None,
                            received_at=now,
                            updated_at=now,
                            started_at=None,
                            finished_at=None,
                            **fields,
                        )
                    )
                    return EnqueueOutcome(int(row.id), False, True)
            except sa.exc.IntegrityError as exc:
                # Two connections inserted the same UID at once (PostgreSQL): the loser looks again.
                if attempt == 2:
                    raise JobStoreError(f"job database error: {_short_error(exc)}") from exc
            except sa.exc.SQLAlchemyError as exc:
                raise JobStoreError(f"job database error: {_short_error(exc)}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _lease(
        self,
        conn: sa.Connection,
        table: sa.Table,
        query: sa.Select[Any],
        *,
        owner: str,
        lease_seconds: float,
        now: datetime,
        leased: StrEnum,
        max_attempts: int,
        expired_detail: str = "",
        dead_values: dict[str, Any] | None = None,
        lease_values: dict[str, Any] | None = None,
    ) -> list[int]:
        """Lease the rows ``query`` selects (id, state, attempts) to ``owner``; returns their ids.

        A row whose lease expired (state ``leased``) on its last attempt is dead-lettered instead, so work
        that kills its worker every time ends visible rather than looping.
        """
        ids: list[int] = []
        for row in conn.execute(self._for_update(query, skip_locked=True)).all():
            if row.state == leased.value and row.attempts >= max_attempts:
                conn.execute(
                    table.update()
                    .where(table.c.id == row.id)
                    .values(
                        state=JobState.DEAD.value,  # the same word as DeliveryState.DEAD
                        lease_owner=None,
                        lease_expires_at=None,
                        next_attempt_at=None,
                        last_error=f"gave up after {row.attempts} attempts: the lease expired{expired_detail}",
                        updated_at=now,
                        **(dead_values or {}),
                    )
                )
                continue
            ids.append(int(row.id))
        if ids:
            conn.execute(
                table.update()
                .where(table.c.id.in_(ids))
                .values(
                    state=leased.value,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    attempts=table.c.attempts + 1,
                    next_attempt_at=None,
                    updated_at=now,
                    **(lease_values or {}),
                )
            )
        return ids

    def claim(self, owner: str, limit: int = 1, lease_seconds: float = 300.0) -> list[Job]:
        """Lease up to ``limit`` claimable jobs to ``owner``, oldest first."""
        if limit <= 0:
            return []
        now = self.now()
        claimable = _claimable(J, JobState.QUEUED, JobState.FAILED, JobState.RUNNING, now)
        query = sa.select(J.c.id, J.c.state, J.c.attempts).where(claimable).order_by(J.c.id).limit(limit)
        with self._write() as conn:
            ids = self._lease(
                conn,
                J,
                query,
                owner=owner,
                lease_seconds=lease_seconds,
                now=now,
                leased=JobState.RUNNING,
                max_attempts=self.job_policy.max_attempts,
                expired_detail=" (the worker crashed or hung while processing this image)",
                dead_values={"finished_at": now},
                lease_values={"started_at": now},
            )
            if not ids:
                return []
            return [_job(r) for r in conn.execute(sa.select(J).where(J.c.id.in_(ids)).order_by(J.c.id))]

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
        with self._read() as conn:
            return [_job(r) for r in conn.execute(query)]

    def finished_counts(self, since: datetime) -> dict[str, int]:
        """Jobs that reached done or dead after ``since``, counted per state (throughput): ``{"done": n,
        "dead": m}``, both keys always present."""
        counts = {JobState.DONE.value: 0, JobState.DEAD.value: 0}
        query = (
            sa.select(J.c.state, sa.func.count())
            .where(J.c.state.in_(list(counts)), J.c.finished_at > since)
            .group_by(J.c.state)
        )
        with self._read() as conn:
            for state, n in conn.execute(query):
                counts[state] = int(n)
        return counts

    def lease_owners(self) -> set[str]:
        """Owners holding a lease now: of running jobs and of deliveries being sent."""
        with self._read() as conn:
            jobs = conn.execute(
                sa.select(J.c.lease_owner).where(J.c.state == JobState.RUNNING.value).distinct()
            ).scalars()
            deliveries = conn.execute(
                sa.select(D.c.lease_owner).where(D.c.state == DeliveryState.SENDING.value).distinct()
            ).scalars()
            return {o for o in [*jobs, *deliveries] if o}

    def expire_leases(self, owners: Sequence[str]) -> tuple[int, int]:
        """End the leases of ``owners`` now (their process is gone), so the work is claimed again at once.

        The attempt the owner made still counts, so an image that kills its worker every time ends dead
        after ``max_attempts`` instead of looping. Returns (jobs, deliveries) whose lease was ended.
        """
        if not owners:
            return 0, 0
        now = self.now()
        with self._write() as conn:
            jobs = conn.execute(
                J.update()
                .where(J.c.state == JobState.RUNNING.value, J.c.lease_owner.in_(list(owners)))
                .values(lease_expires_at=now, updated_at=now)
            ).rowcount
            deliveries = conn.execute(
                D.update()
                .where(D.c.state == DeliveryState.SENDING.value, D.c.lease_owner.in_(list(owners)))
                .values(lease_expires_at=now, updated_at=now)
            ).rowcount
        return int(jobs or 0), int(deliveries or 0)

    def _owned_job(self, conn: sa.Connection, job_id: int, owner: str, action: str) -> Any:
        row = conn.execute(self._for_update(sa.select(J).where(J.c.id == job_id))).first()
        if row is None:
            raise JobStoreError(f"job {job_id} does not exist")
        if row.state != JobState.RUNNING.value or row.lease_owner != owner:
            raise LeaseLostError(
                f"cannot {action} job {job_id}: {owner!r} no longer holds its lease "
                f"(state {row.state}, lease owner {row.lease_owner!r})"
            )
        return row

    def complete(self, job_id: int, owner: str, result: dict, destinations: Sequence[str]) -> None:
        """Mark a leased job done and create one pending delivery per destination, atomically."""
        now = self.now()
        with self._write() as conn:
            self._owned_job(conn, job_id, owner, "complete")
            conn.execute(
                J.update()
                .where(J.c.id == job_id)
                .values(
                    state=JobState.DONE.value,
                    result=result,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=None,
                    last_error=None,
                    updated_at=now,
                    finished_at=now,
                )
            )
            existing = {
                r.destination: r.id
                for r in conn.execute(sa.select(D.c.id, D.c.destination).where(D.c.job_id == job_id))
            }
            for destination in dict.fromkeys(destinations):
                values = dict(
                    state=DeliveryState.PENDING.value,
                    attempts=0,
                    next_attempt_at=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=None,
                    delivered_at=None,
                    updated_at=now,
                )
                if destination in existing:  # the job ran again (changed content, manual retry)
                    conn.execute(D.update().where(D.c.id == existing[destination]).values(**values))
                else:
                    conn.execute(D.insert().values(job_id=job_id, destination=destination, created_at=now, **values))

    def fail(self, job_id: int, owner: str, reason: str, *, permanent: bool = False) -> JobState:
        """Record a failed attempt: FAILED (retried after a backoff) or DEAD (out of attempts/permanent)."""
        now = self.now()
        with self._write() as conn:
            row = self._owned_job(conn, job_id, owner, "fail")
            retry_at = self.job_policy.next_attempt_at(row.attempts, now, permanent=permanent)
            dead = retry_at is None
            state = JobState.DEAD if dead else JobState.FAILED
            conn.execute(
                J.update()
                .where(J.c.id == job_id)
                .values(
                    state=state.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=_clip(reason),
                    next_attempt_at=retry_at,
                    updated_at=now,
                    finished_at=now if dead else None,
                )
            )
            return state

    def skip(self, job_id: int, owner: str, result: dict) -> None:
        """End a leased job as SKIPPED (routing excluded it) with ``result``; no delivery is created."""
        now = self.now()
        with self._write() as conn:
            self._owned_job(conn, job_id, owner, "skip")
            conn.execute(
                J.update()
                .where(J.c.id == job_id)
                .values(
                    state=JobState.SKIPPED.value,
                    result=result,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=None,
                    last_error=None,
                    updated_at=now,
                    finished_at=now,
                )
            )

    def release(self, job_id: int, owner: str) -> None:
        """Give a leased job back to the queue without counting the attempt (orderly shutdown)."""
        now = self.now()
        with self._write() as conn:
            row = self._owned_job(conn, job_id, owner, "release")
            conn.execute(
                J.update()
                .where(J.c.id == job_id)
                .values(
                    state=JobState.QUEUED.value,
                    attempts=max(int(row.attempts) - 1, 0),
                    lease_owner=None,
                    lease_expires_at=None,
                    started_at=None,
                    updated_at=now,
                )
            )

    def retry(self, job_id: int) -> None:
        """Queue a failed or dead job again with its attempts reset."""
        now = self.now()
        with self._write() as conn:
            row = conn.execute(self._for_update(sa.select(J.c.state).where(J.c.id == job_id))).first()
            if row is None:
                raise JobStoreError(f"job {job_id} does not exist")
            if row.state not in (JobState.FAILED.value, JobState.DEAD.value, JobState.SKIPPED.value):
                raise JobStoreError(f"job {job_id} is {row.state}: only failed, dead or skipped jobs can be retried")
            conn.execute(J.update().where(J.c.id == job_id).values(**self._requeue_values(now)))

    def retry_dead(self) -> int:
        """Queue every dead job again; returns how many."""
        now = self.now()
        with self._write() as conn:
            result = conn.execute(
                J.update().where(J.c.state == JobState.DEAD.value).values(**self._requeue_values(now))
            )
            return int(result.rowcount or 0)

    @staticmethod
    def _requeue_values(now: datetime) -> dict[str, Any]:
        return dict(
            state=JobState.QUEUED.value,
            attempts=0,
            next_attempt_at=None,
            lease_owner=None,
            lease_expires_at=None,
            finished_at=None,
            updated_at=now,
        )

    def get(self, job_id: int) -> Job:
        with self._read() as conn:
            row = conn.execute(sa.select(J).where(J.c.id == job_id)).first()
        if row is None:
            raise JobStoreError(f"job {job_id} does not exist")
        return _job(row)

    def find_by_sop_uid(self, sop_instance_uid: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(sa.select(J).where(J.c.sop_instance_uid == sop_instance_uid)).first()
        return None if row is None else _job(row)

    def list_jobs(self, state: JobState | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first, optionally only those in ``state``."""
        query = sa.select(J).order_by(J.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(J.c.state == JobState(state).value)
        with self._read() as conn:
            return [_job(r) for r in conn.execute(query)]

    def counts(self) -> dict[str, int]:
        """Number of jobs per state (every state present, zeros included)."""
        counts = {s.value: 0 for s in JobState}
        with self._read() as conn:
            for state, n in conn.execute(sa.select(J.c.state, sa.func.count()).group_by(J.c.state)):
                counts[state] = int(n)
        return counts

    def oldest_queued(self) -> Job | None:
        """The queued job received longest ago (for queue-age metrics)."""
        query = (
            sa.select(J)
            .where(J.c.state == JobState.QUEUED.value)
            .order_by(J.c.received_at, J.c.id)
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        return None if row is None else _job(row)

    def purge(
        self,
        older_than: timedelta,
        states: Sequence[JobState] = (JobState.DONE, JobState.DEAD, JobState.SKIPPED),
    ) -> list[Job]:
        """Delete jobs in ``states`` finished before now - ``older_than``, with their deliveries.

        A done job that still has a delivery pending, sending or failed is kept. Returns the deleted
        jobs so the caller can remove their spool and result files.
        """
        now = self.now()
        cutoff = now - older_than
        open_delivery = (
            sa.select(D.c.id)
            .where(
                D.c.job_id == J.c.id,
                D.c.state.notin_([DeliveryState.DONE.value, DeliveryState.DEAD.value]),
            )
            .exists()
        )
        query = sa.select(J).where(
            J.c.state.in_([JobState(s).value for s in states]),
            sa.func.coalesce(J.c.finished_at, J.c.updated_at) < cutoff,
            sa.not_(open_delivery),
        )
        with self._write() as conn:
            purged = [_job(r) for r in conn.execute(self._for_update(query.order_by(J.c.id)))]
            ids = [j.id for j in purged]
            for chunk in _chunks(ids):
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
        job_done = (
            sa.select(J.c.id).where(J.c.id == D.c.job_id, J.c.state == JobState.DONE.value).exists()
        )
        claimable = _claimable(D, DeliveryState.PENDING, DeliveryState.FAILED, DeliveryState.SENDING, now)
        query = sa.select(D.c.id, D.c.state, D.c.attempts).where(claimable, job_done)
        if destination is not None:
            query = query.where(D.c.destination == destination)
        query = query.order_by(D.c.id).limit(limit)
        with self._write() as conn:
            ids = self._lease(
                conn,
                D,
                query,
                owner=owner,
                lease_seconds=lease_seconds,
                now=now,
                leased=DeliveryState.SENDING,
                max_attempts=self.delivery_policy.max_attempts,
            )
            if not ids:
                return []
            return [_delivery(r) for r in conn.execute(sa.select(D).where(D.c.id.in_(ids)).order_by(D.c.id))]

    def _owned_delivery(self, conn: sa.Connection, delivery_id: int, owner: str, action: str) -> Any:
        row = conn.execute(self._for_update(sa.select(D).where(D.c.id == delivery_id))).first()
        if row is None:
            raise JobStoreError(f"delivery {delivery_id} does not exist")
        if row.state != DeliveryState.SENDING.value or row.lease_owner != owner:
            raise LeaseLostError(
                f"cannot {action} delivery {delivery_id}: {owner!r} no longer holds its lease "
                f"(state {row.state}, lease owner {row.lease_owner!r})"
            )
        return row

    def complete_delivery(self, delivery_id: int, owner: str, objects: dict[str, dict[str, Any]] | None = None) -> None:
        """Mark a delivery done; ``objects`` says as what each object went (``{"sc": {"sop_class_uid": ...}}``)."""
        now = self.now()
        with self._write() as conn:
            row = self._owned_delivery(conn, delivery_id, owner, "complete")
            merged = _merge_objects(row.objects, objects or {}, now, dead=False)
            conn.execute(
                D.update()
                .where(D.c.id == delivery_id)
                .values(
                    state=DeliveryState.DONE.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=None,
                    delivered_at=now,
                    updated_at=now,
                    objects=merged,
                )
            )

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
        with self._write() as conn:
            row = self._owned_delivery(conn, delivery_id, owner, "fail")
            retry_at = self.delivery_policy.next_attempt_at(row.attempts, now, permanent=permanent)
            dead = retry_at is None
            state = DeliveryState.DEAD if dead else DeliveryState.FAILED
            merged = _merge_objects(row.objects, objects or {}, now, dead=dead, reason=reason)
            conn.execute(
                D.update()
                .where(D.c.id == delivery_id)
                .values(
                    state=state.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=_clip(reason),
                    next_attempt_at=retry_at,
                    updated_at=now,
                    objects=merged,
                )
            )
            return state

    def retry_delivery(self, delivery_id: int) -> None:
        now = self.now()
        with self._write() as conn:
            row = conn.execute(self._for_update(sa.select(D.c.state).where(D.c.id == delivery_id))).first()
            if row is None:
                raise JobStoreError(f"delivery {delivery_id} does not exist")
            if row.state not in (DeliveryState.FAILED.value, DeliveryState.DEAD.value):
                raise JobStoreError(
                    f"delivery {delivery_id} is {row.state}: only failed or dead deliveries can be retried"
                )
            conn.execute(D.update().where(D.c.id == delivery_id).values(**self._redeliver_values(now)))

    def retry_dead_deliveries(self) -> int:
        now = self.now()
        with self._write() as conn:
            result = conn.execute(
                D.update()
                .where(D.c.state == DeliveryState.DEAD.value)
                .values(**self._redeliver_values(now))
            )
            return int(result.rowcount or 0)

    @staticmethod
    def _redeliver_values(now: datetime) -> dict[str, Any]:
        return dict(
            state=DeliveryState.PENDING.value,
            attempts=0,
            next_attempt_at=None,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )

    def list_deliveries(
        self, job_id: int | None = None, state: DeliveryState | None = None, limit: int = 100
    ) -> list[Delivery]:
        query = sa.select(D).order_by(D.c.id).limit(limit)
        if job_id is not None:
            query = query.where(D.c.job_id == job_id)
        if state is not None:
            query = query.where(D.c.state == DeliveryState(state).value)
        with self._read() as conn:
            return [_delivery(r) for r in conn.execute(query)]

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """destination -> state -> number of deliveries (states with none are left out)."""
        counts: dict[str, dict[str, int]] = {}
        query = sa.select(D.c.destination, D.c.state, sa.func.count()).group_by(D.c.destination, D.c.state)
        with self._read() as conn:
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
        with self._read() as conn:
            for destination, objects in conn.execute(query):
                if any(isinstance(v, dict) and v.get("state") == "done" for v in (objects or {}).values()):
                    counts[destination] = counts.get(destination, 0) + 1
        return counts

    def all_delivered(self, job_id: int) -> bool:
        """True when every delivery of the job is done (also when it has none)."""
        query = sa.select(sa.func.count()).where(
            D.c.job_id == job_id, D.c.state != DeliveryState.DONE.value
        )
        with self._read() as conn:
            return int(conn.execute(query).scalar() or 0) == 0
