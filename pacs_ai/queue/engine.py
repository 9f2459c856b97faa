"""Engine and transactions of the job store: one SQLAlchemy engine per store, SQLite or PostgreSQL.

SQLite runs in WAL mode (set by the schema upgrade) with ``synchronous=FULL``, foreign keys on and a busy timeout; every writing
transaction starts with ``BEGIN IMMEDIATE``, so a claim is atomic across threads and processes, while a
read-only transaction starts with a plain ``BEGIN`` and takes no write lock. PostgreSQL rows are locked
with ``SELECT ... FOR UPDATE [SKIP LOCKED]`` (:meth:`Database.for_update`).

Every database failure leaves here as :class:`~pacs_ai.errors.JobStoreError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

from pacs_ai.errors import JobStoreError


def short_error(exc: BaseException) -> str:
    """The first line of a database error (the driver's own message when SQLAlchemy wraps one)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def missing_sqlite_file(url: str) -> Path | None:
    """The file an ``sqlite:///`` URL names when it does not exist (None: it exists, in memory, or not
    SQLite). Raises nothing: a malformed URL is for :class:`Database` to report."""
    if not url.startswith("sqlite"):
        return None
    try:
        database = make_url(url).database
    except Exception:  # noqa: BLE001 - Database reports a malformed URL
        return None
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    path = Path(database)
    return None if path.exists() else path


def sqlite_engine(parsed: sa.URL, busy_timeout_s: float, *, create_folder: bool = True) -> sa.Engine:
    """An engine on an SQLite file (or ``:memory:``) with the pragmas above; ``busy_timeout_s`` seconds.
    ``create_folder``: make the file's folder when missing (only when the store may create the file)."""
    database = parsed.database or ""
    memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if not memory and create_folder:
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
            # journal_mode=WAL is kept in the file: migrations.upgrade sets it, so that merely opening a
            # database (pacs-ai status) writes nothing.
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


class Database:
    """The engine of one job store and its two kinds of transaction (:meth:`write`, :meth:`read`).

    ``url``: an SQLAlchemy URL (``sqlite:///path`` or ``postgresql+psycopg://...``); ``busy_timeout_s``:
    how long an SQLite writer waits for the lock; ``create``: an SQLite file's folder may be made (False for
    a store that must only read what exists). Raises JobStoreError for a malformed URL or a driver
    that cannot load. Connecting is lazy: nothing touches the database until the first transaction.
    """

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0, create: bool = True) -> None:
        self.url = url
        try:
            parsed = make_url(url)
        except Exception as exc:  # sqlalchemy raises ArgumentError and others for a malformed URL
            raise JobStoreError(f"invalid database URL {url!r}: {exc}") from exc
        self.parsed = parsed
        self.dialect = parsed.get_backend_name()
        try:
            if self.dialect == "sqlite":
                self.engine = sqlite_engine(parsed, busy_timeout_s, create_folder=create)
            else:
                self.engine = sa.create_engine(parsed, pool_pre_ping=True)
        except (sa.exc.SQLAlchemyError, OSError, ImportError) as exc:
            raise JobStoreError(f"cannot open the job database {parsed!r}: {short_error(exc)}") from exc

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A writing transaction (SQLite: ``BEGIN IMMEDIATE``), committed on leaving, rolled back on error."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except JobStoreError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise JobStoreError(f"job database error: {short_error(exc)}") from exc

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only transaction (SQLite: plain ``BEGIN``, no write lock)."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(pacs_ai_read_only=True)
                with conn.begin():
                    yield conn
        except JobStoreError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise JobStoreError(f"job database error: {short_error(exc)}") from exc

    def for_update(self, query: sa.Select[Any], *, skip_locked: bool = False) -> sa.Select[Any]:
        """``query`` locking the rows it selects until the transaction ends (SQLite: the write
        transaction already holds the database lock, so the query is returned as is)."""
        if self.dialect == "sqlite":
            return query
        return query.with_for_update(skip_locked=skip_locked)

    def close(self) -> None:
        self.engine.dispose()
