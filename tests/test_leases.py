"""The leased state machine that jobs, deliveries and study deliveries share (pacs_ai/queue/leases.py).

Each kind is driven through the same path against a real SQLite store with a test clock: claim, heartbeat,
expiry and re-claim, expiry on the last attempt (dead), failure with backoff, admin retry. Expected times
are the clock's values plus the seconds given here; attempts are counted by hand.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pacs_ai.errors import JobStoreError, LeaseLostError
from pacs_ai.queue.jobstore import DeliveryState, JobState, JobStore, RetryPolicy
from pacs_ai.studies.store import StudyStore
from support.clock import Clock
from support.job_results import job_result


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 3, 1, 8, 0, tzinfo=UTC))


@pytest.fixture
def store(tmp_path: Path, clock: Clock):  # type: ignore[no-untyped-def]
    s = JobStore(f"sqlite:///{tmp_path / 'pacs-ai.db'}", RetryPolicy(2, 10.0, 60.0), RetryPolicy(2, 10.0, 60.0), clock=clock, upgrade=True)
    yield s
    s.close()


def _done_job(store: JobStore, n: int, destinations: list[str]) -> int:
    job_id = store.enqueue(
        sop_instance_uid=f"2.25.{n}", study_instance_uid="2.25.7", series_instance_uid="2.25.8",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_aet="MODALITY", spool_path=f"/spool/{n}.dcm",
        sha256=f"{n:064d}", size=1,
    ).job_id
    [job] = store.claim("w", lease_seconds=60)
    store.complete(job.id, "w", job_result({"probability": 0.5}), destinations)
    return job_id


class Kind:
    """Claim / extend / fail / retry through one of the three public APIs."""

    def __init__(self, name: str, store: JobStore) -> None:
        self.name = name
        self.store = store
        self.studies = StudyStore(store)
        if name == "job":
            store.enqueue(
                sop_instance_uid="2.25.1", study_instance_uid="2.25.7", series_instance_uid="2.25.8",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_aet="MODALITY", spool_path="/spool/1.dcm",
                sha256="a" * 64, size=1,
            )
        elif name == "delivery":
            _done_job(store, 1, ["pacs"])
        else:
            _done_job(store, 1, [])
            self.studies.record("2.25.7", {"probability": 0.5}, store.now(), 1, ["pacs"])

    def claim(self, owner: str, lease_seconds: float) -> list[int]:
        if self.name == "job":
            return [j.id for j in self.store.claim(owner, lease_seconds=lease_seconds)]
        if self.name == "delivery":
            return [d.id for d in self.store.claim_deliveries(owner, lease_seconds=lease_seconds)]
        return [d.id for d in self.studies.claim_deliveries(owner, lease_seconds=lease_seconds)]

    def row(self, row_id: int):  # type: ignore[no-untyped-def]
        if self.name == "job":
            return self.store.get(row_id)
        if self.name == "delivery":
            return self.store.list_deliveries()[0]
        return self.studies.list_deliveries(1)[0]

    def extend(self, row_id: int, owner: str, lease_seconds: float) -> datetime:
        if self.name == "job":
            return self.store.extend_lease(row_id, owner, lease_seconds)
        if self.name == "delivery":
            return self.store.extend_delivery_lease(row_id, owner, lease_seconds)
        return self.studies.extend_delivery_lease(row_id, owner, lease_seconds)

    def fail(self, row_id: int, owner: str) -> str:
        if self.name == "job":
            return str(self.store.fail(row_id, owner, "boom"))
        if self.name == "delivery":
            return str(self.store.fail_delivery(row_id, owner, "boom"))
        return str(self.studies.fail_delivery(row_id, owner, "boom"))


LEASED = {"job": JobState.RUNNING.value, "delivery": DeliveryState.SENDING.value, "study": DeliveryState.SENDING.value}


@pytest.mark.parametrize("name", ["job", "delivery", "study"])
def test_heartbeat_expiry_and_dead_on_last_attempt(name: str, store: JobStore, clock: Clock) -> None:
    kind = Kind(name, store)
    [row_id] = kind.claim("a", lease_seconds=30)
    clock.advance(20)
    # Heartbeat: the lease now ends 30 s after the heartbeat, not after the claim.
    assert kind.extend(row_id, "a", 30) == clock.now + timedelta(seconds=30)
    clock.advance(20)  # 40 s after the claim: expired without the heartbeat, held with it
    assert kind.claim("b", lease_seconds=30) == []
    with pytest.raises(LeaseLostError):
        kind.extend(row_id, "b", 30)
    clock.advance(11)  # past the extended lease: claimable again, attempt 2 of 2
    assert kind.claim("b", lease_seconds=30) == [row_id]
    row = kind.row(row_id)
    assert (str(row.state), row.attempts, row.lease_owner) == (LEASED[name], 2, "b")
    with pytest.raises(LeaseLostError):  # "a" lost it
        kind.extend(row_id, "a", 30)
    clock.advance(31)  # the lease expires on the last attempt: dead, not claimed a third time
    assert kind.claim("c", lease_seconds=30) == []
    row = kind.row(row_id)
    assert str(row.state) == "dead" and row.lease_owner is None
    assert "gave up after 2 attempts: the lease expired" in (row.last_error or "")


@pytest.mark.parametrize("name", ["job", "delivery", "study"])
def test_failure_backs_off_then_dies(name: str, store: JobStore, clock: Clock) -> None:
    kind = Kind(name, store)
    [row_id] = kind.claim("a", lease_seconds=30)
    assert kind.fail(row_id, "a") == "failed"
    row = kind.row(row_id)
    assert row.next_attempt_at == clock.now + timedelta(seconds=10)  # backoff_base_s * 2**0
    clock.advance(9)
    assert kind.claim("a", lease_seconds=30) == []
    clock.advance(1)
    assert kind.claim("a", lease_seconds=30) == [row_id]
    assert kind.fail(row_id, "a") == "dead"  # max_attempts = 2
    assert kind.row(row_id).next_attempt_at is None
    with pytest.raises(LeaseLostError):
        kind.fail(row_id, "a")


def test_extend_unknown_row(store: JobStore) -> None:
    with pytest.raises(JobStoreError, match="job 99 does not exist"):
        store.extend_lease(99, "a", 30)
