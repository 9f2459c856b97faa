"""The leased state machine shared by jobs, deliveries and study deliveries.

Every leased table has the columns ``state``, ``attempts``, ``next_attempt_at``, ``lease_owner``,
``lease_expires_at``, ``last_error`` and ``updated_at``, and moves through the same states (named per
table by a :class:`LeasedKind`)::

    fresh --claim--> leased --complete--> done
                      |  ^--extend (heartbeat)
                      |--fail--> failed --(backoff passed) claim--> leased ...
                      |--fail (permanent, or out of attempts)--> dead
                      |--lease expired / owner gone (expire)--> claimable again, or dead on its last attempt
                      '--release (orderly shutdown, attempt given back)--> fresh
    failed | dead --retry (admin)--> fresh, attempts reset

An attempt is counted when a row is claimed. Whether a failure is retried or dead is asked of
:meth:`RetryPolicy.next_attempt_at <pacs_ai.queue.retry.RetryPolicy.next_attempt_at>` only. The functions
run inside a transaction the caller opened with :meth:`Database.write <pacs_ai.queue.engine.Database.write>`
(SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: rows locked ``FOR UPDATE``, claims ``SKIP LOCKED``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from pacs_ai.errors import JobStoreError, LeaseLostError
from pacs_ai.queue.engine import Database
from pacs_ai.queue.records import clip_error
from pacs_ai.queue.retry import RetryPolicy


@dataclass(frozen=True)
class LeasedKind:
    """One table that follows the leased state machine, and what its states are called.

    ``noun`` and ``plural`` name a row in error messages ("job"/"jobs"); ``started_column`` is set to the
    claim time (jobs: ``started_at``); ``finished_column`` to the time the row went done or dead (jobs:
    ``finished_at``); ``delivered_column`` to the time it went done (deliveries: ``delivered_at``).
    """

    table: sa.Table
    noun: str
    plural: str
    fresh: StrEnum
    leased: StrEnum
    done: StrEnum
    failed: StrEnum
    dead: StrEnum
    started_column: str | None = None
    finished_column: str | None = None
    delivered_column: str | None = None
    expired_detail: str = ""
    """Appended to the error of a row dead-lettered because its lease expired on its last attempt."""

    def state(self, value: str) -> StrEnum:
        """The enum member for a stored state string."""
        return type(self.fresh)(value)


def claimable(kind: LeasedKind, now: datetime) -> Any:
    """Rows that may be claimed now: fresh ones, failed ones whose backoff has passed, expired leases."""
    t = kind.table
    return sa.or_(
        t.c.state == kind.fresh.value,
        sa.and_(t.c.state == kind.failed.value, sa.or_(t.c.next_attempt_at.is_(None), t.c.next_attempt_at <= now)),
        sa.and_(t.c.state == kind.leased.value, t.c.lease_expires_at <= now),
    )


def claim(
    db: Database,
    conn: sa.Connection,
    kind: LeasedKind,
    query: sa.Select[Any],
    *,
    owner: str,
    lease_seconds: float,
    now: datetime,
    policy: RetryPolicy,
) -> list[int]:
    """Lease the rows ``query`` selects (columns id, state, attempts) to ``owner`` for ``lease_seconds``.

    Returns their ids. A row whose lease expired on its last attempt (``policy.exhausted``) is
    dead-lettered instead, so work that kills its worker every time ends visible rather than looping.
    """
    t = kind.table
    ids: list[int] = []
    for row in conn.execute(db.for_update(query, skip_locked=True)).all():
        if row.state == kind.leased.value and policy.exhausted(int(row.attempts)):
            values: dict[str, Any] = dict(
                state=kind.dead.value,
                lease_owner=None,
                lease_expires_at=None,
                next_attempt_at=None,
                last_error=f"gave up after {row.attempts} attempts: the lease expired{kind.expired_detail}",
                updated_at=now,
            )
            if kind.finished_column:
                values[kind.finished_column] = now
            conn.execute(t.update().where(t.c.id == row.id).values(**values))
            continue
        ids.append(int(row.id))
    if ids:
        values = dict(
            state=kind.leased.value,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=t.c.attempts + 1,
            next_attempt_at=None,
            updated_at=now,
        )
        if kind.started_column:
            values[kind.started_column] = now
        conn.execute(t.update().where(t.c.id.in_(ids)).values(**values))
    return ids


def owned(db: Database, conn: sa.Connection, kind: LeasedKind, row_id: int, owner: str, action: str) -> Any:
    """The row ``row_id``, locked, if ``owner`` still holds its lease.

    Raises JobStoreError when the row does not exist, LeaseLostError when it is not leased to ``owner``
    (its lease expired and another process claimed it, or an admin changed it).
    """
    t = kind.table
    row = conn.execute(db.for_update(sa.select(t).where(t.c.id == row_id))).first()
    if row is None:
        raise JobStoreError(f"{kind.noun} {row_id} does not exist")
    if row.state != kind.leased.value or row.lease_owner != owner:
        raise LeaseLostError(
            f"cannot {action} {kind.noun} {row_id}: {owner!r} no longer holds its lease "
            f"(state {row.state}, lease owner {row.lease_owner!r})"
        )
    return row


def _unleased(now: datetime) -> dict[str, Any]:
    return dict(lease_owner=None, lease_expires_at=None, updated_at=now)


def complete(conn: sa.Connection, kind: LeasedKind, row_id: int, now: datetime, **values: Any) -> None:
    """End a leased row (checked with :func:`owned`) as done; ``values``: more columns to set."""
    done: dict[str, Any] = dict(state=kind.done.value, next_attempt_at=None, last_error=None, **_unleased(now))
    for column in (kind.finished_column, kind.delivered_column):
        if column:
            done[column] = now
    conn.execute(kind.table.update().where(kind.table.c.id == row_id).values(**{**done, **values}))


def fail(
    conn: sa.Connection,
    kind: LeasedKind,
    row: Any,
    policy: RetryPolicy,
    reason: str,
    now: datetime,
    *,
    permanent: bool = False,
    values: Any = None,
) -> StrEnum:
    """Record a failed attempt of a leased row (checked with :func:`owned`): failed with a backoff, or dead
    when ``permanent`` or out of attempts (:meth:`RetryPolicy.next_attempt_at`). Returns the new state.

    ``values``: more columns to set, or a callable ``dead -> dict`` for columns that depend on the outcome.
    """
    retry_at = policy.next_attempt_at(int(row.attempts), now, permanent=permanent)
    dead = retry_at is None
    state = kind.dead if dead else kind.failed
    update: dict[str, Any] = dict(
        state=state.value, last_error=clip_error(reason), next_attempt_at=retry_at, **_unleased(now)
    )
    if kind.finished_column:
        update[kind.finished_column] = now if dead else None
    extra = values(dead) if callable(values) else (values or {})
    conn.execute(kind.table.update().where(kind.table.c.id == row.id).values(**update, **extra))
    return state


def extend(
    db: Database, conn: sa.Connection, kind: LeasedKind, row_id: int, owner: str, lease_seconds: float, now: datetime
) -> datetime:
    """Heartbeat: push the lease of a row ``owner`` holds to ``now + lease_seconds``; returns the new expiry.

    Raises LeaseLostError when ``owner`` no longer holds it (another process may already be working on it).
    """
    owned(db, conn, kind, row_id, owner, "extend the lease of")
    expires = now + timedelta(seconds=lease_seconds)
    conn.execute(kind.table.update().where(kind.table.c.id == row_id).values(lease_expires_at=expires, updated_at=now))
    return expires


def release(conn: sa.Connection, kind: LeasedKind, row: Any, now: datetime) -> None:
    """Give a leased row (checked with :func:`owned`) back as fresh without counting the attempt."""
    values: dict[str, Any] = dict(state=kind.fresh.value, attempts=max(int(row.attempts) - 1, 0), **_unleased(now))
    if kind.started_column:
        values[kind.started_column] = None
    conn.execute(kind.table.update().where(kind.table.c.id == row.id).values(**values))


def lease_owners(conn: sa.Connection, kind: LeasedKind) -> set[str]:
    """Owners holding a lease on a row of ``kind`` now (expired or not)."""
    t = kind.table
    query = sa.select(t.c.lease_owner).where(t.c.state == kind.leased.value).distinct()
    return {o for o in conn.execute(query).scalars() if o}


def expire(conn: sa.Connection, kind: LeasedKind, owners: Sequence[str], now: datetime) -> int:
    """End the leases ``owners`` hold now (their process is gone): the rows are claimable at once, and the
    attempt still counts (see :func:`claim`). Returns how many leases were ended."""
    if not owners:
        return 0
    t = kind.table
    result = conn.execute(
        t.update()
        .where(t.c.state == kind.leased.value, t.c.lease_owner.in_(list(owners)))
        .values(lease_expires_at=now, updated_at=now)
    )
    return int(result.rowcount or 0)


def requeue_values(kind: LeasedKind, now: datetime) -> dict[str, Any]:
    """Columns that make a row fresh again with its attempts reset (an admin's retry)."""
    values: dict[str, Any] = dict(state=kind.fresh.value, attempts=0, next_attempt_at=None, **_unleased(now))
    if kind.finished_column:
        values[kind.finished_column] = None
    return values


def renew_values(kind: LeasedKind, now: datetime) -> dict[str, Any]:
    """Columns of a row (re)created fresh: attempts, error and delivery time cleared (a new result)."""
    values = requeue_values(kind, now)
    values["last_error"] = None
    if kind.delivered_column:
        values[kind.delivered_column] = None
    return values


def retry(db: Database, conn: sa.Connection, kind: LeasedKind, row_id: int, allowed: Sequence[StrEnum], now: datetime) -> None:
    """An admin's retry of one row in one of the ``allowed`` states: fresh again, attempts reset.

    Raises JobStoreError when the row does not exist or is in another state.
    """
    t = kind.table
    row = conn.execute(db.for_update(sa.select(t.c.state).where(t.c.id == row_id))).first()
    if row is None:
        raise JobStoreError(f"{kind.noun} {row_id} does not exist")
    if row.state not in [s.value for s in allowed]:
        names = [s.value for s in allowed]
        listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise JobStoreError(f"{kind.noun} {row_id} is {row.state}: only {listed} {kind.plural} can be retried")
    conn.execute(t.update().where(t.c.id == row_id).values(**requeue_values(kind, now)))


def retry_dead(conn: sa.Connection, kind: LeasedKind, now: datetime) -> int:
    """Make every dead row of ``kind`` fresh again with its attempts reset; returns how many."""
    t = kind.table
    result = conn.execute(t.update().where(t.c.state == kind.dead.value).values(**requeue_values(kind, now)))
    return int(result.rowcount or 0)
