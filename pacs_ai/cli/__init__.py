"""The ``pacs-ai`` command. Each sub-command group lives in its own module with a ``register`` function."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from pacs_ai import __version__
from pacs_ai.errors import PacsAiError

COMMANDS = {
    "serve": "serve", "worker": "serve", "jobs": "jobs", "send": "network", "echo": "network",
    "classify": "classify", "status": "status", "config": "config_check", "route": "route",
    "studies": "studies", "shadow": "shadow", "db": "db",
}
"""Each top-level sub-command and the module under pacs_ai.cli that registers it (with ``register(subparsers)``;
a sub-command's parser sets ``func`` to a callable taking the parsed arguments and returning the exit status).
``main`` imports only the named command's module: ``pacs-ai serve`` then starts its worker child about 0.4 s
sooner than after importing every module (pynetdicom, SQLAlchemy, pydicom; measured on the project's 2-core VM)."""

COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))
"""The modules under pacs_ai.cli, in the order ``pacs-ai --help`` lists their commands."""


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The ``pacs-ai`` parser with the sub-commands of ``modules`` (default: all of them)."""
    parser = argparse.ArgumentParser(
        prog="pacs-ai", description="DICOM/PACS AI gateway for bone fracture detection."
    )
    parser.add_argument("--version", action="version", version=f"pacs-ai {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        importlib.import_module(f"pacs_ai.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    module = COMMANDS.get(words[0]) if words else None
    parser = build_parser((module,) if module else COMMAND_MODULES)
    args = parser.parse_args(words)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PacsAiError as exc:
        print(f"pacs-ai: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``pacs-ai jobs list | head``): stop quietly, as the shell tools do. Python's
        # documented recipe: point stdout at devnull so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a broken pipe
