"""``pacs-ai db upgrade``: create or upgrade the job database's schema, explicitly.

No other admin command migrates (``status``, ``jobs``, ``studies``, ``shadow`` refuse an old schema and
name this command); ``serve`` and ``worker`` upgrade when they start. Idempotent: a second run says the
schema is already current.
"""

from __future__ import annotations

import argparse

from pacs_ai.cli.common import add_config_argument, config_from_args
from pacs_ai.cli.config_check import mask_url
from pacs_ai.queue import migrations
from pacs_ai.queue.jobstore import open_job_store


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = subparsers.add_parser("db", help="the job database: upgrade its schema")
    commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = commands.add_parser(
        "upgrade",
        help="create or upgrade the job database schema to this program's version (idempotent)",
        description="Apply every schema migration the configured job database lacks, in one transaction, "
        "and print the version before and after.",
    )
    add_config_argument(upgrade)
    upgrade.set_defaults(func=run_upgrade)


def run_upgrade(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    store = open_job_store(config, upgrade=True)
    try:
        done = store.upgraded or migrations.SchemaUpgrade(store.schema_version, store.schema_version)
    finally:
        store.close()
    where = mask_url(config.database_url)
    if done.before == done.after:
        print(f"{where}: schema version {done.after}, already current (nothing to do)")
        return 0
    steps = [m for m in migrations.MIGRATIONS if done.before < m.version <= done.after]
    print(f"{where}: schema version {done.before} -> {done.after}")
    for step in steps:
        print(f"  {step.version}: {step.description}")
    return 0
