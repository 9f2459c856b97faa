"""What the dashboard shows, read from the job store, the configuration and the model cards.

``take_snapshot(jobs, config, ...)`` returns a :class:`Snapshot` (frozen records, ready for a template).
It only reads: the job store's public API (``counts``, ``finished_counts``, ``oldest_queued``,
``list_jobs``, ``list_deliveries``, ``delivery_counts``), the results folder (whether a job has its
``overlay.png``) and, only when ``show_phi`` is true, the header of each listed job's spooled DICOM file
(patient name and ID). Without ``show_phi`` no patient name, patient ID or DICOM UID reaches a record:
error texts are passed through the log PHI filter (:func:`pacs_ai.ops.logging_setup.redact_text`) and
the job's own UIDs in them are replaced by ``[UID]``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pacs_ai.config import Config, Destination
from pacs_ai.errors import PacsAiError, ResultFormatError
from pacs_ai.ops.logging_setup import redact_text
from pacs_ai.queue.jobstore import Delivery, DeliveryState, Job, JobState, JobStore
from pacs_ai.results import JobResult
from pacs_ai.send.deliveries import OUTBOX

__all__ = [
    "DELIVERY_STATES",
    "DeliveryRow",
    "DestinationRow",
    "JobRow",
    "ModelRow",
    "Patient",
    "Snapshot",
    "load_models",
    "overlay_path",
    "take_snapshot",
]

DELIVERY_STATES = tuple(s.value for s in DeliveryState)
THROUGHPUT_WINDOWS = (("5 min", timedelta(minutes=5)), ("1 h", timedelta(hours=1)), ("24 h", timedelta(days=1)))
UID_MASK = "[UID]"


@dataclass(frozen=True)
class Patient:
    """Identifying data of a job's image (only built when ``show_phi`` is allowed)."""

    name: str
    patient_id: str
    study_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class JobRow:
    """One job as a line of the page. Times are UTC; ``timings_ms`` holds the worker's per-image
    ``preprocess``, ``forward`` and ``cam`` milliseconds; ``wait_s`` is receipt to claim, ``run_s``
    claim to result."""

    id: int
    state: str
    attempts: int
    received_at: datetime
    finished_at: datetime | None
    calling_aet: str
    probability: float | None
    fractured: bool | None
    threshold: float | None
    model: str
    timings_ms: Mapping[str, float]
    wait_s: float | None
    run_s: float | None
    has_overlay: bool
    error: str
    skip_reason: str
    patient: Patient | None


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    job_id: int
    destination: str
    state: str
    attempts: int
    error: str
    created_at: datetime


@dataclass(frozen=True)
class DestinationRow:
    """Deliveries to one destination per state; ``address`` is ``AE@host:port``, the outbox folder when
    no destination is configured, or empty for a destination no longer configured."""

    name: str
    address: str
    configured: bool
    counts: Mapping[str, int]


@dataclass(frozen=True)
class ModelRow:
    """A model card as shown: ``card`` is its ``model.json`` content, or None with ``error``."""

    path: str
    card: Mapping[str, Any] | None
    error: str = ""


@dataclass(frozen=True)
class Snapshot:
    generated_at: datetime
    counts: Mapping[str, int]
    oldest_waiting_s: float | None
    throughput: Sequence[tuple[str, Mapping[str, int]]]
    recent: Sequence[JobRow]
    dead_jobs: Sequence[JobRow]
    dead_deliveries: Sequence[DeliveryRow]
    destinations: Sequence[DestinationRow]
    models: Sequence[ModelRow]
    show_phi: bool

    @property
    def waiting(self) -> int:
        """Jobs not yet processed: queued, or failed and waiting for their retry."""
        return self.counts.get(JobState.QUEUED.value, 0) + self.counts.get(JobState.FAILED.value, 0)

    @property
    def per_minute(self) -> float:
        """Jobs finished per minute over the last 5 minutes."""
        window = dict(self.throughput).get("5 min", {})
        return sum(window.values()) / 5.0


def overlay_path(config: Config, job_id: int) -> Path:
    """Where the worker writes a job's heat-map overlay PNG: ``<results>/<job id>/overlay.png``."""
    return config.storage.results / str(int(job_id)) / "overlay.png"


def load_models(paths: Sequence[Path]) -> list[ModelRow]:
    """Each model folder's card, read once (the daemon loads its models at start) as plain JSON: the
    serving process does not import torch; the worker validates the card when it loads the model."""
    rows = []
    for path in paths:
        card_path = Path(path) / "model.json"
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            if not isinstance(card, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in ("name", "version", "architecture") if not isinstance(card.get(k), str)]
            if missing:
                raise ValueError(f"no {missing[0]}")
            if not isinstance(card.get("threshold", 0.5), (int, float)):
                raise ValueError("threshold is not a number")
            for key in ("input", "training", "metrics"):
                if not isinstance(card.get(key, {}), dict):
                    raise ValueError(f"{key} is not an object")
            rows.append(ModelRow(str(path), card))
        except (OSError, ValueError) as exc:
            rows.append(ModelRow(str(path), None, f"cannot read the model card {card_path}: {exc}"))
    return rows


