"""End to end with a real PACS: Orthanc -> pacs-ai daemon -> Orthanc.

1. Start Orthanc (tests/support/orthanc.py: own config, free ports, temporary storage) with the daemon as a
   DICOM modality, and the daemon (``pacs-ai serve --config``) with Orthanc as its only destination and
   a tiny random-weight model (tests/support/model_factory.py).
2. Upload the committed WG-04 samples of ``tests/data/wg04`` (five encodings each of a MONOCHROME2 hip and a
   MONOCHROME1 tibia, 8x smaller than ../shared's originals) to Orthanc with ``storescu``, each in its own transfer syntax, and have Orthanc
   forward each one to the daemon (``POST /modalities/pacsai/store``).
3. Wait (bounded) until every study in Orthanc holds its originals plus one SC and one SR per original
   (deterministic UIDs), check the SC previews render as PNG and each SR says what the daemon decided
   (``pacs-ai jobs list/show --json``).
4. Stop Orthanc, send the committed samples (and one image again) straight to the daemon, start Orthanc
   again on the same storage, and check that everything arrives with no duplicates.

Prints the seconds from the C-STORE to the daemon to both results being stored in Orthanc.
"""

from __future__ import annotations

import io
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacs_ai.write.structured_report import read_finding
from support.common import WG04_SMALL, expected_result_uid, free_port
from support.daemon_harness import Daemon
from support.orthanc import OrthancServer, orthanc_available, storescu

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_3D_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
MODEL_VERSION = "0.0.1-e2e"
DAEMON_START_TIMEOUT_S = 180.0
RESULTS_TIMEOUT_S = 420.0


def _wait(condition: Callable[[], Any], timeout_s: float, what: str, *, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every)


def _prerequisites() -> str | None:
    if not orthanc_available():
        return "Orthanc is not installed (Debian package orthanc)"
    if shutil.which("storescu") is None:
        return "storescu (dcmtk) is not installed"
    try:
        from support import model_factory  # noqa: F401
    except ImportError as exc:
        return f"tests/support/model_factory.py unavailable: {exc}"
    return None


def _expected(ds: pydicom.Dataset) -> dict[str, str]:
    uid = str(ds.SOPInstanceUID)
    return {"sc": expected_result_uid(uid, MODEL_VERSION, "sc"), "sr": expected_result_uid(uid, MODEL_VERSION, "sr")}


def _find_instance(pacs: OrthancServer, sop_uid: str) -> str | None:
    found = pacs.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    return found[0] if found else None


def _arrivals(pacs: OrthancServer, pending: dict[str, dict[str, str]], arrived: dict[str, float]) -> bool:
    """Note the time each source's SC and SR are both in Orthanc; True when all have arrived."""
    for src, uids in pending.items():
        if src in arrived:
            continue
        if all(_find_instance(pacs, uid) for uid in uids.values()):
            arrived[src] = time.monotonic()
    return len(arrived) == len(pending)


def _breakdown(data_dir: Path, sop_uids: list[str]) -> list[str]:
    """Where the time went, per job, from the daemon's job store."""
    from pacs_ai.queue.jobstore import JobStore

    store = JobStore(f"sqlite:///{data_dir / 'pacs-ai.db'}")
    try:
        by_sop = {j.sop_instance_uid: j for j in store.list_jobs(limit=1000)}
        lines = []
        for uid in sop_uids:
            job = by_sop[uid]
            delivered = [d.delivered_at for d in store.list_deliveries(job_id=job.id) if d.delivered_at]
            t = (job.result or {}).get("timings", {})
            parts = "/".join(f"{float(t.get(k, 0.0)):.2f}" for k in ("preprocess", "forward", "cam"))
            lines.append(
                f"job {job.id}: {(job.started_at - job.received_at).total_seconds():5.1f} s, "
                f"{(job.finished_at - job.started_at).total_seconds():5.1f} s ({parts}), "
                f"{(max(delivered) - job.finished_at).total_seconds() if delivered else float('nan'):5.1f} s"
            )
        return lines
    finally:
        store.close()


