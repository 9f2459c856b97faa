"""``pacs-ai route explain FILE...``: which routing rule decides for a DICOM file, and why.

Reads only the header (no pixel data), builds the router the daemon would build from ``--config`` and
the primary model card, and prints for each file the facts routing looks at, every rule in order with
whether it matched, and the decision. ``--calling-aet`` supplies the calling AE title a router would
have used (the file does not hold it). Exit status 0 when every file would be analysed, 3 when one or
more would be skipped, 1 on an unreadable file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from pacs_ai.cli.common import add_config_argument, config_from_args, print_json
from pacs_ai.route.facts import ImageFacts

__all__ = ["register"]

SKIPPED_STATUS = 3


def _facts_lines(facts: ImageFacts) -> list[str]:
    age = "unknown" if facts.age_years is None else f"{facts.age_years:.1f} years (from {facts.age_source})"
    return [
        f"  Modality:            {facts.modality or '-'}",
        f"  SOP Class UID:       {facts.sop_class_uid or '-'}",
        f"  body part:           {facts.body_part.describe()}",
        f"  View Position:       {facts.view_position or '-'}",
        f"  laterality:          {facts.laterality or '-'}",
        f"  calling AE title:    {facts.calling_aet or '- (give --calling-aet)'}",
        f"  Series Description:  {facts.series_description or '-'}",
        f"  Protocol Name:       {facts.protocol_name or '-'}",
        f"  patient age:         {age}",
    ]


def _cmd_explain(args: argparse.Namespace) -> int:
    # Imported here: every `pacs-ai` command builds this module's parser, and these import torch.
    from pacs_ai.infer.model_card import load_card
    from pacs_ai.route.build import build_router

    config = config_from_args(args)
    card = load_card(config.model.path[0])
    router = build_router(config.routing, card)
    status = 0
    out: list[dict[str, Any]] = []
    for path in args.files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            print(f"{path}: cannot read: {exc}")
            status = 1
            continue
        facts = ImageFacts.from_dataset(ds, args.calling_aet)
        decision = router.decide(facts)
        if not decision.analyse and status == 0:
            status = SKIPPED_STATUS
        if args.json:
            out.append({"file": str(path), **decision.to_dict(), "trace": list(decision.trace)})
            continue
        verdict = "ANALYSED" if decision.analyse else "SKIPPED"
        print(f"{path}: {verdict} by rule {decision.rule}")
        print(f"  reason: {decision.reason}")
        print("facts:")
        print("\n".join(_facts_lines(facts)))
        print(f"rules (model {card.name} {card.version}; intended use {'on' if config.routing.intended_use else 'off'}):")
        for i, line in enumerate(decision.trace, 1):
            print(f"  {i}. {line}")
    if args.json:
        print_json(out)
    return status


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``route explain``."""
    route = subparsers.add_parser("route", help="routing rules: which images are analysed")
    sub = route.add_subparsers(dest="route_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "explain",
        help="say which rule decides for each file and why",
        description="Print the routing decision for DICOM files: the header facts, each rule in order, the "
        "deciding rule. Exit status 3 when a file would be skipped.",
    )
    add_config_argument(p)
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--calling-aet", default=None, metavar="AET", help="the calling AE title to assume")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_explain)
