"""The job store: enqueue/dedupe, atomic leased claims, backoff, dead letters, deliveries, purge, migrations."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from pacs_ai.errors import JobStoreError, LeaseLostError
from pacs_ai.queue import migrations
from pacs_ai.queue.jobstore import DeliveryState, JobState, JobStore, RetryPolicy
from pacs_ai.queue.models import jobs as jobs_table
from support.clock import Clock
from support.job_results import job_result


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'pacs-ai.db'}"


@pytest.fixture
def store(db_url: str, clock: Clock):  # type: ignore[no-untyped-def]
    s = JobStore(db_url, RetryPolicy(3, 10.0, 25.0), RetryPolicy(2, 5.0, 60.0), clock=clock, upgrade=True)
    yield s
    s.close()


def enqueue(store: JobStore, n: int, sha: str = "s", size: int = 10):  # type: ignore[no-untyped-def]
    return store.enqueue(
        sop_instance_uid=f"1.2.3.{n}",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.0",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        calling_aet="ROUTER",
        spool_path=f"/spool/1.2.3.{n}.dcm",
        sha256=f"{sha}{n}",
        size=size,
    )


def test_retry_policy_delay() -> None:
    p = RetryPolicy(5, 10.0, 60.0)
    assert [p.delay(a) for a in (1, 2, 3, 4, 5, 100)] == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]


def test_enqueue_duplicate_and_changed_content(store: JobStore, clock: Clock) -> None:
    first = enqueue(store, 1)
    assert first.created and not first.content_changed
    again = enqueue(store, 1)
    assert (again.job_id, again.created, again.content_changed) == (first.job_id, False, False)
    assert store.counts()["queued"] == 1

    (job,) = store.claim("w1")
    clock.advance(5)
    changed = enqueue(store, 1, sha="other", size=99)
    assert (changed.job_id, changed.created, changed.content_changed) == (first.job_id, False, True)
    job = store.get(first.job_id)
    assert (job.state, job.attempts, job.lease_owner, job.sha256, job.size) == (JobState.QUEUED, 0, None, "other1", 99)
    assert job.received_at == clock.now
    # The worker that held the old content lost its lease.
    with pytest.raises(LeaseLostError):
        store.complete(first.job_id, "w1", job_result(), ["pacs"])
    assert len(store.list_jobs()) == 1


def test_get_and_find(store: JobStore) -> None:
    job_id = enqueue(store, 7).job_id
    job = store.get(job_id)
    assert job.sop_instance_uid == "1.2.3.7" and job.state is JobState.QUEUED
    assert job.received_at.tzinfo is not None and job.received_at.utcoffset() == timedelta(0)
    assert store.find_by_sop_uid("1.2.3.7") == job
    assert store.find_by_sop_uid("9.9") is None
    with pytest.raises(JobStoreError, match="does not exist"):
        store.get(12345)


def test_claim_is_atomic_across_threads(db_url: str) -> None:
    JobStore(db_url, upgrade=True).close()
    setup = JobStore(db_url, upgrade=True)
    for n in range(150):
        enqueue(setup, n)
    claimed: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        store = JobStore(db_url)  # own engine and connections, like a separate process (no upgrade)
        try:
            while True:
                jobs = store.claim(name, limit=3)
                if not jobs:
                    return
                for job in jobs:
                    assert job.lease_owner == name and job.state is JobState.RUNNING
                with lock:
                    claimed.extend(j.id for j in jobs)
                for job in jobs:
                    store.complete(job.id, name, job_result(), [])
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    duplicates = [i for i, n in Counter(claimed).items() if n > 1]
    assert duplicates == []
    assert len(claimed) == 150
    assert setup.counts()["done"] == 150
    setup.close()


def test_expired_lease_is_claimed_again(store: JobStore, clock: Clock) -> None:
    job_id = enqueue(store, 1).job_id
    (job,) = store.claim("crashed", lease_seconds=60)
    assert job.lease_expires_at == clock.now + timedelta(seconds=60)
    assert store.claim("w2") == []
    clock.advance(61)
    (job,) = store.claim("w2", lease_seconds=60)
    assert (job.id, job.lease_owner, job.attempts) == (job_id, "w2", 2)
    with pytest.raises(LeaseLostError):
        store.complete(job_id, "crashed", job_result(), [])
    with pytest.raises(LeaseLostError):
        store.fail(job_id, "crashed", "boom")
    store.complete(job_id, "w2", job_result(), [])
    assert store.get(job_id).state is JobState.DONE


def test_lease_expiring_on_the_last_attempt_dead_letters(store: JobStore, clock: Clock) -> None:
    job_id = enqueue(store, 1).job_id
    for _ in range(3):  # max_attempts = 3: the worker "crashes" each time
        assert [j.id for j in store.claim("w", lease_seconds=10)] == [job_id]
        clock.advance(11)
    assert store.claim("w") == []
    job = store.get(job_id)
    assert job.state is JobState.DEAD and "lease expired" in (job.last_error or "")


def test_fail_backoff_then_dead(store: JobStore, clock: Clock) -> None:
    job_id = enqueue(store, 1).job_id
    store.claim("w")
    assert store.fail(job_id, "w", "model error") is JobState.FAILED
    job = store.get(job_id)
    assert job.next_attempt_at == clock.now + timedelta(seconds=10)
    assert job.last_error == "model error" and job.lease_owner is None
    assert store.claim("w") == []  # not yet due
    clock.advance(10)
    assert [j.id for j in store.claim("w")] == [job_id]
    assert store.fail(job_id, "w", "again") is JobState.FAILED
    assert store.get(job_id).next_attempt_at == clock.now + timedelta(seconds=20)
    clock.advance(19)
    assert store.claim("w") == []
    clock.advance(1)
    store.claim("w")
    assert store.fail(job_id, "w", "third") is JobState.DEAD
    job = store.get(job_id)
    assert (job.state, job.attempts, job.last_error, job.next_attempt_at) == (JobState.DEAD, 3, "third", None)
    clock.advance(10_000)
    assert store.claim("w") == []


def test_permanent_failure_is_dead_at_once(store: JobStore) -> None:
    job_id = enqueue(store, 1).job_id
    store.claim("w")
    assert store.fail(job_id, "w", "undecodable_pixel_data", permanent=True) is JobState.DEAD
    assert store.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0, "dead": 1, "skipped": 0}


def test_retry_and_retry_dead(store: JobStore) -> None:
    ids = [enqueue(store, n).job_id for n in range(3)]
    store.claim("w", limit=3)
    for job_id in ids:
        store.fail(job_id, "w", "bad", permanent=True)
    store.retry(ids[0])
    job = store.get(ids[0])
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    with pytest.raises(JobStoreError, match="only failed, dead or skipped"):
        store.retry(ids[0])
    with pytest.raises(JobStoreError, match="does not exist"):
        store.retry(999)
    assert store.retry_dead() == 2
    assert store.counts()["queued"] == 3


def test_release_does_not_count_an_attempt(store: JobStore) -> None:
    job_id = enqueue(store, 1).job_id
    store.claim("w")
    store.release(job_id, "w")
    job = store.get(job_id)
    assert (job.state, job.attempts, job.lease_owner) == (JobState.QUEUED, 0, None)
    with pytest.raises(LeaseLostError):
        store.release(job_id, "w")


def test_complete_creates_deliveries_and_they_flow(store: JobStore, clock: Clock) -> None:
    job_id = enqueue(store, 1).job_id
    other = enqueue(store, 2).job_id
    store.claim("w", limit=2)
    assert store.claim_deliveries("d") == []
    store.complete(job_id, "w", job_result({"probability": 0.91}), ["pacs", "archive", "pacs"])
    job = store.get(job_id)
    stored = job.job_result()
    assert job.state is JobState.DONE and stored is not None and stored.classification is not None
    assert stored.classification.probability == 0.91 and job.finished_at == clock.now
    assert [(d.destination, d.state) for d in store.list_deliveries(job_id)] == [
        ("pacs", DeliveryState.PENDING),
        ("archive", DeliveryState.PENDING),
    ]
    assert not store.all_delivered(job_id)
    pacs, archive = store.claim_deliveries("d", destination=None)
    assert store.claim_deliveries("d2") == []
    store.complete_delivery(pacs.id, "d")
    with pytest.raises(LeaseLostError):
        store.complete_delivery(archive.id, "someone-else")
    assert store.fail_delivery(archive.id, "d", "association rejected") is DeliveryState.FAILED
    assert store.delivery_counts() == {"pacs": {"done": 1}, "archive": {"failed": 1}}
    clock.advance(5)
    (again,) = store.claim_deliveries("d", destination="archive")
    assert store.fail_delivery(again.id, "d", "still down") is DeliveryState.DEAD  # max_attempts = 2
    store.retry_delivery(again.id)
    (again,) = store.claim_deliveries("d")
    store.complete_delivery(again.id, "d")
    assert store.all_delivered(job_id)
    assert store.all_delivered(other)  # no deliveries at all
    assert store.list_deliveries(state=DeliveryState.DONE) and store.retry_dead_deliveries() == 0


def test_complete_is_one_transaction(store: JobStore) -> None:
    job_id = enqueue(store, 1).job_id
    store.claim("w")
    with pytest.raises(JobStoreError):
        store.complete(job_id, "w", job_result(), ["pacs", None])  # type: ignore[list-item]
    job = store.get(job_id)
    assert (job.state, job.lease_owner) == (JobState.RUNNING, "w")
    assert store.list_deliveries(job_id) == []


def test_recompleting_a_changed_instance_resets_its_deliveries(store: JobStore) -> None:
    job_id = enqueue(store, 1).job_id
    store.claim("w")
    store.complete(job_id, "w", job_result(), ["pacs"])
    (d,) = store.claim_deliveries("d")
    store.complete_delivery(d.id, "d")
    enqueue(store, 1, sha="changed")
    assert store.claim_deliveries("d") == []
    store.claim("w")
    store.complete(job_id, "w", job_result(), ["pacs"])
    (d2,) = store.list_deliveries(job_id)
    assert (d2.id, d2.state, d2.attempts, d2.delivered_at) == (d.id, DeliveryState.PENDING, 0, None)


def test_purge(store: JobStore, clock: Clock) -> None:
    old_done, old_dead, old_undelivered, queued, new_done = (enqueue(store, n).job_id for n in range(5))
    store.claim("w", limit=5)
    store.complete(old_done, "w", job_result(), ["pacs"])
    (d,) = store.claim_deliveries("d")
    store.complete_delivery(d.id, "d")
    store.fail(old_dead, "w", "x", permanent=True)
    store.complete(old_undelivered, "w", job_result(), ["pacs"])
    store.release(queued, "w")
    clock.advance(40 * 86400)
    store.complete(new_done, "w", job_result(), [])
    purged = store.purge(timedelta(days=30))
    assert sorted(j.id for j in purged) == [old_done, old_dead]
    assert {j.spool_path for j in purged} == {"/spool/1.2.3.0.dcm", "/spool/1.2.3.1.dcm"}
    assert sorted(j.id for j in store.list_jobs()) == [old_undelivered, queued, new_done]
    assert store.list_deliveries(old_done) == []
    assert store.purge(timedelta(days=30)) == []


def test_listing_counts_and_oldest(store: JobStore, clock: Clock) -> None:
    assert store.oldest_queued() is None
    for n in range(4):
        enqueue(store, n)
        clock.advance(1)
    store.claim("w")
    assert [j.id for j in store.list_jobs(limit=2)] == [4, 3]
    assert [j.id for j in store.list_jobs(JobState.RUNNING)] == [1]
    oldest = store.oldest_queued()
    assert oldest is not None and oldest.id == 2
    assert store.counts()["queued"] == 3


def test_migrations_idempotent_on_reopen(db_url: str) -> None:
    store = JobStore(db_url, upgrade=True)
    assert store.schema_version == migrations.LATEST_VERSION
    enqueue(store, 1)
    store.close()
    for _ in range(2):
        store = JobStore(db_url, upgrade=True)
        assert store.find_by_sop_uid("1.2.3.1") is not None
        store.close()
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        versions = [r[0] for r in conn.execute(sa.text("SELECT version FROM schema_version ORDER BY version"))]
        mode = conn.execute(sa.text("PRAGMA journal_mode")).scalar()
    engine.dispose()
    assert versions == [m.version for m in migrations.MIGRATIONS]
    assert mode == "wal"


def test_newer_schema_is_refused(db_url: str) -> None:
    JobStore(db_url, upgrade=True).close()
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO schema_version (version, description, applied_at) VALUES (999, 'future', '2030-01-01')")
        )
    engine.dispose()
    with pytest.raises(JobStoreError, match="newer"):
        JobStore(db_url, upgrade=True)


def test_locked_database_raises_job_store_error(db_url: str) -> None:
    store = JobStore(db_url, busy_timeout_s=0.2, upgrade=True)
    holder = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(JobStoreError, match="locked"):
            enqueue(store, 1)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert enqueue(store, 1).created
    store.close()


def test_unusable_database_url() -> None:
    with pytest.raises(JobStoreError):
        JobStore("nosuchdialect://x", upgrade=True)


def test_postgresql_claim_uses_skip_locked(store: JobStore) -> None:
    store.db.dialect = "postgresql"  # only the query builder is exercised here, no server
    query = store.db.for_update(sa.select(jobs_table.c.id).limit(1), skip_locked=True)
    assert "FOR UPDATE SKIP LOCKED" in str(query.compile(dialect=postgresql.dialect()))
    store.db.dialect = "sqlite"


# -- pacs-ai jobs ----------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    """Run one ``pacs-ai jobs ...`` command through this module's parser only (not the whole CLI)."""
    import argparse

    from pacs_ai.cli import jobs as jobs_cli

    parser = argparse.ArgumentParser(prog="pacs-ai")
    jobs_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return int(args.func(args) or 0)