@pytest.mark.timeout(1500)
def test_orthanc_round_trip(tmp_path: Path) -> None:
    reason = _prerequisites()
    if reason:
        pytest.skip(reason)
    from support.model_factory import make_model_folder

    originals = sorted(WG04_SMALL.glob("RG2_*.dcm")) + sorted(WG04_SMALL.glob("RG3_*.dcm"))
    assert len(originals) == 10
    samples = sorted((REPO / "tests" / "data").glob("*.dcm"))
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in originals + samples}

    model = make_model_folder(tmp_path / "model", "resnet50", version=MODEL_VERSION, threshold=0.5)
    daemon_port = free_port()
    pacs = OrthancServer(tmp_path / "orthanc", aet="ORTHANC", modalities={"pacsai": ("PACSAI", "127.0.0.1", daemon_port)})
    # The one harness (tests/support/daemon_harness.py): its config, the test's model, Orthanc as the only destination.
    daemon = Daemon(
        tmp_path / "daemon", model=model, port=daemon_port,
        destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
        overrides={
            "model": {"batch_size": 4, "threads": 2},
            "worker": {"poll_interval_s": 0.2, "max_attempts": 3},
            "delivery": {"poll_interval_s": 0.5, "max_attempts": 100, "backoff_base_s": 1.0, "backoff_max_s": 4.0,
                         "timeout_s": 15.0},
        },
    )
    data_dir = daemon.data_dir
    timings: dict[str, float] = {}
    try:
        pacs.start()
        daemon.start(DAEMON_START_TIMEOUT_S)

        # -- 1. radiographs -> Orthanc -> daemon -> results in Orthanc ------------------------------------
        pacs.storescu(originals)
        orthanc_ids = {p: _find_instance(pacs, str(headers[p].SOPInstanceUID)) for p in originals}
        assert all(orthanc_ids.values()), "storescu upload to Orthanc incomplete"
        pending = {str(headers[p].SOPInstanceUID): _expected(headers[p]) for p in originals}
        sent_at: dict[str, float] = {}
        for p in originals:
            sent_at[str(headers[p].SOPInstanceUID)] = time.monotonic()
            pacs.post("/modalities/pacsai/store", {"Resources": [orthanc_ids[p]], "Synchronous": True}, timeout=120)
        arrived: dict[str, float] = {}
        try:
            _wait(lambda: _arrivals(pacs, pending, arrived), RESULTS_TIMEOUT_S, "SC + SR of every radiograph in Orthanc",
                  every=1.0)
        except AssertionError:
            print(daemon.log_tail(), file=sys.stderr)
            raise
        phase1 = {src: arrived[src] - sent_at[src] for src in pending}

        # Each study: its originals plus one SC and one SR per original, nothing else.
        jobs = {j["sop_instance_uid"]: j for j in daemon.cli("jobs", "list", "--json", "--limit", "1000")}
        studies: dict[str, set[str]] = {}
        for p in originals:
            study = str(headers[p].StudyInstanceUID)
            exp = _expected(headers[p])
            studies.setdefault(study, set()).update({str(headers[p].SOPInstanceUID), exp["sc"], exp["sr"]})
        for study, expected_uids in studies.items():
            instances = pacs.instances_of_study(study)
            got = [i["MainDicomTags"]["SOPInstanceUID"] for i in instances]
            assert sorted(got) == sorted(expected_uids), f"study {study}"
        for p in originals:
            src = str(headers[p].SOPInstanceUID)
            exp = _expected(headers[p])
            sc_id, sr_id = _find_instance(pacs, exp["sc"]), _find_instance(pacs, exp["sr"])
            png, content_type = pacs.get(f"/instances/{sc_id}/preview", raw=True)
            assert content_type.startswith("image/png") and png[:8] == b"\x89PNG\r\n\x1a\n"
            sc_tags = pacs.get(f"/instances/{sc_id}/tags?simplify")
            assert sc_tags["SOPClassUID"] == SC_CLASS and sc_tags["BurnedInAnnotation"] == "YES"
            assert sc_tags["PatientID"] == str(headers[p].PatientID)
            sr = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{sr_id}/file")))
            assert sr.SOPClassUID == SR_3D_CLASS
            finding = read_finding(sr)
            job = jobs[src]
            assert job["state"] == "done", job
            assert finding.fractured is bool(job["result"]["fractured"])
            assert finding.probability == pytest.approx(float(job["result"]["probability"]), abs=1e-6)
            assert finding.threshold == pytest.approx(float(job["result"]["threshold"]))
            assert finding.algorithm_version == MODEL_VERSION
            assert finding.source_sop_instance_uid == src
            assert (finding.roi is not None) == finding.fractured
        breakdown = _breakdown(data_dir, [str(headers[p].SOPInstanceUID) for p in originals])
        one = jobs[str(headers[originals[0]].SOPInstanceUID)]
        shown = daemon.cli("jobs", "show", str(one["id"]), "--json")
        assert shown["result"]["probability"] == one["result"]["probability"]
        assert [d["state"] for d in shown["deliveries"]] == ["done"]

        # -- 2. Orthanc down: more images straight to the daemon, then Orthanc back --------------------------
        pacs.stop()
        again = [originals[0]]
        t_send = time.monotonic()
        storescu(samples + again, "127.0.0.1", daemon_port, "PACSAI", calling_aet="MODALITY")
        new_pending = {str(headers[p].SOPInstanceUID): _expected(headers[p]) for p in samples}

        from pacs_ai.queue.jobstore import JobStore

        store = JobStore(f"sqlite:///{data_dir / 'pacs-ai.db'}")
        try:
            def failed_while_down() -> bool:
                by_sop = {j.sop_instance_uid: j for j in store.list_jobs(limit=1000)}
                ids = [by_sop[s].id for s in new_pending if s in by_sop]
                if len(ids) < len(new_pending):
                    return False
                states = [d.state.value for i in ids for d in store.list_deliveries(job_id=i)]
                return len(states) == len(ids) and all(s == "failed" for s in states)

            _wait(failed_while_down, RESULTS_TIMEOUT_S, "the new results to fail delivery while Orthanc is down")
        finally:
            store.close()
        t_restart = time.monotonic()
        pacs.start()
        arrived2: dict[str, float] = {}
        try:
            _wait(lambda: _arrivals(pacs, new_pending, arrived2), RESULTS_TIMEOUT_S, "results after Orthanc came back")
        except AssertionError:
            print(daemon.log_tail(), file=sys.stderr)
            raise
        # Count only when the daemon has no delivery left to (re)send: a stray re-delivery would land now.
        store = JobStore(f"sqlite:///{data_dir / 'pacs-ai.db'}")
        try:
            _wait(lambda: {d.state.value for d in store.list_deliveries(limit=10_000)} == {"done"}, RESULTS_TIMEOUT_S,
                  "every delivery done")
        finally:
            store.close()
        all_uids = pacs.sop_uids()
        assert len(all_uids) == len(set(all_uids)), "duplicate instances in Orthanc"
        expected_total = len(originals) * 3 + len(samples) * 2
        assert len(all_uids) == expected_total, (len(all_uids), expected_total)
        for p in samples:
            exp = _expected(headers[p])
            got = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.instances_of_study(str(headers[p].StudyInstanceUID))}
            assert {exp["sc"], exp["sr"]} <= got
        final_jobs = daemon.cli("jobs", "list", "--json", "--limit", "1000")
        assert all(j["state"] == "done" for j in final_jobs)
        timings = {
            "phase1_median_s": statistics.median(phase1.values()),
            "phase1_max_s": max(phase1.values()),
            "phase1_total_s": max(arrived.values()) - min(sent_at.values()),
            "phase2_after_restart_max_s": max(arrived2.values()) - t_restart,
            "phase2_from_send_max_s": max(arrived2.values()) - t_send,
        }
        print(f"\nE2E timings ({len(originals)} radiographs via Orthanc, {len(samples)} samples while Orthanc was down):")
        for src, seconds in sorted(phase1.items(), key=lambda kv: kv[1]):
            name = next(p.name for p in originals if str(headers[p].SOPInstanceUID) == src)
            print(f"  {name:<14} C-STORE -> SC+SR in Orthanc: {seconds:6.1f} s")
        for key, value in timings.items():
            print(f"  {key}: {value:.1f} s")
        print("  per job (phase 1): queued->started, started->done (of which preprocess/forward/cam), done->delivered")
        for line in breakdown:
            print("   ", line)
    finally:
        daemon.stop()
        daemon.close_store()
        pacs.stop()
