"""``pacs-ai config check FILE [--json]``: validate a configuration without starting anything.

On success it prints the effective configuration (every key, defaults filled in, paths resolved) as TOML
that ``load_config`` reads back to the same values, with the database password masked; then warnings
for things that would stop the daemon at start-up (a model folder without ``model.json``, unreadable TLS
files). On error it prints the one error, naming the key, and exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from pacs_ai.config import Config, load_config
from pacs_ai.errors import ConfigError

__all__ = ["config_as_dict", "config_problems", "mask_url", "register", "to_toml"]


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    if "://" not in url or "@" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: mask between the first ':' after '//' and '@'
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_as_dict(config: Config) -> dict[str, Any]:
    """The configuration as plain data (the TOML layout), database password and admin token masked,
    ``source`` dropped."""
    table: dict[str, Any] = _plain(config)
    table.pop("source", None)
    table["database"]["url"] = mask_url(table["database"]["url"])
    if table["dashboard"]["admin_token"]:
        table["dashboard"]["admin_token"] = "***"
    return table


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_table(header: str, table: dict[str, Any], lines: list[str], array: bool = False) -> None:
    lines.append(f"\n[[{header}]]" if array else f"\n[{header}]")
    subtables = []
    arrays = []
    for key, value in table.items():
        if value is None:
            continue  # TOML has no null: an absent key means the default (None)
        if isinstance(value, dict):
            subtables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))  # an array of tables, e.g. [[routing.rules]]
        else:
            lines.append(f"{key} = {_toml_scalar(value)}")
    for key, value in subtables:
        _toml_table(f"{header}.{key}", value, lines)
    for key, items in arrays:
        for item in items:
            _toml_table(f"{header}.{key}", item, lines, array=True)


def derived(config: Config) -> dict[str, str]:
    """Locations that follow from the configuration (defaults under ``data_dir``)."""
    from pacs_ai.ops.audit import audit_path

    return {
        "database_url": mask_url(config.database_url),
        "spool": str(config.storage.spool),
        "results": str(config.storage.results),
        "outbox": str(config.storage.outbox),
        "audit_file": str(audit_path(config)),
    }


def to_toml(table: dict[str, Any], notes: dict[str, str] | None = None) -> str:
    """Render :func:`config_as_dict` output as TOML; ``notes`` become comment lines at the top."""
    lines = ["# effective pacs-ai configuration (pacs-ai config check)"]
    lines += [f"#   {key}: {value}" for key, value in (notes or {}).items()]
    for name, value in table.items():
        if name == "destinations":
            continue
        _toml_table(name, value, lines)
    for destination in table.get("destinations", []):
        _toml_table("destinations", destination, lines, array=True)
    return "\n".join(lines).lstrip("\n") + "\n"


def config_problems(config: Config) -> list[tuple[str, str]]:
    """(key, problem) for what would fail at start-up although the file is valid: missing model cards,
    TLS files that cannot be loaded."""
    problems: list[tuple[str, str]] = []
    for i, folder in enumerate(config.model.path):
        if not (folder / "model.json").is_file():
            problems.append((f"model.path[{i}]", f"{folder} is not a model folder (no model.json)"))
    for i, folder in enumerate(config.model.shadow):
        if not (folder / "model.json").is_file():
            problems.append((f"model.shadow[{i}]", f"{folder} is not a model folder (no model.json)"))
    from pacs_ai.ops.tls import client_context, server_context

    checks = [("listener.tls", config.listener.tls, True)]
    checks += [(f"destinations[{i}].tls", d.tls, False) for i, d in enumerate(config.destinations)]
    for key, tls, server in checks:
        if tls is None:
            continue
        try:
            server_context(tls, key=key) if server else client_context(tls, key=key)
        except ConfigError as exc:
            problems.append((exc.key, exc.problem))
    return problems


def run_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        if args.json:
            _dump({"ok": False, "file": str(args.file), "key": exc.key, "error": exc.problem})
        else:
            print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    problems = config_problems(config)
    table = config_as_dict(config)
    if args.json:
        _dump(
            {
                "ok": True,
                "file": str(config.source),
                "config": table,
                "derived": derived(config),
                "warnings": [{"key": k, "problem": p} for k, p in problems],
            }
        )
    else:
        sys.stdout.write(to_toml(table, derived(config)))
        for key, problem in problems:
            print(f"warning: config: {key}: {problem}", file=sys.stderr)
        print(f"{config.source}: OK" + (f" ({len(problems)} warning(s))" if problems else ""), file=sys.stderr)
    return 0


def _dump(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``config check``."""
    config = subparsers.add_parser("config", help="configuration tools", description="Configuration tools.")
    sub = config.add_subparsers(dest="config_command", metavar="COMMAND")
    check = sub.add_parser(
        "check",
        help="validate a configuration file without starting anything",
        description="Validate FILE and print the effective configuration, or the error naming the key "
        "(exit status 1). Warnings name what would fail at start-up (model folder, TLS files).",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=run_check)

    def no_command(args: argparse.Namespace) -> int:
        config.print_help()
        return 2

    config.set_defaults(func=no_command)

