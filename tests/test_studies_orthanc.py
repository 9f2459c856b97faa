"""Studies with real peers: the daemon (``pacs-ai serve``, quiet period 2 s) and Orthanc as destination.

Three images of one study arrive over two associations: each image's SC and SR reach Orthanc as it is
done, and after the quiet period one study SR listing the three images with references to them. A
fourth image of the study after completion gets the study result replaced: Orthanc still holds exactly
one study SR (same SOP Instance UID), now listing four images. The admin's views (``studies list`` /
``studies show``) are printed.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pacs_ai.infer.model_card import load_card
from pacs_ai.studies.report import SERIES_NUMBER, read_study_report
from pacs_ai.studies.store import StudyStore
from support.common import copies, expected_result_uid
from support.daemon_harness import Daemon, shared_model
from support.orthanc import OrthancServer, orthanc_available

pytestmark = [pytest.mark.orthanc]

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "cr_hip_mono2_small.dcm"
QUIET_S = 2.0


def _cli(daemon: Daemon, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pacs_ai", *args, "--config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _study_srs(orthanc: OrthancServer, study_uid: str) -> list[pydicom.Dataset]:
    """The study SRs (series 9903) Orthanc holds for the study, read from Orthanc."""
    out = []
    for inst in orthanc.instances_of_study(study_uid):
        ds = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{inst['ID']}/file", raw=True)[0]))
        if int(ds.get("SeriesNumber", 0)) == SERIES_NUMBER:
            out.append(ds)
    return out


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed (Debian package orthanc)")
def test_study_result_after_quiet_period_and_replaced(tmp_path: Path) -> None:
    model = shared_model("resnet50", 64)
    version = load_card(model).version
    files = copies(SAMPLE, tmp_path / "in", 4)
    sops = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    study_sr_uid = expected_result_uid(study_uid, version, "study-sr")
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        dest = {"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
        overrides = {"studies": {"enabled": True, "quiet_period_s": QUIET_S, "poll_interval_s": 0.5}}
        with Daemon(tmp_path / "d", model=model, destinations=[dest], overrides=overrides) as daemon:
            assert daemon.send(files[:2]).statuses == [0, 0]  # association 1
            assert daemon.send(files[2:3]).statuses == [0]  # association 2
            jobs = daemon.wait_settled(sops[:3], timeout=120)
            assert all(str(j.state) == "done" for j in jobs.values()), daemon.log_tail()
            # per-image SC + SR for three images, then the study SR
            assert daemon.wait_until(lambda: len(orthanc.instances_of_study(study_uid)) == 7, 90), (
                [i["MainDicomTags"] for i in orthanc.instances_of_study(study_uid)]
            )
            (sr,) = _study_srs(orthanc, study_uid)
            assert sr.SOPInstanceUID == study_sr_uid and sr.InstanceNumber == 1
            groups = read_study_report(sr)
            assert [g.source_sop_instance_uids for g in groups] == [tuple(sops[:3])] + [(s,) for s in sops[:3]]
            probs = [jobs[s].result["probability"] for s in sops[:3]]
            assert [g.probability for g in groups[1:]] == pytest.approx(probs)
            assert groups[0].probability == pytest.approx(max(probs))  # the reference rule: max
            last_received = max(j.received_at for j in jobs.values())
            first = StudyStore(daemon.jobs()).get(study_uid)
            assert first is not None and first.revision == 1 and first.completed_at is not None
            assert (first.completed_at - last_received).total_seconds() >= QUIET_S  # the quiet period held
            listing = _cli(daemon, "studies", "list")
            print(listing)
            assert "complete          3" in listing and study_uid in listing and "rev 1" in listing

            # a fourth image after completion: the study result is replaced, not duplicated
            assert daemon.send(files[3:]).statuses == [0]
            assert daemon.wait_settled(sops[3:], timeout=120)[sops[3]].result is not None

            def replaced() -> bool:
                srs = _study_srs(orthanc, study_uid)
                return len(srs) == 1 and srs[0].InstanceNumber == 2

            assert daemon.wait_until(replaced, 90), daemon.log_tail()
            (sr2,) = _study_srs(orthanc, study_uid)
            assert sr2.SOPInstanceUID == study_sr_uid
            assert [g.source_sop_instance_uids for g in read_study_report(sr2)][0] == tuple(sops)
            assert len(orthanc.instances_of_study(study_uid)) == 9  # 4 x (SC + SR) + 1 study SR
            by_study = _cli(daemon, "jobs", "list", "--study", study_uid)
            assert sum(line.split()[1] == "done" for line in by_study.splitlines()[1:]) == 4
            show = _cli(daemon, "studies", "show", study_uid)
            print(show)
            assert "revision 2" in show and "#1 orthanc: done" in show
