"""Records and states of the job store: what a job or delivery row reads back as.

Rows become frozen dataclasses here (``job_from_row``, ``delivery_from_row``); states are string enums
whose values are what the database holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pacs_ai.results import JobResult

MAX_ERROR_CHARS = 2000


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    SKIPPED = "skipped"
    """Outside the routing rules: stored, not analysed, nothing sent (``result["routing"]`` names the rule)."""


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"


@dataclass(frozen=True)
class Job:
    id: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    calling_aet: str
    spool_path: str
    sha256: str
    size: int
    state: JobState
    attempts: int
    next_attempt_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    result: dict[str, Any] | None
    """The stored JSON of a ``pacs_ai.results.JobResult`` (``JobResult.to_json()``; read it typed with
    :meth:`job_result`), None before the job ended done or skipped."""
    received_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def job_result(self) -> JobResult | None:
        """The stored result as a :class:`pacs_ai.results.JobResult`, None when the job has none yet.

        Raises ResultFormatError when the stored document does not read as one.
        """
        return JobResult.read(self.result)


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    lease_owner: str | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    objects: dict[str, Any] | None = None
    """Per result object (``sc``, ``sr``): ``{"state", "at", "error", "sop_class_uid", ...}``; None before
    anything was recorded for one."""

    def delivered_objects(self) -> set[str]:
        """Keys of the objects this destination already stored (a retry sends only the others)."""
        return {k for k, v in (self.objects or {}).items() if isinstance(v, dict) and v.get("state") == "done"}


@dataclass(frozen=True)
class EnqueueOutcome:
    job_id: int
    created: bool
    content_changed: bool


_JOB_FIELDS = tuple(Job.__dataclass_fields__)
_DELIVERY_FIELDS = tuple(Delivery.__dataclass_fields__)


def job_from_row(row: Any) -> Job:
    """A ``jobs`` row (SQLAlchemy Row) as a :class:`Job`."""
    m = row._mapping
    values = {f: m[f] for f in _JOB_FIELDS}
    values["state"] = JobState(values["state"])
    return Job(**values)


def delivery_from_row(row: Any) -> Delivery:
    """A ``deliveries`` row (SQLAlchemy Row) as a :class:`Delivery`."""
    m = row._mapping
    values = {f: m[f] for f in _DELIVERY_FIELDS}
    values["state"] = DeliveryState(values["state"])
    return Delivery(**values)


def clip_error(text: str) -> str:
    """An error text cut to ``MAX_ERROR_CHARS`` characters (the stored ``last_error``)."""
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def merge_objects(
    recorded: dict[str, Any] | None, outcomes: dict[str, dict[str, Any]], now: datetime, *, dead: bool, reason: str = ""
) -> dict[str, Any] | None:
    """Per-object delivery state after an attempt: stored objects ``done`` (with as what they went), the
    others ``failed`` or ``dead`` with their error; an object done earlier stays done. None if nothing."""
    merged = dict(recorded or {})
    for key, info in outcomes.items():
        if isinstance(merged.get(key), dict) and merged[key].get("state") == "done":
            continue
        details = {k: v for k, v in info.items() if k not in ("stored", "permanent", "state", "error")}
        if info.get("stored", True):
            merged[key] = {**details, "state": "done", "at": now.isoformat()}
        else:
            object_dead = dead or bool(info.get("permanent"))
            error = clip_error(str(info.get("error") or reason))
            merged[key] = {**details, "state": "dead" if object_dead else "failed", "error": error, "at": now.isoformat()}
    return merged or None
