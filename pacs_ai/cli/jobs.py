"""pacs-ai jobs: list, show, retry and purge jobs in the job store."""

from __future__ import annotations

import argparse
import dataclasses
import re
from datetime import timedelta
from typing import Any

from pacs_ai.cli.common import add_config_argument, config_from_args, print_json
from pacs_ai.errors import ResultFormatError
from pacs_ai.queue.jobstore import DeliveryState, Job, JobState, open_job_store
from pacs_ai.queue.retention import purge_old_jobs
from pacs_ai.results import RoutingOutcome

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (argparse type)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h, 90m, got {text!r}")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _as_dict(obj: Any) -> dict[str, Any]:
    data = dataclasses.asdict(obj)
    for key, value in data.items():
        if hasattr(value, "isoformat"):
            data[key] = value.isoformat()
        elif isinstance(value, (JobState, DeliveryState)):
            data[key] = value.value
    return data


def _routing(job: Job) -> RoutingOutcome | None:
    """The routing outcome stored with ``job`` (None when none, or its result is unreadable)."""
    try:
        result = job.job_result()
    except ResultFormatError:
        return None
    return result.routing if result is not None else None


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _cmd_list(args: argparse.Namespace) -> int:
    store = open_job_store(config_from_args(args))
    try:
        if args.study:
            from pacs_ai.studies.store import StudyStore

            jobs = [j for j in StudyStore(store).study_jobs(args.study) if args.state is None or j.state == args.state]
        else:
            jobs = store.list_jobs(args.state, args.limit)
    finally:
        store.close()
    if args.json:
        print_json([_as_dict(j) for j in jobs])
        return 0
    if not jobs:
        print("no jobs" + (f" in state {args.state}" if args.state else ""))
        return 0
    print(f"{'ID':>6}  {'STATE':<8} {'TRIES':>5}  {'RECEIVED (UTC)':<19}  {'FROM':<16} SOP INSTANCE UID / LAST ERROR")
    for j in jobs:
        print(
            f"{j.id:>6}  {j.state.value:<8} {j.attempts:>5}  {_when(j.received_at):<19}  "
            f"{j.calling_aet:<16} {j.sop_instance_uid}"
        )
        if j.last_error and j.state in (JobState.FAILED, JobState.DEAD):
            print(f"{'':>6}  error: {j.last_error.splitlines()[0][:150]}")
        routing = _routing(j)
        if j.state == JobState.SKIPPED and routing is not None:
            print(f"{'':>6}  skipped by rule {routing.rule}: {routing.reason[:150]}")
    if not args.study and len(jobs) == args.limit:
        print(f"(the newest {args.limit} shown; there may be more: --limit N, or --state STATE)")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    store = open_job_store(config_from_args(args))
    try:
        job = store.get(args.id)
        deliveries = store.list_deliveries(job_id=job.id, limit=10_000)
    finally:
        store.close()
    if args.json:
        print_json({**_as_dict(job), "deliveries": [_as_dict(d) for d in deliveries]})
        return 0
    for field in dataclasses.fields(job):
        value = getattr(job, field.name)
        if field.name == "result" and value is not None:
            continue
        if hasattr(value, "isoformat"):
            value = _when(value)
        elif isinstance(value, JobState):
            value = value.value
        print(f"{field.name + ':':<21}{'-' if value is None else value}")
    if job.result is not None:
        print("result:")
        for key, value in sorted(job.result.items()):
            print(f"  {key}: {value}")
    print(f"deliveries:          {len(deliveries) or 'none'}")
    for d in deliveries:
        print(
            f"  #{d.id} {d.destination}: {d.state.value}, {d.attempts} attempt(s), "
            f"delivered {_when(d.delivered_at)}" + (f", error: {d.last_error}" if d.last_error else "")
        )
        for line in object_lines(d.objects):
            print(f"      {line}")
    return 0


_SOP_CLASS_NAMES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
}
_TS_NAMES = {"1.2.840.10008.1.2": "Implicit VR LE", "1.2.840.10008.1.2.1": "Explicit VR LE"}