def test_jobs_cli_list_show_retry_purge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from pacs_ai.cli.jobs import parse_duration
    from pacs_ai.config import load_config

    cfg = tmp_path / "pacs-ai.toml"
    cfg.write_text('[storage]\ndata_dir = "data"\n[[destinations]]\nname = "pacs"\nae_title = "P"\nhost = "h"\nport = 1\n')
    config = load_config(cfg)
    store = JobStore(config.database_url, RetryPolicy(1, 1.0, 1.0), upgrade=True)
    spool = config.storage.spool
    ids = []
    for n in range(3):
        path = spool / "ab" / f"1.2.3.{n}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        ids.append(
            store.enqueue(
                sop_instance_uid=f"1.2.3.{n}", study_instance_uid="1", series_instance_uid="2",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_aet="ROUTER", spool_path=str(path),
                sha256=str(n), size=1,
            ).job_id
        )
    done, dead, queued = ids
    store.claim("w", limit=2)
    store.complete(done, "w", job_result({"probability": 0.2}), ["pacs"])
    store.fail(dead, "w", "undecodable_pixel_data: misplaced marker")
    (d,) = store.claim_deliveries("d")
    store.fail_delivery(d.id, "d", "refused", permanent=True)
    (config.storage.results / str(done)).mkdir(parents=True)
    (config.storage.results / str(done) / "sc.dcm").write_bytes(b"r")

    assert run_cli("jobs", "list", "--config", str(cfg), "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["id"], j["state"]) for j in listed] == [(queued, "queued"), (dead, "dead"), (done, "done")]
    assert run_cli("jobs", "list", "--config", str(cfg), "--state", "dead") == 0
    out = capsys.readouterr().out
    assert "1.2.3.1" in out and "misplaced marker" in out and "1.2.3.0" not in out
    assert run_cli("jobs", "list", "--config", str(cfg), "--limit", "2") == 0
    out = capsys.readouterr().out
    assert "1.2.3.2" in out and "1.2.3.1" in out and "1.2.3.0" not in out  # the newest two of three
    assert "newest 2 shown; there may be more" in out
    assert run_cli("jobs", "list", "--config", str(cfg), "--limit", "3") == 0
    assert "there may be more" in capsys.readouterr().out  # as many as the limit: it cannot know
    assert run_cli("jobs", "list", "--config", str(cfg), "--limit", "4") == 0
    assert "there may be more" not in capsys.readouterr().out

    assert run_cli("jobs", "show", str(done), "--config", str(cfg), "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["result"]["probability"] == 0.2
    assert [(x["destination"], x["state"]) for x in shown["deliveries"]] == [("pacs", "dead")]
    assert run_cli("jobs", "show", str(done), "--config", str(cfg)) == 0
    assert "pacs: dead" in capsys.readouterr().out

    assert run_cli("jobs", "retry", "--dead", "--deliveries", "--config", str(cfg)) == 0
    assert "re-queued 1 dead job(s)" in capsys.readouterr().out
    assert store.get(dead).state is JobState.QUEUED
    assert store.list_deliveries(done)[0].state is DeliveryState.PENDING
    with pytest.raises(JobStoreError, match="only failed, dead or skipped"):
        run_cli("jobs", "retry", str(queued), "--config", str(cfg))

    (d,) = store.claim_deliveries("d")
    store.complete_delivery(d.id, "d")
    assert parse_duration("30d") == timedelta(days=30) and parse_duration("90m") == timedelta(minutes=90)
    assert run_cli("jobs", "purge", "--older-than", "30d", "--config", str(cfg), "--json") == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == 0
    assert run_cli("jobs", "purge", "--older-than", "0s", "--config", str(cfg), "--json") == 0
    purged = json.loads(capsys.readouterr().out)
    assert (purged["job_ids"], purged["spool_files_removed"], purged["result_folders_removed"]) == ([done], 1, 1)
    assert not (spool / "ab" / "1.2.3.0.dcm").exists() and (spool / "ab" / "1.2.3.2.dcm").exists()
    assert not (config.storage.results / str(done)).exists()
    assert [j.id for j in store.list_jobs()] == [queued, dead]
    store.close()


def test_skipped_job_has_its_rule_and_no_delivery(store: JobStore) -> None:
    job_id = enqueue(store, 1).job_id
    store.claim("w")
    routing = {"action": "skip", "rule": "intended_use.body_part", "reason": "body part CHEST"}
    store.skip(job_id, "w", job_result({"routing": routing}))
    job = store.get(job_id)
    assert (job.state, job.result, job.lease_owner) == (JobState.SKIPPED, {"routing": routing}, None)
    assert job.finished_at is not None
    assert store.list_deliveries(job_id=job_id) == [] and store.claim("w") == []
    assert store.counts()["skipped"] == 1
    store.retry(job_id)  # after a rule change, an admin can have it analysed
    assert store.get(job_id).state is JobState.QUEUED


@pytest.mark.parametrize("argv", [("jobs", "list"), ("studies", "list"), ("shadow", "report")])
def test_admin_commands_do_not_create_a_database(argv: tuple[str, ...], tmp_path: Path) -> None:
    """Without the service's database (a forgotten --config), the admin commands say so and create nothing."""
    import subprocess
    import sys

    data = tmp_path / "data"
    cfg = tmp_path / "pacs-ai.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{data}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "pacs_ai", *argv, "--config", str(cfg)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "no database at" in done.stderr and "--config" in done.stderr
    assert not data.exists() and not (tmp_path / "pacs-ai-data").exists()


def test_retry_decision() -> None:
    """One decision for every leased item: backoff base * 2**(n-1) capped, dead when permanent or out of attempts."""
    from datetime import timedelta

    policy = RetryPolicy(3, 10.0, 25.0)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert policy.next_attempt_at(1, now) == now + timedelta(seconds=10)
    assert policy.next_attempt_at(2, now) == now + timedelta(seconds=20)
    assert policy.next_attempt_at(3, now) is None  # third attempt used: dead
    assert policy.next_attempt_at(1, now, permanent=True) is None
