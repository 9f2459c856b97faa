"""Scale-out on a real PostgreSQL server (started by tests/support/postgres.py in a temporary folder).

(a) The job store's claim (``FOR UPDATE SKIP LOCKED``) under a race: 100 jobs, 3 processes x 2 threads
    claiming concurrently, each job claimed exactly once.
(b) The deployment: one listener (``pacs-ai serve`` with ``[worker] enabled = false``) and two
    ``pacs-ai worker`` processes sharing the database and the spool; 100 images sent, every job
    processed exactly once.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from support.job_results import job_result
from support.postgres import postgres_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.postgres

JOBS = 100


def _enqueue(store, n: int, prefix: str = "1.2.826.0.1.3680043.10.1") -> list[int]:  # type: ignore[no-untyped-def]
    ids = []
    for i in range(n):
        outcome = store.enqueue(
            sop_instance_uid=f"{prefix}.{i}",
            study_instance_uid=f"{prefix}.1000",
            series_instance_uid=f"{prefix}.2000",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            calling_aet="TESTSCU",
            spool_path=f"/spool/{i}.dcm",
            sha256=f"{i:064x}",
            size=100,
        )
        ids.append(outcome.job_id)
    return ids


def _claimer(url: str, owner: str, start: threading.Barrier | None, out: list[int]) -> None:
    from pacs_ai.queue.jobstore import JobStore

    store = JobStore(url)  # the schema is in place: a plain open, as a second process would
    try:
        if start is not None:
            start.wait(30)
        while True:
            jobs = store.claim(owner, limit=3, lease_seconds=300)
            if not jobs:
                return
            for job in jobs:
                out.append(job.id)
                store.complete(job.id, owner, job_result({"routing": {"action": "analyse", "rule": owner, "reason": "claimed"}}), [])
    finally:
        store.close()


def _claim_process(url: str, name: str, threads: int) -> dict[str, list[int]]:
    """One process: ``threads`` threads, each with its own JobStore (own connections), claiming until empty."""
    results: dict[str, list[int]] = {f"{name}/t{i}": [] for i in range(threads)}
    barrier = threading.Barrier(threads)
    workers = [
        threading.Thread(target=_claimer, args=(url, owner, barrier, out)) for owner, out in results.items()
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    return results


def test_claim_race_claims_each_job_once(postgres_server):  # noqa: F811
    from pacs_ai.queue.jobstore import JobStore

    url = postgres_server.create_database("claim_race")
    store = JobStore(url, upgrade=True)
    try:
        ids = _enqueue(store, JOBS)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(3) as pool:
            parts = pool.starmap(_claim_process, [(url, f"p{i}", 2) for i in range(3)], chunksize=1)
        claims = {owner: ids_ for part in parts for owner, ids_ in part.items()}
        every = [job_id for got in claims.values() for job_id in got]
        duplicates = sum(n - 1 for n in Counter(every).values() if n > 1)
        print(f"claim race: {len(claims)} claimers, jobs per claimer "
              f"{sorted(len(v) for v in claims.values())}, duplicates {duplicates}")
        assert duplicates == 0
        assert sorted(every) == sorted(ids)
        assert store.counts()["done"] == JOBS
        jobs = store.list_jobs(limit=JOBS * 2)
        assert all(job.attempts == 1 for job in jobs)
        assert all(job.result["routing"]["rule"] in claims and job.id in claims[job.result["routing"]["rule"]] for job in jobs)
        assert sum(1 for v in claims.values() if v) >= 2  # the race really had several winners
    finally:
        store.close()


# ----------------------------------------------------------------------------------------------------
# (b) one listener + two `pacs-ai worker` processes on one PostgreSQL database and one spool
# ----------------------------------------------------------------------------------------------------

# Every claim and every completion is recorded by a trigger inside PostgreSQL, independently of the
# workers' own code and logs: the lease owner ("host:pid:worker") that took and finished each job.
_TRIGGER_SQL = """
CREATE TABLE test_claim_log (job_id integer NOT NULL, owner text, at timestamptz DEFAULT clock_timestamp());
CREATE TABLE test_done_log (job_id integer NOT NULL, owner text, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION test_log_job() RETURNS trigger AS $$
BEGIN
  IF NEW.state = 'running' AND NEW.lease_owner IS NOT NULL
     AND (OLD.state <> 'running' OR OLD.lease_owner IS DISTINCT FROM NEW.lease_owner) THEN
    INSERT INTO test_claim_log (job_id, owner) VALUES (NEW.id, NEW.lease_owner);
  END IF;
  IF NEW.state = 'done' AND OLD.state <> 'done' THEN
    INSERT INTO test_done_log (job_id, owner) VALUES (NEW.id, OLD.lease_owner);
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER test_jobs_log AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION test_log_job();
"""


def _worker_available() -> str:
    """Empty when `pacs-ai worker` can run here, else why not."""
    import importlib.util

    for module in ("pacs_ai.daemon.worker", "pacs_ai.infer.engine", "pacs_ai.write.results"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} does not exist yet"
        except ImportError as exc:
            return f"{module}: {exc}"
    return ""


def _wait_for_log(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{content[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not in {path} within {timeout:.0f} s:\n{path.read_text(errors='replace')[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scale_out_two_workers_one_listener(postgres_server, tmp_path):  # noqa: F811
    reason = _worker_available()
    if reason:
        pytest.skip(f"`pacs-ai worker` is not available: {reason}")
    import psycopg

    from pacs_ai.queue.jobstore import JobStore
    from support.bad_inputs.corpus import small_images
    from support.daemon_harness import Daemon, serve_command
    from support.model_factory import model_folder

    url = postgres_server.create_database("scale_out")
    JobStore(url, upgrade=True).close()  # creates the schema, so that the trigger can be installed before any job
    with psycopg.connect(postgres_server.dsn("scale_out"), autocommit=True) as conn:
        conn.execute(_TRIGGER_SQL)

    model = model_folder("resnet50", size=64)
    files = small_images(tmp_path / "images", JOBS, max_side=96)
    daemon = Daemon(
        tmp_path / "listener",
        model=model,
        overrides={"database": {"url": url}, "worker": {"enabled": False}, "model": {"batch_size": 4}},
    )
    workers: list[tuple[subprocess.Popen, Path]] = []
    try:
        daemon.start(timeout=180)
        # the workers share the listener's configuration: same database, same data_dir (spool, results)
        command = serve_command(daemon.config_path)
        command[command.index("serve")] = "worker"
        for i in range(2):
            log = tmp_path / f"worker{i}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            workers.append((proc, log))
        for proc, log in workers:
            _wait_for_log(log, "started (pid", proc, timeout=240)

        started = time.monotonic()
        sent = daemon.send(files)
        assert sent.accepted and all(s.ok for s in sent.sent), [s.error for s in sent.sent if not s.ok][:5]
        settled = daemon.wait_settled([s.sop_instance_uid for s in sent.sent], timeout=600, poll=1.0)
        elapsed = time.monotonic() - started
        states = Counter(str(job.state) if job else "missing" for job in settled.values())
        assert states == {"done": JOBS}, (states, [w[1].read_text()[-2000:] for w in workers])

        with psycopg.connect(postgres_server.dsn("scale_out")) as conn:
            done = conn.execute("SELECT job_id, owner FROM test_done_log").fetchall()
            claims = conn.execute("SELECT job_id, owner FROM test_claim_log").fetchall()
        per_owner = Counter(owner for _, owner in done)
        duplicates = len(done) - len({job_id for job_id, _ in done})
        reclaims = len(claims) - len({job_id for job_id, _ in claims})
        pids = {str(proc.pid) for proc, _ in workers}
        print(
            f"\nscale-out: {JOBS} images, 1 listener + 2 workers on PostgreSQL, settled in {elapsed:.1f} s; "
            f"jobs per worker {dict(per_owner)}; duplicates {duplicates}; re-claims {reclaims}"
        )
        assert duplicates == 0 and reclaims == 0
        assert len(done) == JOBS and {job.id for job in settled.values()} == {job_id for job_id, _ in done}
        assert {owner.split(":")[-2] for owner in per_owner} <= pids  # only the two workers processed jobs
        assert len(per_owner) == 2 and all(n > 0 for n in per_owner.values()), per_owner
        assert all(job.attempts == 1 for job in settled.values())
    finally:
        for proc, _ in workers:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in workers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        daemon.stop()
        daemon.close_store()