def object_lines(objects: dict[str, Any] | None) -> list[str]:
    """One line per result object of a delivery: ``sc: delivered as Secondary Capture (Implicit VR LE)``,
    ``sr: refused for good: <reason>``, ``sr: not delivered yet (will retry): <reason>``."""
    lines = []
    for key, info in sorted((objects or {}).items()):
        if not isinstance(info, dict):
            continue
        state = info.get("state")
        if state == "done":
            what = _SOP_CLASS_NAMES.get(str(info.get("sop_class_uid")), str(info.get("sop_class_uid", "?")))
            ts = _TS_NAMES.get(str(info.get("transfer_syntax_uid")), str(info.get("transfer_syntax_uid", "?")))
            lines.append(f"{key}: delivered as {what} ({ts}) at {str(info.get('at', '-'))[:19].replace('T', ' ')}")
        elif state == "dead":
            lines.append(f"{key}: refused for good: {info.get('error', '')}")
        else:
            lines.append(f"{key}: not delivered yet (will retry): {info.get('error', '')}")
    return lines


def _cmd_retry(args: argparse.Namespace) -> int:
    if args.id is None and not args.dead:
        args.retry_parser.error("give a job ID or --dead")
    store = open_job_store(config_from_args(args))
    try:
        if args.dead:
            n = store.retry_dead()
            print(f"re-queued {n} dead job(s)")
            if args.deliveries:
                print(f"re-queued {store.retry_dead_deliveries()} dead delivery(ies)")
            return 0
        job = store.get(args.id)
        if args.deliveries:
            again = [
                d
                for d in store.list_deliveries(job_id=job.id, limit=10_000)
                if d.state in (DeliveryState.FAILED, DeliveryState.DEAD)
            ]
            for d in again:
                store.retry_delivery(d.id)
            print(f"job {job.id}: re-queued {len(again)} failed or dead delivery(ies)")
            if job.state not in (JobState.FAILED, JobState.DEAD):
                return 0
        store.retry(job.id)
        print(f"job {job.id}: re-queued (was {job.state.value})")
        return 0
    finally:
        store.close()


def _cmd_purge(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    store = open_job_store(config)
    try:
        report = purge_old_jobs(
            store, args.older_than, spool_dir=config.storage.spool, results_dir=config.storage.results
        )
    finally:
        store.close()
    if args.json:
        print_json(report.to_json())
    else:
        print(
            f"purged {len(report.job_ids)} job(s) finished more than {args.older_than} ago: "
            f"{report.spool_files_removed} spool file(s), {report.result_folders_removed} result folder(s) removed"
        )
        for problem in report.errors:
            print(f"  could not remove files of {problem}")
    return 1 if report.errors else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``jobs list|show|retry|purge``."""
    jobs = subparsers.add_parser("jobs", help="inspect and manage the job queue")
    sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)

    p = sub.add_parser("list", help="list jobs, newest first")
    add_config_argument(p)
    p.add_argument("--state", type=JobState, choices=list(JobState), help="only jobs in this state")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--study", metavar="STUDY_INSTANCE_UID", help="only the jobs of this study (see pacs-ai studies)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("show", help="show one job and its deliveries")
    add_config_argument(p)
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("retry", help="queue a failed, dead or skipped job again (or all dead ones)")
    add_config_argument(p)
    p.add_argument("id", type=int, nargs="?", metavar="ID")
    p.add_argument("--dead", action="store_true", help="re-queue every dead job")
    p.add_argument(
        "--deliveries",
        action="store_true",
        help="also re-send failed/dead deliveries (of job ID, or every dead one with --dead)",
    )
    p.set_defaults(func=_cmd_retry, retry_parser=p)

    p = sub.add_parser("purge", help="delete old done/dead jobs with their spool and result files")
    add_config_argument(p)
    p.add_argument("--older-than", type=parse_duration, required=True, metavar="AGE", help="e.g. 30d, 12h")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_purge)