def _patient(job: Job) -> Patient:
    import pydicom

    name = patient_id = ""
    try:
        ds = pydicom.dcmread(job.spool_path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
        name, patient_id = str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")
    except Exception:  # noqa: BLE001 - gone (purged) or unreadable: shown as unknown
        pass
    return Patient(name, patient_id, job.study_instance_uid, job.sop_instance_uid)


def _error(text: str | None, uids: Sequence[str], show_phi: bool) -> str:
    text = (text or "").strip()
    if show_phi or not text:
        return text
    text = redact_text(text)
    for uid in uids:
        if uid:
            text = text.replace(uid, UID_MASK)
    return text


def _skip_reason(result: JobResult | None, uids: Sequence[str], show_phi: bool) -> str:
    """``rule: reason`` of a job the routing rules skipped (its result's ``routing``)."""
    routing = result.routing if result is not None else None
    text = ": ".join(v for v in ((routing.rule, routing.reason) if routing is not None else ()) if v)
    return _error(text, uids, show_phi)


def _job_row(job: Job, config: Config, show_phi: bool) -> JobRow:
    try:
        result = job.job_result()
    except ResultFormatError:
        result = None
    c = result.classification if result is not None else None
    timings = result.timings if result is not None else {}
    uids = (job.sop_instance_uid, job.study_instance_uid, job.series_instance_uid)

    def seconds(a: datetime | None, b: datetime | None) -> float | None:
        return (b - a).total_seconds() if a is not None and b is not None else None

    model = " ".join(v for v in ((c.model_name, c.model_version) if c is not None else ()) if v)
    return JobRow(
        id=job.id,
        state=job.state.value,
        attempts=job.attempts,
        received_at=job.received_at,
        finished_at=job.finished_at,
        calling_aet=job.calling_aet,
        probability=c.probability if c is not None else None,
        fractured=c.fractured if c is not None else None,
        threshold=c.threshold if c is not None else None,
        model=model,
        timings_ms={k: 1000.0 * float(v) for k, v in timings.items()},
        wait_s=seconds(job.received_at, job.started_at),
        run_s=seconds(job.started_at, job.finished_at) if job.state == JobState.DONE else None,
        has_overlay=job.state == JobState.DONE and overlay_path(config, job.id).is_file(),
        error=_error(job.last_error, uids, show_phi),
        skip_reason=_skip_reason(result, uids, show_phi) if job.state == JobState.SKIPPED else "",
        patient=_patient(job) if show_phi else None,
    )


def _delivery_row(d: Delivery, jobs_by_id: Mapping[int, Job], show_phi: bool) -> DeliveryRow:
    job = jobs_by_id.get(d.job_id)
    uids = (job.sop_instance_uid, job.study_instance_uid, job.series_instance_uid) if job else ()
    return DeliveryRow(d.id, d.job_id, d.destination, d.state.value, d.attempts, _error(d.last_error, uids, show_phi), d.created_at)


def _address(dest: Destination) -> str:
    return f"{dest.ae_title}@{dest.host}:{dest.port}" + (" (TLS)" if dest.tls else "")


def take_snapshot(
    jobs: JobStore,
    config: Config,
    models: Sequence[ModelRow],
    *,
    show_phi: bool = False,
    recent: int | None = None,
) -> Snapshot:
    """Read everything the page shows (raises JobStoreError when the database cannot be read)."""
    now = jobs.now()
    limit = recent or config.dashboard.recent_jobs
    counts = jobs.counts()
    oldest = jobs.oldest_queued()
    throughput = [(label, jobs.finished_counts(now - span)) for label, span in THROUGHPUT_WINDOWS]
    recent_jobs = jobs.list_jobs(limit=limit)
    dead_jobs = jobs.list_jobs(JobState.DEAD, limit=limit)
    dead_deliveries = jobs.list_deliveries(state=DeliveryState.DEAD, limit=limit)
    owners = {j.id: j for j in [*recent_jobs, *dead_jobs]}
    for d in dead_deliveries:
        if d.job_id not in owners:
            with contextlib.suppress(PacsAiError):
                owners[d.job_id] = jobs.get(d.job_id)
    delivery_counts = jobs.delivery_counts()
    configured = {d.name: _address(d) for d in config.destinations} or {OUTBOX: f"folder {config.storage.outbox}"}
    destinations = [
        DestinationRow(
            name,
            configured.get(name, ""),
            name in configured,
            {state: delivery_counts.get(name, {}).get(state, 0) for state in DELIVERY_STATES},
        )
        for name in [*configured, *sorted(set(delivery_counts) - set(configured))]
    ]
    return Snapshot(
        generated_at=now,
        counts=counts,
        oldest_waiting_s=(now - oldest.received_at).total_seconds() if oldest is not None else None,
        throughput=throughput,
        recent=[_job_row(j, config, show_phi) for j in recent_jobs],
        dead_jobs=[_job_row(j, config, show_phi) for j in dead_jobs],
        dead_deliveries=[_delivery_row(d, owners, show_phi) for d in reversed(dead_deliveries)],
        destinations=destinations,
        models=list(models),
        show_phi=show_phi,
    )
