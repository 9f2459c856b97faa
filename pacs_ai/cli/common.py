"""Helpers shared by the CLI modules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pacs_ai.config import Config, load_config


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML configuration file (default: the embedded defaults)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str, sort_keys=True)
    sys.stdout.write("\n")


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (argparse type)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
