"""``pacs-ai studies list|show|complete``: images grouped by study, study results, forced completion."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pacs_ai.cli.common import add_config_argument, config_from_args, print_json
from pacs_ai.errors import ResultFormatError
from pacs_ai.queue.jobstore import open_job_store
from pacs_ai.results import StudyResult
from pacs_ai.studies.store import StudyRecord, StudyStore, StudySummary

__all__ = ["register"]

STATES = ("open", "complete", "not_analysed")


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _plain(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)


def _study_result(record: StudyRecord | None) -> StudyResult | None:
    try:
        return StudyResult.read(record.result) if record is not None else None
    except ResultFormatError:
        return None


def _finding(summary: StudySummary) -> str:
    result = _study_result(summary.record)
    if result is None:
        return "-"
    word = "FRACTURE SUSPECTED" if result.fractured else "no fracture"
    return f"{word} (P={result.probability:.3f}, {result.rule}, rev {result.revision})"


def _counts(summary: StudySummary) -> str:
    return " ".join(f"{state} {n}" for state, n in sorted(summary.jobs_by_state.items()))


def _cmd_list(args: argparse.Namespace) -> int:
    store = open_job_store(config_from_args(args))
    try:
        rows = StudyStore(store).summaries(limit=args.limit)
    finally:
        store.close()
    if args.state:
        rows = [r for r in rows if r.state == args.state]
    if args.json:
        print_json([_plain(r) for r in rows])
        return 0
    if not rows:
        print("no studies" + (f" in state {args.state}" if args.state else ""))
        return 0
    print(f"{'STATE':<12} {'IMAGES':>6}  {'LAST IMAGE (UTC)':<19}  {'STUDY INSTANCE UID':<64}  STUDY RESULT / JOBS")
    for r in rows:
        print(f"{r.state:<12} {r.images:>6}  {_when(r.last_received_at):<19}  {r.study_instance_uid:<64}  {_finding(r)}")
        print(f"{'':<12} {'':>6}  jobs: {_counts(r)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    store = open_job_store(config)
    try:
        studies = StudyStore(store)
        rows = studies.summaries(limit=1, study_instance_uid=args.uid)
        if not rows:
            print(f"no image of study {args.uid} was received")
            return 1
        summary = rows[0]
        jobs = studies.study_jobs(args.uid)
        deliveries = studies.list_deliveries(summary.record.id) if summary.record is not None else []
    finally:
        store.close()
    if args.json:
        print_json({**_plain(summary), "jobs": [_plain(j) for j in jobs], "deliveries": [_plain(d) for d in deliveries]})
        return 0
    record = summary.record
    print(f"study:               {summary.study_instance_uid}")
    print(f"state:               {summary.state}" + (f" (quiet period {config.studies.quiet_period_s:g} s after the last image)" if summary.state == "open" else ""))
    print(f"images:              {summary.images} ({_counts(summary)})")
    print(f"first / last image:  {_when(summary.first_received_at)} / {_when(summary.last_received_at)} UTC")
    if record is not None and record.forced_at is not None:
        print(f"forced:              completion asked at {_when(record.forced_at)} UTC, waiting for the next round")
    result = _study_result(record)
    if record is not None and result is not None:
        print(f"study result:        revision {record.revision}, made {_when(record.completed_at)} UTC" + (" (forced)" if result.forced else ""))
        print(f"  finding:           {'fracture suspected' if result.fractured else 'no fracture detected'}")
        print(f"  probability:       {result.probability:.4f} by rule {result.rule} (threshold {result.threshold:.4g}; {result.rule_source})")
        print(f"  model:             {result.model_name} {result.model_version}")
        print(f"  study SR:          {result.sr_sop_instance_uid}  {result.sr}")
    else:
        print("study result:        none yet")
    print("images:")
    for job in jobs:
        try:
            r = job.job_result()
        except ResultFormatError as exc:
            r, unreadable = None, str(exc)
        else:
            unreadable = ""
        c = r.classification if r is not None else None
        if c is not None:
            what = f"{'fracture suspected' if c.fractured else 'no fracture'} (P={c.probability:.4f})"
        elif job.state.value == "skipped":
            what = f"skipped by rule {r.routing.rule if r is not None and r.routing is not None else None}"
        elif unreadable:
            what = unreadable[:100]
        else:
            what = job.last_error.splitlines()[0][:100] if job.last_error else "-"
        print(f"  job {job.id:>5}  {job.state.value:<8} {_when(job.received_at)}  {job.sop_instance_uid}  {what}")
    print(f"deliveries:          {len(deliveries) or 'none'}")
    for d in deliveries:
        print(
            f"  #{d.id} {d.destination}: {d.state.value}, {d.attempts} attempt(s), delivered {_when(d.delivered_at)}"
            + (f", error: {d.last_error}" if d.last_error else "")
        )
    return 0


def _cmd_complete(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    store = open_job_store(config)
    try:
        StudyStore(store).force(args.uid)
    finally:
        store.close()
    print(
        f"study {args.uid}: completion forced; the daemon makes its study result within "
        f"{config.studies.poll_interval_s:g} s from the images done by then"
    )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``studies list|show|complete``."""
    studies = subparsers.add_parser("studies", help="images grouped by study and the study results")
    sub = studies.add_subparsers(dest="studies_command", metavar="ACTION", required=True)

    p = sub.add_parser("list", help="list studies, most recent first")
    add_config_argument(p)
    p.add_argument("--state", choices=STATES, help="only studies in this state")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("show", help="one study: its images, study result and deliveries")
    add_config_argument(p)
    p.add_argument("uid", metavar="STUDY_INSTANCE_UID")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("complete", help="complete a study now, without waiting for its quiet period")
    add_config_argument(p)
    p.add_argument("uid", metavar="STUDY_INSTANCE_UID")
    p.set_defaults(func=_cmd_complete)
