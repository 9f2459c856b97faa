"""``pacs-ai shadow report [--since AGE|DATE]``: live versus shadow models, distributions and drift."""

from __future__ import annotations

import argparse
import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pacs_ai.cli.common import add_config_argument, config_from_args, print_json
from pacs_ai.cli.jobs import parse_duration
from pacs_ai.errors import PacsAiError
from pacs_ai.queue.jobstore import open_job_store

__all__ = ["register"]


def _since(text: str) -> datetime:
    """``7d``/``12h`` (that long ago) or an ISO date/time (UTC when no zone is given)."""
    try:
        return datetime.now(UTC) - parse_duration(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an age like 7d or a date like 2026-11-30, got {text!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _references(paths: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    from pacs_ai.studies.processor import read_card

    out = {}
    for path in paths:
        try:
            card = read_card(path)
        except PacsAiError:
            continue
        if card.get("validation_distribution"):
            out[(str(card.get("name")), str(card.get("version")))] = card["validation_distribution"]
    return out


def _cmd_report(args: argparse.Namespace) -> int:
    from pacs_ai.queue.jobstore import JobState
    from pacs_ai.shadow.report import build_report, render_png, render_text

    config = config_from_args(args)
    store = open_job_store(config)
    try:
        jobs = [j for j in store.finished_since(args.since, limit=1_000_000) if j.state == JobState.DONE]
    finally:
        store.close()
    report = build_report(jobs, _references([*config.model.path, *config.model.shadow]), args.since)
    png = render_png(report, args.png) if args.png is not None else None
    if args.json:
        data = dataclasses.asdict(report)
        data["png"] = str(png) if png is not None else None
        print_json(data)
        return 0
    print(render_text(report), end="")
    if png is not None:
        print(f"\nplot: {png}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``shadow report``."""
    shadow = subparsers.add_parser("shadow", help="shadow models: agreement with the live model and drift")
    sub = shadow.add_subparsers(dest="shadow_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "report",
        help="agreement, probability distributions and drift (PSI) of the live and shadow models",
        description="Compare the live model with the shadow models ([model] shadow) on the images analysed "
        "since --since: agreement of decisions, Cohen's kappa, probability quantiles, and the population "
        "stability index against each model card's validation distribution; with --png, a plot too.",
    )
    add_config_argument(p)
    p.add_argument("--since", type=_since, default=_since("7d"), metavar="AGE|DATE", help="e.g. 7d, 12h, 2026-11-30 (default 7d)")
    p.add_argument("--png", type=Path, default=None, metavar="FILE", help="also write the plot to FILE (default: no plot)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_report)
