"""Study grouping and study results against a real SQLite job store and real DICOM files.

The per-image results are set by hand (they are the input here, not what is tested); the expected study
probabilities are worked out by hand from the rule definitions (max, mean, noisy-or).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from pacs_ai.infer.model_card import load_card
from pacs_ai.queue.jobstore import JobState, JobStore, RetryPolicy
from pacs_ai.studies.processor import StudyPolicy, StudyProcessor, study_policy
from pacs_ai.studies.report import read_study_report
from pacs_ai.studies.rules import aggregate
from pacs_ai.studies.store import StudyStore
from support.clock import Clock
from support.common import copies, expected_result_uid, have_tool
from support.job_results import job_result

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "cr_hip_mono2_small.dcm"
QUIET = 60.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jobs(tmp_path: Path, clock: Clock):  # type: ignore[no-untyped-def]
    store = JobStore(f"sqlite:///{tmp_path / 'pacs-ai.db'}", RetryPolicy(3, 1.0, 5.0), RetryPolicy(3, 1.0, 5.0), clock=clock, upgrade=True)
    yield store
    store.close()


def receive(jobs: JobStore, path: Path) -> int:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return jobs.enqueue(
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        calling_aet="ROUTER",
        spool_path=str(path),
        sha256=ds.SOPInstanceUID,
        size=path.stat().st_size,
    ).job_id


def finish(jobs: JobStore, job_id: int, probability: float, threshold: float = 0.3) -> None:
    claimed = jobs.claim("w", limit=100)
    assert job_id in [j.id for j in claimed]
    result = {
        "probability": probability, "fractured": probability >= threshold, "threshold": threshold,
        "model_name": "test-model", "model_version": "9.9", "architecture": "resnet50",
    }
    jobs.complete(job_id, "w", job_result(result), ["pacs"])
    for other in claimed:
        if other.id != job_id:
            jobs.release(other.id, "w")


def processor(jobs: JobStore, tmp_path: Path, rule: str = "max", threshold: float = 0.3) -> StudyProcessor:
    return StudyProcessor(StudyStore(jobs), tmp_path / "results", ["pacs"], StudyPolicy(rule, threshold, "test"), quiet_period_s=QUIET)


def test_quiet_period_then_one_study_result_then_replaced(jobs: JobStore, clock: Clock, tmp_path: Path) -> None:
    files = copies(SAMPLE, tmp_path / "in", 4)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    proc, studies = processor(jobs, tmp_path), StudyStore(jobs)
    ids = [receive(jobs, f) for f in files[:3]]
    finish(jobs, ids[0], 0.10)
    finish(jobs, ids[1], 0.45)
    clock.advance(QUIET + 1)
    assert studies.due(QUIET) == []  # image 3 is still queued
    finish(jobs, ids[2], 0.20)
    assert studies.due(QUIET) == [study_uid]  # the last image came in more than QUIET ago
    assert proc.run_once() == 1 and studies.due(QUIET) == []
    record = studies.get(study_uid)
    assert record is not None and record.revision == 1
    assert (record.result["probability"], record.result["fractured"]) == (0.45, True)
    sr = pydicom.dcmread(record.result["files"]["sr"])
    assert sr.SOPInstanceUID == expected_result_uid(study_uid, "9.9", "study-sr") and sr.InstanceNumber == 1
    source = pydicom.dcmread(SAMPLE, stop_before_pixels=True)
    assert (sr.PatientID, str(sr.PatientName), sr.StudyInstanceUID) == (source.PatientID, str(source.PatientName), study_uid)
    groups = read_study_report(sr)
    sops = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    assert [(g.fractured, g.probability, g.source_sop_instance_uids) for g in groups] == [
        (True, 0.45, tuple(sops[:3])),
        (False, 0.10, (sops[0],)),
        (True, 0.45, (sops[1],)),
        (False, 0.20, (sops[2],)),
    ]
    (summary,) = studies.summaries()
    assert (summary.state, summary.images) == ("complete", 3)
    (delivery,) = studies.list_deliveries(record.id)
    assert delivery.state.value == "pending"

    # a fourth image after completion: the study is open again, and after its quiet period replaced
    clock.advance(10)
    new = receive(jobs, files[3])
    assert studies.summaries()[0].state == "open"
    finish(jobs, new, 0.90)
    assert studies.due(QUIET) == []
    clock.advance(QUIET + 1)
    assert proc.run_once() == 1
    record = studies.get(study_uid)
    assert record is not None and record.revision == 2 and record.result["probability"] == 0.90
    sr2 = pydicom.dcmread(record.result["files"]["sr"])
    assert (sr2.SOPInstanceUID, sr2.SeriesInstanceUID) == (sr.SOPInstanceUID, sr.SeriesInstanceUID)
    assert sr2.InstanceNumber == 2 and len(read_study_report(sr2)) == 5
    assert len(studies.list_deliveries(record.id)) == 1  # the same delivery row, pending again


def test_forced_completion_uses_what_is_done(jobs: JobStore, clock: Clock, tmp_path: Path) -> None:
    files = copies(SAMPLE, tmp_path / "in", 2)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    proc, studies = processor(jobs, tmp_path), StudyStore(jobs)
    first, second = (receive(jobs, f) for f in files)
    finish(jobs, first, 0.05)
    assert studies.due(QUIET) == []
    studies.force(study_uid)
    assert studies.due(QUIET) == [study_uid]
    assert proc.run_once() == 1
    record = studies.get(study_uid)
    assert record is not None and record.result["forced"] and record.forced_at is None
    assert [i["job_id"] for i in record.result["images"]] == [first]
    assert [i["job_id"] for i in record.result["not_analysed"]] == [second]
    finish(jobs, second, 0.5)  # the rest arrives: a new result after the quiet period
    clock.advance(QUIET + 1)
    assert studies.due(QUIET) == [study_uid]
    with pytest.raises(Exception, match="no image of study"):
        studies.force("1.2.3.4.5.404")


def test_study_of_skipped_images_gets_no_result(jobs: JobStore, clock: Clock, tmp_path: Path) -> None:
    (path,) = copies(SAMPLE, tmp_path / "in", 1)
    job_id = receive(jobs, path)
    jobs.claim("w")
    jobs.skip(job_id, "w", job_result({"routing": {"action": "skip", "rule": "intended_use.body_part", "reason": "CHEST"}}))
    clock.advance(QUIET + 1)
    assert StudyStore(jobs).due(QUIET) == []
    (summary,) = StudyStore(jobs).summaries()
    assert summary.state == "not_analysed" and summary.jobs_by_state == {JobState.SKIPPED.value: 1}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("max", 0.5), ("mean", (0.1 + 0.5 + 0.2) / 3), ("noisy_or", 1 - 0.9 * 0.5 * 0.8)],
)
def test_study_rules(rule: str, expected: float) -> None:
    assert aggregate(rule, [0.1, 0.5, 0.2]) == pytest.approx(expected)


def test_study_policy_from_the_reference_card() -> None:
    card = load_card(REPO / "models" / "reference")
    policy = study_policy(card.to_dict())
    assert (policy.rule, policy.threshold) == ("max", card.threshold)  # max with the image threshold
    assert study_policy(card.to_dict(), "mean").threshold == card.threshold


@pytest.mark.skipif(not have_tool("dciodvfy"), reason="dciodvfy (dicom3tools) is not installed")
def test_study_report_passes_dciodvfy(jobs: JobStore, clock: Clock, tmp_path: Path) -> None:
    files = copies(SAMPLE, tmp_path / "in", 2)
    for f, p in zip(files, (0.2, 0.7), strict=True):
        finish(jobs, receive(jobs, f), p)
    clock.advance(QUIET + 1)
    processor(jobs, tmp_path).run_once()
    (summary,) = StudyStore(jobs).summaries()
    assert summary.record is not None
    out = subprocess.run(["dciodvfy", summary.record.result["files"]["sr"]], capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


FIELD_CASES = sorted((REPO / "tests" / "data" / "field_cases").glob("*.dcm"))


@pytest.mark.parametrize("case", FIELD_CASES, ids=[p.stem for p in FIELD_CASES])
def test_study_report_of_field_case_headers(case: Path, jobs: JobStore, clock: Clock, tmp_path: Path) -> None:
    """Header values from the field (issue 10's kinds) never stop the study result either.

    Expected values are read from the source file with pydicom: the study SR carries the source's
    Specific Character Set and Patient's Name bytes as received, and passes dciodvfy without errors.
    """
    (path,) = copies(case, tmp_path / "in", 1)
    finish(jobs, receive(jobs, path), 0.7)
    clock.advance(QUIET + 1)
    processor(jobs, tmp_path).run_once()
    (summary,) = StudyStore(jobs).summaries()
    assert summary.record is not None, f"no study result for {case.name}"
    sr_path = summary.record.result["files"]["sr"]
    source = pydicom.dcmread(path, stop_before_pixels=True)
    sr = pydicom.dcmread(sr_path)
    assert sr.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
    if "PatientName" in source and source["PatientName"].value:
        raw_source = pydicom.dcmread(path, stop_before_pixels=True, defer_size=None)
        assert sr.get_item(0x00100010).value == raw_source.get_item(0x00100010).value  # raw bytes as received
    if have_tool("dciodvfy"):
        out = subprocess.run(["dciodvfy", sr_path], capture_output=True, text=True, timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert errors == []
