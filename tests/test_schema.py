"""The schema migrations build exactly the schema the SQLAlchemy models declare, on SQLite and PostgreSQL.

Two databases per dialect: one built by ``migrations.upgrade`` (every released step in turn), one by
``models.metadata.create_all``; each is read back by SQLAlchemy's inspector (the database's own catalogue)
and compared: tables, columns with their types and nullability, primary keys, unique constraints, foreign
keys, indexes. Databases left by every released schema version upgrade to the same schema. The index
names below are those of the released migration steps (v1 to v4), written out here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pacs_ai.queue import migrations
from pacs_ai.queue.models import metadata, schema_version
from support.postgres import postgres_server  # noqa: F401 (fixture)

RELEASED_INDEXES = {
    "jobs": {"ix_jobs_state_next", "ix_jobs_state_updated", "ix_jobs_study"},
    "deliveries": {"ix_deliveries_state_next", "ix_deliveries_job"},
    "study_deliveries": {"ix_study_deliveries_state_next"},
    "studies": set(),
    "schema_version": set(),
}


def reflected_schema(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    """The schema as the database reports it, in a form that compares with ``==``."""
    insp = sa.inspect(engine)
    out: dict[str, dict[str, Any]] = {}
    for table in sorted(insp.get_table_names()):
        out[table] = {
            "columns": {c["name"]: (str(c["type"]), bool(c["nullable"])) for c in insp.get_columns(table)},
            "primary_key": tuple(insp.get_pk_constraint(table)["constrained_columns"]),
            "unique": sorted((u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints(table)),
            "foreign_keys": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]),
                 str((f.get("options") or {}).get("ondelete")))
                for f in insp.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in insp.get_indexes(table)
                if not i.get("duplicates_constraint")  # PostgreSQL: the index behind a UNIQUE constraint
            ),
        }
    return out


def _assert_same(migrated: dict[str, Any], declared: dict[str, Any]) -> None:
    assert sorted(migrated) == sorted(declared)
    for table in declared:
        for part in ("columns", "primary_key", "unique", "foreign_keys", "indexes"):
            assert migrated[table][part] == declared[table][part], f"{table}.{part}"
    assert migrated == declared
    for table, names in RELEASED_INDEXES.items():
        assert {i[0] for i in declared[table]["indexes"]} == names, table


def _compare(migrated_url: str, declared_url: str) -> None:
    migrated = sa.create_engine(migrated_url)
    declared = sa.create_engine(declared_url)
    try:
        assert migrations.upgrade(migrated) == migrations.SchemaUpgrade(0, migrations.LATEST_VERSION)
        metadata.create_all(declared)
        _assert_same(reflected_schema(migrated), reflected_schema(declared))
    finally:
        migrated.dispose()
        declared.dispose()


def test_migrations_build_the_models_schema_sqlite(tmp_path: Path) -> None:
    _compare(f"sqlite:///{tmp_path / 'migrated.db'}", f"sqlite:///{tmp_path / 'declared.db'}")


@pytest.mark.postgres
def test_migrations_build_the_models_schema_postgresql(postgres_server) -> None:  # noqa: F811
    _compare(postgres_server.create_database("schema_migrated"), postgres_server.create_database("schema_declared"))


@pytest.mark.parametrize("released", range(1, migrations.LATEST_VERSION))
def test_every_released_version_upgrades_to_the_models_schema(released: int, tmp_path: Path) -> None:
    """A database left by the step-by-step migrations of an older release (steps 1..released), with a job
    in it, upgrades to exactly the declared schema and keeps the job."""
    old = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    declared = sa.create_engine(f"sqlite:///{tmp_path / 'declared.db'}")
    try:
        with old.begin() as conn:
            schema_version.create(conn)
            for step in migrations.MIGRATIONS[:released]:
                step.apply(conn)
                conn.execute(schema_version.insert().values(version=step.version, description=step.description, applied_at=sa.func.now()))
            conn.execute(sa.text(
                "INSERT INTO jobs (sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid, "
                "calling_aet, spool_path, sha256, size, state, attempts, received_at, updated_at) VALUES ('2.25.1', "
                "'2.25.2', '2.25.3', '1.2.840.10008.5.1.4.1.1.1', 'M', '/x', 'h', 1, 'done', 1, '2026-01-01', '2026-01-01')"
            ))
        assert migrations.upgrade(old) == migrations.SchemaUpgrade(released, migrations.LATEST_VERSION)
        metadata.create_all(declared)
        _assert_same(reflected_schema(old), reflected_schema(declared))
        with old.connect() as conn:
            assert conn.execute(sa.text("SELECT sop_instance_uid, state FROM jobs")).all() == [("2.25.1", "done")]
    finally:
        old.dispose()
        declared.dispose()
