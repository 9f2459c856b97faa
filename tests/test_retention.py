"""Retention (``pacs_ai.queue.retention.purge_old_jobs``), used by the service and by ``pacs-ai jobs purge``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pacs_ai.queue.jobstore import JobState, JobStore, RetryPolicy
from pacs_ai.queue.retention import purge_old_jobs
from support.job_results import job_result


def _job(store: JobStore, n: int, spool_path: Path) -> int:
    spool_path.parent.mkdir(parents=True, exist_ok=True)
    spool_path.write_bytes(b"image")
    return store.enqueue(
        sop_instance_uid=f"1.2.3.{n}", study_instance_uid="1", series_instance_uid="2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_aet="MOD", spool_path=str(spool_path),
        sha256=str(n), size=5,
    ).job_id


def test_purge_removes_old_jobs_files_only_under_the_configured_folders(tmp_path: Path) -> None:
    spool, results, elsewhere = tmp_path / "spool", tmp_path / "results", tmp_path / "elsewhere"
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", RetryPolicy(1, 0.0, 0.0), RetryPolicy(1, 0.0, 0.0), upgrade=True)
    try:
        inside = _job(store, 0, spool / "a" / "1.2.3.0.dcm")
        outside = _job(store, 1, elsewhere / "1.2.3.1.dcm")  # a row naming a file outside the spool
        pending = _job(store, 2, spool / "a" / "1.2.3.2.dcm")  # done, but its delivery is still pending
        queued = _job(store, 3, spool / "a" / "1.2.3.3.dcm")
        claimed = {j.id for j in store.claim("w", limit=3)}
        assert claimed == {inside, outside, pending}
        store.complete(inside, "w", job_result({"routing": {"action": "skip", "rule": "r", "reason": "x"}}), [])
        store.fail(outside, "w", "unreadable_dicom: no", permanent=True)
        store.complete(pending, "w", job_result(), ["pacs"])
        for job_id in (inside, outside, pending):
            (results / str(job_id)).mkdir(parents=True)
            (results / str(job_id) / "sc.dcm").write_bytes(b"r")

        assert purge_old_jobs(store, timedelta(days=1), spool_dir=spool, results_dir=results).job_ids == ()
        report = purge_old_jobs(store, timedelta(0), spool_dir=spool, results_dir=results)
        assert sorted(report.job_ids) == sorted([inside, outside])
        assert (report.spool_files_removed, report.result_folders_removed, report.errors) == (1, 2, ())
        assert not (spool / "a" / "1.2.3.0.dcm").exists() and (elsewhere / "1.2.3.1.dcm").exists()
        assert not (results / str(inside)).exists() and not (results / str(outside)).exists()
        assert (results / str(pending)).exists() and (spool / "a" / "1.2.3.2.dcm").exists()
        assert {j.id: j.state for j in store.list_jobs()} == {pending: JobState.DONE, queued: JobState.QUEUED}
    finally:
        store.close()
