"""Studies in the job store: images grouped by Study Instance UID, study results and their deliveries.

A study is not a separate queue: it is the set of jobs sharing a Study Instance UID. The ``studies`` table
(schema step 3) holds what was concluded about a study (its latest result, ``revision``, the
``completed_through`` watermark = the latest ``finished_at`` of the jobs that result used, an admin's
``forced_at``), and ``study_deliveries`` one row per (study, destination), with the same states, leases and
backoff as the image deliveries.

A study is **due** for a (new) study result when at least one of its images is done and either

- quiet: none of its jobs is queued, running or failed-awaiting-retry, and its last image was received
  ``quiet_period_s`` or more ago; or
- forced: an admin asked for it (``force``), whatever the quiet period and unfinished jobs;

and it has no result yet, or one of its jobs finished after the result was made or more of its jobs
have finished than the result used (an image arrived or was processed again after completion: the
result is then replaced). Fewer jobs (retention purged some) do not make it due.

All methods raise JobStoreError when the database fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from pacs_ai.errors import JobStoreError
from pacs_ai.queue import leases
from pacs_ai.queue.jobstore import JobStore
from pacs_ai.queue.leases import LeasedKind
from pacs_ai.queue.models import jobs as J
from pacs_ai.queue.models import studies as S
from pacs_ai.queue.models import study_deliveries as SD
from pacs_ai.queue.records import DeliveryState, Job, JobState, job_from_row

__all__ = ["StudyDelivery", "StudyRecord", "StudyStore", "StudySummary"]

OPEN_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value)

STUDY_DELIVERY_LEASES = LeasedKind(
    SD,
    "study delivery",
    "study deliveries",
    fresh=DeliveryState.PENDING,
    leased=DeliveryState.SENDING,
    done=DeliveryState.DONE,
    failed=DeliveryState.FAILED,
    dead=DeliveryState.DEAD,
    delivered_column="delivered_at",
)


@dataclass(frozen=True)
class StudyRecord:
    """A row of ``studies``: what was concluded about a study."""

    id: int
    study_instance_uid: str
    revision: int
    completed_at: datetime | None
    completed_through: datetime | None
    completed_jobs: int | None
    forced_at: datetime | None
    result: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class StudySummary:
    """A study as an admin sees it: its jobs counted by state and its latest result.

    ``state``: ``open`` (images in progress, in the quiet period, or more images since the last result),
    ``complete`` (the result covers every image), ``not_analysed`` (no image of it was analysed:
    all skipped or dead).
    """

    study_instance_uid: str
    images: int
    jobs_by_state: dict[str, int]
    first_received_at: datetime
    last_received_at: datetime
    last_finished_at: datetime | None
    state: str
    record: StudyRecord | None


@dataclass(frozen=True)
class StudyDelivery:
    id: int
    study_id: int
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    lease_owner: str | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


def _record(row: Any) -> StudyRecord:
    m = row._mapping
    return StudyRecord(**{f: m[f] for f in StudyRecord.__dataclass_fields__})


def _study_delivery(row: Any) -> StudyDelivery:
    m = row._mapping
    values = {f: m[f] for f in StudyDelivery.__dataclass_fields__}
    values["state"] = DeliveryState(values["state"])
    return StudyDelivery(**values)


class StudyStore:
    """Study grouping on top of a :class:`~pacs_ai.queue.jobstore.JobStore` (same database and policies)."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    def now(self) -> datetime:
        return self.jobs.now()

    # -- grouping ----------------------------------------------------------------------------------

    @staticmethod
    def _per_study() -> Any:
        """Per study: last received, last finished, number of open and done jobs (a subquery)."""
        open_jobs = sa.func.sum(sa.case((J.c.state.in_(OPEN_JOB_STATES), 1), else_=0))
        done_jobs = sa.func.sum(sa.case((J.c.state == JobState.DONE.value, 1), else_=0))
        finished_jobs = sa.func.sum(sa.case((J.c.finished_at.is_not(None), 1), else_=0))
        return (
            sa.select(
                J.c.study_instance_uid.label("uid"),
                sa.func.min(J.c.received_at).label("first_received"),
                sa.func.max(J.c.received_at).label("last_received"),
                sa.func.max(J.c.finished_at).label("last_finished"),
                open_jobs.label("open_jobs"),
                done_jobs.label("done_jobs"),
                finished_jobs.label("finished_jobs"),
                sa.func.count().label("images"),
            )
            .group_by(J.c.study_instance_uid)
            .subquery()
        )

    def due(self, quiet_period_s: float, limit: int = 100) -> list[str]:
        """Study Instance UIDs due for a new study result (see the module docstring), oldest first."""
        cutoff = self.now() - timedelta(seconds=quiet_period_s)
        agg = self._per_study()
        quiet = sa.and_(agg.c.open_jobs == 0, agg.c.last_received <= cutoff)
        stale = sa.or_(
            S.c.id.is_(None),
            S.c.completed_through.is_(None),
            agg.c.last_finished > S.c.completed_through,
            # more jobs finished than the result used (not fewer: retention purging old jobs of a study
            # must not make it send a smaller report)
            agg.c.finished_jobs > sa.func.coalesce(S.c.completed_jobs, -1),
            S.c.forced_at.is_not(None),
        )
        query = (
            sa.select(agg.c.uid)
            .select_from(agg.outerjoin(S, S.c.study_instance_uid == agg.c.uid))
            .where(agg.c.done_jobs > 0, sa.or_(quiet, S.c.forced_at.is_not(None)), stale)
            .order_by(agg.c.last_received)
            .limit(limit)
        )
        with self.jobs.db.read() as conn:
            return [str(r.uid) for r in conn.execute(query)]

    def study_jobs(self, study_instance_uid: str) -> list[Job]:
        """Every job of the study, in the order received."""
        query = sa.select(J).where(J.c.study_instance_uid == study_instance_uid).order_by(J.c.received_at, J.c.id)
        with self.jobs.db.read() as conn:
            return [job_from_row(r) for r in conn.execute(query)]

    def get(self, study_instance_uid: str) -> StudyRecord | None:
        with self.jobs.db.read() as conn:
            row = conn.execute(sa.select(S).where(S.c.study_instance_uid == study_instance_uid)).first()
        return None if row is None else _record(row)

    def summaries(self, limit: int = 100, study_instance_uid: str | None = None) -> list[StudySummary]:
        """Studies, most recently received first, with their jobs counted by state and their record."""
        agg = self._per_study()
        query = sa.select(agg).order_by(agg.c.last_received.desc()).limit(limit)
        if study_instance_uid is not None:
            query = query.where(agg.c.uid == study_instance_uid)
        with self.jobs.db.read() as conn:
            rows = conn.execute(query).all()
            uids = [str(r.uid) for r in rows]
            states: dict[str, dict[str, int]] = {u: {} for u in uids}
            records: dict[str, StudyRecord] = {}
            if uids:
                counted = conn.execute(
                    sa.select(J.c.study_instance_uid, J.c.state, sa.func.count())
                    .where(J.c.study_instance_uid.in_(uids))
                    .group_by(J.c.study_instance_uid, J.c.state)
                )
                for uid, state, n in counted:
                    states[str(uid)][str(state)] = int(n)
                for row in conn.execute(sa.select(S).where(S.c.study_instance_uid.in_(uids))):
                    records[str(row.study_instance_uid)] = _record(row)
        out = []
        for r in rows:
            uid = str(r.uid)
            record = records.get(uid)
            if int(r.done_jobs or 0) == 0 and int(r.open_jobs or 0) == 0:
                state = "not_analysed"
            elif (
                record is not None
                and record.completed_through is not None
                and int(r.open_jobs or 0) == 0
                and (r.last_finished is None or r.last_finished <= record.completed_through)
                and int(r.finished_jobs or 0) <= (record.completed_jobs or 0)
            ):
                state = "complete"
            else:
                state = "open"
            out.append(
                StudySummary(uid, int(r.images), states[uid], r.first_received, r.last_received, r.last_finished, state, record)
            )
        return out

    # -- completion --------------------------------------------------------------------------------

    def _upsert(self, conn: sa.Connection, study_instance_uid: str, now: datetime) -> Any:
        row = conn.execute(
            self.jobs.db.for_update(sa.select(S).where(S.c.study_instance_uid == study_instance_uid))
        ).first()
        if row is not None:
            return row
        conn.execute(
            S.insert().values(study_instance_uid=study_instance_uid, revision=0, created_at=now, updated_at=now)
        )
        return conn.execute(sa.select(S).where(S.c.study_instance_uid == study_instance_uid)).first()

    def force(self, study_instance_uid: str) -> None:
        """Ask for the study to be completed now (the next round), whatever its quiet period.

        Raises JobStoreError when no image of that study was received.
        """
        now = self.now()
        with self.jobs.db.write() as conn:
            known = conn.execute(
                sa.select(J.c.id).where(J.c.study_instance_uid == study_instance_uid).limit(1)
            ).first()
            if known is None:
                raise JobStoreError(f"no image of study {study_instance_uid} was received")
            row = self._upsert(conn, study_instance_uid, now)
            conn.execute(S.update().where(S.c.id == row.id).values(forced_at=now, updated_at=now))

    def record(
        self,
        study_instance_uid: str,
        result: dict[str, Any],
        through: datetime | None,
        finished_jobs: int,
        destinations: Sequence[str],
    ) -> int:
        """Store a new study result and (re)queue one delivery per destination, atomically; returns the
        new revision (1 for the first result). ``through``: the latest ``finished_at`` of the study's jobs
        when the result was made, ``finished_jobs``: how many of its jobs had finished then (a job
        finishing later, or a new one, makes the study due again)."""
        now = self.now()
        with self.jobs.db.write() as conn:
            row = self._upsert(conn, study_instance_uid, now)
            revision = int(row.revision) + 1
            conn.execute(
                S.update()
                .where(S.c.id == row.id)
                .values(
                    revision=revision,
                    result={**result, "revision": revision},
                    completed_at=now,
                    completed_through=through,
                    completed_jobs=int(finished_jobs),
                    forced_at=None,
                    updated_at=now,
                )
            )
            existing = {
                r.destination: r.id
                for r in conn.execute(sa.select(SD.c.id, SD.c.destination).where(SD.c.study_id == row.id))
            }
            for destination in dict.fromkeys(destinations):
                values = leases.renew_values(STUDY_DELIVERY_LEASES, now)
                if destination in existing:
                    conn.execute(SD.update().where(SD.c.id == existing[destination]).values(**values))
                else:
                    conn.execute(SD.insert().values(study_id=row.id, destination=destination, created_at=now, **values))
        return revision

    # -- deliveries --------------------------------------------------------------------------------

    def claim_deliveries(
        self, owner: str, limit: int = 10, lease_seconds: float = 120.0, destination: str | None = None
    ) -> list[StudyDelivery]:
        """Lease up to ``limit`` due study deliveries (oldest first), like image deliveries."""
        if limit <= 0:
            return []
        now = self.now()
        query = sa.select(SD.c.id, SD.c.state, SD.c.attempts).where(leases.claimable(STUDY_DELIVERY_LEASES, now))
        if destination is not None:
            query = query.where(SD.c.destination == destination)
        query = query.order_by(SD.c.id).limit(limit)
        db = self.jobs.db
        with db.write() as conn:
            ids = leases.claim(
                db, conn, STUDY_DELIVERY_LEASES, query, owner=owner, lease_seconds=lease_seconds, now=now,
                policy=self.jobs.delivery_policy,
            )
            if not ids:
                return []
            rows = conn.execute(sa.select(SD).where(SD.c.id.in_(ids)).order_by(SD.c.id))
            return [_study_delivery(r) for r in rows]

    def complete_delivery(self, delivery_id: int, owner: str) -> None:
        """Mark a leased study delivery done. Raises LeaseLostError when ``owner`` no longer holds it."""
        now = self.now()
        db = self.jobs.db
        with db.write() as conn:
            leases.owned(db, conn, STUDY_DELIVERY_LEASES, delivery_id, owner, "complete")
            leases.complete(conn, STUDY_DELIVERY_LEASES, delivery_id, now)

    def extend_delivery_lease(self, delivery_id: int, owner: str, lease_seconds: float) -> datetime:
        """Heartbeat of a long study delivery: its lease now ends ``lease_seconds`` from now (returned).

        Raises LeaseLostError when ``owner`` no longer holds it.
        """
        now = self.now()
        db = self.jobs.db
        with db.write() as conn:
            return leases.extend(db, conn, STUDY_DELIVERY_LEASES, delivery_id, owner, lease_seconds, now)

    def fail_delivery(self, delivery_id: int, owner: str, reason: str, *, permanent: bool = False) -> DeliveryState:
        """Record a failed attempt: retried with the delivery policy's backoff, or dead."""
        now = self.now()
        db = self.jobs.db
        with db.write() as conn:
            row = leases.owned(db, conn, STUDY_DELIVERY_LEASES, delivery_id, owner, "fail")
            policy = self.jobs.delivery_policy
            return DeliveryState(leases.fail(conn, STUDY_DELIVERY_LEASES, row, policy, reason, now, permanent=permanent))

    def list_deliveries(self, study_id: int) -> list[StudyDelivery]:
        with self.jobs.db.read() as conn:
            rows = conn.execute(sa.select(SD).where(SD.c.study_id == study_id).order_by(SD.c.id))
            return [_study_delivery(r) for r in rows]

    def study_of_delivery(self, delivery: StudyDelivery) -> StudyRecord:
        with self.jobs.db.read() as conn:
            row = conn.execute(sa.select(S).where(S.c.id == delivery.study_id)).first()
        if row is None:
            raise JobStoreError(f"study {delivery.study_id} of study delivery {delivery.id} does not exist")
        return _record(row)
