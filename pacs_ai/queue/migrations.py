"""Schema migrations of the job store: an ordered list of steps and a ``schema_version`` table.

Opening a store never migrates it: :func:`check` only reads the version and refuses a database older or
newer than this program. Migrating is explicit (``pacs-ai serve`` and ``pacs-ai worker`` at start,
``pacs-ai db upgrade``): :func:`upgrade` applies, in one transaction, every step whose version is above
the highest version recorded in ``schema_version``. Steps are never edited once released: a schema change is a new
step appended to ``MIGRATIONS`` (and the matching change in ``models.py``). Each step describes its own
tables (a frozen snapshot), so a later change to ``models.py`` never alters what an old step creates.

Concurrent openers (several processes starting at once) are serialised: SQLite by ``BEGIN IMMEDIATE``
(see jobstore.py), PostgreSQL by a transaction-level advisory lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from pacs_ai.errors import JobStoreError
from pacs_ai.queue.engine import Database
from pacs_ai.queue.models import UTCDateTime
from pacs_ai.queue.models import schema_version as schema_version_table

# Arbitrary constant identifying pacs-ai's migration lock among PostgreSQL advisory locks.
_PG_LOCK_KEY = 0x70616373  # "pacs"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[sa.Connection], None]


def _v1_initial(conn: sa.Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "jobs",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("calling_aet", sa.String(16), nullable=False),
        sa.Column("spool_path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", UTCDateTime, nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.Index("ix_jobs_state_next", "state", "next_attempt_at"),
    )
    sa.Table(
        "deliveries",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("destination", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", UTCDateTime, nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("delivered_at", UTCDateTime, nullable=True),
        sa.UniqueConstraint("job_id", "destination", name="uq_deliveries_job_destination"),
        sa.Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )
    md.create_all(conn)


def _v2_job_indexes(conn: sa.Connection) -> None:
    # Listing and purging go by state and time; delivery lookups by job.
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_state_updated ON jobs (state, updated_at)"))
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_deliveries_job ON deliveries (job_id)"))


def _v3_studies(conn: sa.Connection) -> None:
    # Study grouping (pacs_ai/studies): one row per study that got a study-level result, its deliveries,
    # and an index to group jobs by study.
    md = sa.MetaData()
    sa.Table("jobs", md, sa.Column("id", sa.Integer, primary_key=True))  # for the foreign key only
    sa.Table(
        "studies",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("completed_at", UTCDateTime, nullable=True),
        sa.Column("completed_through", UTCDateTime, nullable=True),
        sa.Column("completed_jobs", sa.Integer, nullable=True),
        sa.Column("forced_at", UTCDateTime, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    sa.Table(
        "study_deliveries",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
        sa.Column("destination", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", UTCDateTime, nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("delivered_at", UTCDateTime, nullable=True),
        sa.UniqueConstraint("study_id", "destination", name="uq_study_deliveries_study_destination"),
        sa.Index("ix_study_deliveries_state_next", "state", "next_attempt_at"),
    )
    md.tables["studies"].create(conn)
    md.tables["study_deliveries"].create(conn)
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_study ON jobs (study_instance_uid)"))


def _v4_delivery_objects(conn: sa.Connection) -> None:
    # Delivery state per result object (SC delivered while the SR was refused; a retry sends only what is
    # missing): a JSON column on deliveries, NULL for rows written before (nothing recorded per object).
    column_type = sa.JSON().compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE deliveries ADD COLUMN objects {column_type}"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema: jobs and deliveries", _v1_initial),
    Migration(2, "indexes for listing, purging and per-job delivery lookups", _v2_job_indexes),
    Migration(3, "studies: study-level results and their deliveries; jobs indexed by study", _v3_studies),
    Migration(4, "deliveries: state per result object", _v4_delivery_objects),
)

LATEST_VERSION = MIGRATIONS[-1].version


def current_version(conn: sa.Connection) -> int:
    """The highest applied version, 0 for an empty database."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    return int(conn.execute(sa.select(sa.func.max(schema_version_table.c.version))).scalar() or 0)


@dataclass(frozen=True)
class SchemaUpgrade:
    """What :func:`upgrade` did: the schema version before and after (equal when nothing was to do)."""

    before: int
    after: int


UPGRADE_HINT = "run `pacs-ai db upgrade --config FILE` (pacs-ai serve and pacs-ai worker also upgrade it when they start)"


def _newer_error(version: int) -> JobStoreError:
    return JobStoreError(
        f"the job database is at schema version {version}, newer than this program knows "
        f"({LATEST_VERSION}): upgrade pacs-ai or point it at another database"
    )


def check(db: Database) -> int:
    """The schema version of the database, read without changing anything.

    Raises JobStoreError when it is older than ``LATEST_VERSION`` (the message names ``pacs-ai db
    upgrade``; version 0: no pacs-ai schema at all) or newer (a newer pacs-ai wrote it).
    """
    with db.read() as conn:
        version = current_version(conn)
    if version > LATEST_VERSION:
        raise _newer_error(version)
    if version < LATEST_VERSION:
        what = "has no pacs-ai schema" if version == 0 else f"is at schema version {version}"
        raise JobStoreError(
            f"the job database {db.parsed!r} {what}, older than this program needs ({LATEST_VERSION}): "
            f"{UPGRADE_HINT}"
        )
    return version


def _use_wal(engine: sa.Engine) -> None:
    """SQLite: write-ahead logging, a setting kept in the database file (set once, by the upgrade)."""
    database = engine.url.database or ""
    if engine.dialect.name != "sqlite" or database in ("", ":memory:") or database.startswith("file::memory:"):
        return
    raw = engine.raw_connection()  # outside any transaction: journal_mode cannot change inside one
    try:
        cur = raw.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.close()
    finally:
        raw.close()


def upgrade(engine: sa.Engine) -> SchemaUpgrade:
    """Bring the schema up to ``LATEST_VERSION`` (idempotent); returns the versions before and after.

    Raises JobStoreError when the database is newer than this program (and SQLAlchemy errors when a step
    fails; the transaction is then rolled back, nothing half-applied).
    """
    _use_wal(engine)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        schema_version_table.create(conn, checkfirst=True)
        before = version = current_version(conn)
        if version > LATEST_VERSION:
            raise _newer_error(version)
        for migration in MIGRATIONS:
            if migration.version <= version:
                continue
            migration.apply(conn)
            conn.execute(
                schema_version_table.insert().values(
                    version=migration.version,
                    description=migration.description,
                    applied_at=datetime.now(UTC),
                )
            )
            version = migration.version
    return SchemaUpgrade(before, version)
