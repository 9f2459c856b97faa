"""Opening the job store does not migrate it; ``pacs-ai db upgrade`` (and serve/worker start) does.

An old database is built here by the released step-by-step migrations up to version 2 (what pacs-ai wrote
before studies and per-object delivery state), with a job in it. The admin commands are run through the
real CLI entry point; "unchanged" is checked on the database file's bytes (SHA-256) and its recorded
schema versions, read with Python's sqlite3 (not with the code under test).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from pacs_ai.errors import JobStoreError
from pacs_ai.queue import migrations
from pacs_ai.queue.jobstore import JobStore
from pacs_ai.queue.models import schema_version
from support.common import free_port

OLD_VERSION = 2
# What the released steps 3 and 4 describe; written out here, not read from MIGRATIONS.
STEPS_AFTER_2 = [3, 4]


def _cli(*argv: str) -> tuple[int, str, str]:
    from pacs_ai.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _old_database(path: Path, version: int = OLD_VERSION) -> None:
    """A job database as an older pacs-ai left it: WAL mode, steps 1..version applied, one queued job."""
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    with engine.begin() as conn:
        schema_version.create(conn)
        for step in migrations.MIGRATIONS[:version]:
            step.apply(conn)
            conn.execute(schema_version.insert().values(version=step.version, description=step.description, applied_at=sa.func.now()))
        conn.execute(sa.text(
            "INSERT INTO jobs (sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid, calling_aet, "
            "spool_path, sha256, size, state, attempts, received_at, updated_at) VALUES "
            "('2.25.1', '2.25.2', '2.25.3', '1.2.840.10008.5.1.4.1.1.1', 'M', '/x', 'h', 1, 'queued', 0, "
            "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"
        ))
    engine.dispose()


def _versions(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "pacs-ai.toml"
    cfg.write_text(
        f'[listener]\nport = {free_port()}\n[storage]\ndata_dir = "data"\n[metrics]\nenabled = false\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 1\n'
    )
    return cfg


def test_admin_commands_leave_an_old_database_unchanged_and_name_db_upgrade(tmp_path: Path, config: Path) -> None:
    db = tmp_path / "data" / "pacs-ai.db"
    _old_database(db)
    before = _digest(db)
    assert _versions(db) == [1, 2]

    code, out, _ = _cli("status", "--config", str(config), "--json")
    queue = json.loads(out)["queue"]
    assert code == 0 and not queue["ok"]
    assert "schema version 2" in queue["error"] and "pacs-ai db upgrade" in queue["error"]

    for argv in (["jobs", "list"], ["studies", "list"], ["shadow", "report", "--png", str(tmp_path / "s.png")]):
        code, _, err = _cli(*argv, "--config", str(config))
        assert code == 1, argv
        assert "older than this program needs" in err and "pacs-ai db upgrade" in err, (argv, err)

    assert _digest(db) == before, "an admin command changed the database file"
    assert _versions(db) == [1, 2]
    assert not (tmp_path / "s.png").exists()


def test_db_upgrade_prints_versions_keeps_data_and_is_idempotent(tmp_path: Path, config: Path) -> None:
    db = tmp_path / "data" / "pacs-ai.db"
    _old_database(db)
    code, out, err = _cli("db", "upgrade", "--config", str(config))
    assert code == 0, err
    assert "schema version 2 -> 4" in out
    assert [line.split(":")[0].strip() for line in out.splitlines()[1:]] == [str(v) for v in STEPS_AFTER_2]
    assert _versions(db) == [1, 2, 3, 4]
    upgraded = _digest(db)

    code, out, _ = _cli("db", "upgrade", "--config", str(config))
    assert code == 0 and "schema version 4, already current" in out
    assert _digest(db) == upgraded and _versions(db) == [1, 2, 3, 4]

    code, out, _ = _cli("jobs", "list", "--config", str(config), "--json")
    assert code == 0 and [j["sop_instance_uid"] for j in json.loads(out)] == ["2.25.1"]
    code, out, _ = _cli("status", "--config", str(config), "--json")
    assert json.loads(out)["queue"]["jobs"]["queued"] == 1
    assert _digest(db) == upgraded, "status changed an up-to-date database"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_db_upgrade_creates_a_new_database(tmp_path: Path, config: Path) -> None:
    code, out, _ = _cli("db", "upgrade", "--config", str(config))
    assert code == 0 and "schema version 0 -> 4" in out
    assert _versions(tmp_path / "data" / "pacs-ai.db") == [1, 2, 3, 4]


def test_db_upgrade_names_a_file_that_is_not_a_database(tmp_path: Path, config: Path) -> None:
    """A corrupt or foreign file where the database should be: one error line, no traceback, file untouched."""
    db = tmp_path / "data" / "pacs-ai.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"hello, not SQLite\n")
    code, out, err = _cli("db", "upgrade", "--config", str(config))
    assert code == 1 and out == ""
    assert err.startswith("pacs-ai: error: cannot open the job database") and "not a database" in err
    assert err.count("\n") == 1
    assert db.read_bytes() == b"hello, not SQLite\n"


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, config: Path) -> None:
    """``pacs-ai db upgrade | head -0``: the reader is gone before the command writes; no BrokenPipeError trace."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "pacs_ai", "db", "upgrade", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away at once, as `head -0` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert _versions(tmp_path / "data" / "pacs-ai.db") == [1, 2, 3, 4]  # the work itself was done


def test_opening_without_upgrade_writes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "pacs-ai.db"
    with pytest.raises(JobStoreError, match="pacs-ai db upgrade"):
        JobStore(f"sqlite:///{missing}")
    assert not missing.parent.exists()

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(JobStoreError, match="has no pacs-ai schema.*pacs-ai db upgrade"):
        JobStore(f"sqlite:///{empty}")
    assert empty.stat().st_size == 0

    old = tmp_path / "old.db"
    _old_database(old, version=3)
    before = _digest(old)
    with pytest.raises(JobStoreError, match="schema version 3, older"):
        JobStore(f"sqlite:///{old}")
    assert _digest(old) == before
    store = JobStore(f"sqlite:///{old}", upgrade=True)
    assert store.upgraded == migrations.SchemaUpgrade(3, 4)
    store.close()
    reopened = JobStore(f"sqlite:///{old}")
    assert reopened.schema_version == 4 and reopened.upgraded is None
    reopened.close()
