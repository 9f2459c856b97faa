"""The ``pacs-ai`` command. Each sub-command group lives in its own module with a ``register`` function."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from pacs_ai import __version__
from pacs_ai.errors import PacsAiError

# Modules under pacs_ai.cli, each exposing ``register(subparsers) -> None``; a sub-command's parser sets
# ``func`` to a callable taking the parsed arguments and returning the exit status.
COMMAND_MODULES = ("serve", "jobs", "network", "classify", "status", "config_check", "route", "studies", "shadow", "db")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-ai", description="DICOM/PACS AI gateway for bone fracture detection."
    )
    parser.add_argument("--version", action="version", version=f"pacs-ai {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"pacs_ai.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
