"""Every destination gets the results (issue 10, points 3 and 6), against real peers configured like
restrictive PACS: a pynetdicom Storage SCP (tests/support/dest_scp.py) that accepts only Implicit VR Little
Endian, or no Comprehensive 3D SR, or no SR class at all; dcmtk ``storescp +xi`` (Implicit only); Orthanc
with ``AcceptedTransferSyntaxes`` = Implicit only.

The results are those of the committed field cases (tests/data/field_cases). Checked: what the peer
stored (class, transfer syntax, content: the finding read back equals the original's; received files
pass dciodvfy), the delivery's state per object (SC delivered while the SR was refused is recorded as
such, ``jobs show`` says so, a retry sends only the SR), and the job store migration of older databases.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_ai.cli.jobs import object_lines
from pacs_ai.config import Destination
from pacs_ai.infer.preprocess import InputSpec, dicom_to_gray, prepare
from pacs_ai.queue import migrations
from pacs_ai.queue.jobstore import DeliveryState, JobState, JobStore, RetryPolicy
from pacs_ai.send.contexts import COMPREHENSIVE_SR, ENHANCED_SR
from pacs_ai.send.deliveries import DeliveryProcessor
from pacs_ai.send.sender import outgoing_object, send_objects
from pacs_ai.write.results import write_results
from pacs_ai.write.structured_report import read_finding
from support.common import expected_result_uid
from support.dest_scp import (
    COMPREHENSIVE_3D_SR,
    SECONDARY_CAPTURE,
    SR_CLASSES,
    DestSCP,
    free_port,
)
from support.job_results import job_result

FIELD_CASES = Path(__file__).resolve().parent / "data" / "field_cases"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


class _Prediction:
    def __init__(self, fractured: bool) -> None:
        self.probability = 0.8 if fractured else 0.2
        self.fractured = fractured
        self.threshold = 0.5
        self.label = "fractured" if fractured else "not fractured"
        yy, xx = np.mgrid[0:64, 0:64]
        self.cam = np.exp(-(((xx - 40) / 6.0) ** 2 + ((yy - 20) / 6.0) ** 2)).astype(np.float32)
        self.model_name = "fracture-resnet50"
        self.model_version = "0.0.1"
        self.architecture = "resnet50"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """SC + SR of the field cases c01 (Patient's Sex U, with a ROI: fractured), c07 (ISO 2022 IR 87),
    c16 view 1 (not fractured)."""
    out = {}
    for i, name in enumerate(("c01_patient_sex_u", "c07_iso2022_ir87", "c16_study_view1")):
        ds = pydicom.dcmread(FIELD_CASES / f"{name}.dcm")
        prepared = prepare(dicom_to_gray(ds), InputSpec(size=64))
        out[name] = write_results(ds, prepared, _Prediction(i != 2), tmp_path_factory.mktemp(name)).files
    return out


def _dest(scp: DestSCP | None = None, *, name: str = "pacs", ae: str | None = None, port: int | None = None) -> Destination:
    return Destination(name=name, ae_title=ae or (scp.ae_title if scp else "PACS"), host="127.0.0.1", port=port or scp.port)  # type: ignore[union-attr]


def _objects(r: dict[str, Any]) -> list:
    return [outgoing_object("pacs", k, getattr(r, k)) for k in ("sc", "sr")]


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")


# ----------------------------------------------------------------------------------------------------
# Transfer syntax and SR class negotiation (pynetdicom SCPs like restrictive PACS)
# ----------------------------------------------------------------------------------------------------


@needs_dciodvfy
def test_implicit_only_peer_gets_both_objects_in_implicit(results: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    r = results["c07_iso2022_ir87"]
    with DestSCP(transfer_syntaxes=[ImplicitVRLittleEndian], keep_datasets=True, save_dir=tmp_path / "got") as scp:
        outcomes = send_objects(_dest(scp), _objects(r), calling_ae_title="PACSAI", timeout_s=10)
        assert [o.stored for o in outcomes] == [True, True]
        assert scp.wait_for(lambda d: d.total() >= 2, timeout=10)
        assert {s.transfer_syntax for s in scp.stored()} == {ImplicitVRLittleEndian}
        assert {o.transfer_syntax_uid for o in outcomes} == {ImplicitVRLittleEndian}
        sc, sr = (scp.datasets[getattr(r, f"{k}_sop_instance_uid")] for k in ("sc", "sr"))
        original_sc = pydicom.dcmread(r.sc)
        assert sc.PixelData == original_sc.PixelData
        # Character set and the name's bytes survive the transcoding.
        assert list(sc.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
        assert sc.PatientName.original_string.rstrip(b" ") == original_sc.PatientName.original_string.rstrip(b" ")
        assert read_finding(sr) == read_finding(pydicom.dcmread(r.sr))
        for path in sorted((tmp_path / "got").glob("*.dcm")):
            assert _dciodvfy_errors(path) == [], path.name


@needs_dciodvfy
@pytest.mark.parametrize(
    ("refused", "expected_class"),
    [
        (frozenset({COMPREHENSIVE_3D_SR}), COMPREHENSIVE_SR),
        (frozenset({COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR}), ENHANCED_SR),
    ],
    ids=["no-3d-sr", "enhanced-sr-only"],
)
@pytest.mark.parametrize("case", ["c01_patient_sex_u", "c16_study_view1"])  # with and without a ROI
def test_peer_without_the_sr_class_gets_an_sr_it_accepts(
    results: dict[str, dict[str, Any]], refused: frozenset[str], expected_class: str, case: str, tmp_path: Path
) -> None:
    r = results[case]
    with DestSCP(
        transfer_syntaxes=[ImplicitVRLittleEndian], refuse_sop_classes=refused, keep_datasets=True, save_dir=tmp_path
    ) as scp:
        outcomes = send_objects(_dest(scp), _objects(r), calling_ae_title="PACSAI", timeout_s=10)
        assert [o.stored for o in outcomes] == [True, True]
        assert scp.wait_for(lambda d: d.total() >= 2, timeout=10)
        classes = [s.sop_class_uid for s in scp.stored()]
        assert classes == [SECONDARY_CAPTURE, expected_class]
        sr_uid = expected_result_uid(r.sr_sop_instance_uid, expected_class, "sr-class")
        assert outcomes[1].sop_instance_uid == sr_uid and outcomes[1].sop_class_uid == expected_class
        received = scp.datasets[sr_uid]
        original = pydicom.dcmread(r.sr)
        # Same content: finding, probability, threshold, algorithm, ROI, source image; same series.
        assert read_finding(received) == read_finding(original)
        assert received.ContentSequence == original.ContentSequence
        assert received.SeriesInstanceUID == original.SeriesInstanceUID
        assert _dciodvfy_errors(tmp_path / f"{sr_uid}.dcm") == []


# ----------------------------------------------------------------------------------------------------
# Delivery state per object, through the delivery processor and a real job store
# ----------------------------------------------------------------------------------------------------


def _store_with_job(tmp_path: Path, r: dict[str, Any], destinations: list[str]) -> tuple[JobStore, int]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", delivery_policy=RetryPolicy(max_attempts=3, backoff_base_s=0.0, backoff_max_s=0.0), upgrade=True)
    outcome = store.enqueue(
        sop_instance_uid=pydicom.uid.generate_uid(), study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_aet="MODALITY", spool_path=str(tmp_path / "x.dcm"),
        sha256="0" * 64, size=1,
    )
    [job] = store.claim("worker", limit=1)
    store.complete(job.id, "worker", job_result({"files": {"sc": str(r.sc), "sr": str(r.sr)}}), destinations)
    return store, outcome.job_id


def _processor(store: JobStore, dest: Destination) -> DeliveryProcessor:
    return DeliveryProcessor(store, [dest], Path("/nonexistent-outbox"), calling_ae_title="PACSAI", owner="t:1:deliver", timeout_s=10)


def test_sc_delivered_while_no_sr_class_is_accepted_then_retry_sends_only_the_sr(
    results: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    r = results["c01_patient_sex_u"]
    store, job_id = _store_with_job(tmp_path, r, ["pacs"])
    port = free_port()
    scp = DestSCP(port=port, refuse_sop_classes=SR_CLASSES).start()
    try:
        _processor(store, _dest(scp)).run_once()
        [delivery] = store.list_deliveries(job_id=job_id)
        # Not "dead for both": the SC is recorded as delivered, the SR as refused for good.
        assert delivery.state == DeliveryState.DEAD
        assert delivery.delivered_objects() == {"sc"}
        assert delivery.objects["sr"]["state"] == "dead" and "accepts none" in delivery.objects["sr"]["error"]
        assert delivery.objects["sc"]["sop_instance_uid"] == r.sc_sop_instance_uid
        lines = object_lines(delivery.objects)
        assert lines[0].startswith("sc: delivered as Secondary Capture") and lines[1].startswith("sr: refused for good")
        assert store.partly_delivered_counts() == {"pacs": 1}
        assert [s.sop_class_uid for s in scp.stored()] == [SECONDARY_CAPTURE]
    finally:
        scp.stop()
    # The PACS is reconfigured to take SRs; the dead delivery is retried: only the SR goes.
    with DestSCP(port=port) as scp2:
        store.retry_delivery(delivery.id)
        _processor(store, _dest(scp2)).run_once()
        assert scp2.wait_for(lambda d: d.total() >= 1, timeout=10)
        assert [s.sop_class_uid for s in scp2.stored()] == [COMPREHENSIVE_3D_SR]
        [delivery] = store.list_deliveries(job_id=job_id)
        assert delivery.state == DeliveryState.DONE and delivery.delivered_objects() == {"sc", "sr"}
        assert store.partly_delivered_counts() == {}
    store.close()


def test_transient_refusal_of_the_sr_retries_only_the_sr(results: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    r = results["c16_study_view1"]
    store, job_id = _store_with_job(tmp_path, r, ["pacs"])
    with DestSCP() as scp:
        scp.refuse(lambda ds: str(ds.SOPClassUID) in SR_CLASSES, 0xA700)  # out of resources: try later
        processor = _processor(store, _dest(scp))
        processor.run_once()
        [delivery] = store.list_deliveries(job_id=job_id)
        assert delivery.state == DeliveryState.FAILED and delivery.delivered_objects() == {"sc"}
        assert delivery.objects["sr"]["state"] == "failed" and "0xA700" in delivery.objects["sr"]["error"]
        scp.clear_refusals()
        deadline = time.monotonic() + 20
        while store.list_deliveries(job_id=job_id)[0].state != DeliveryState.DONE and time.monotonic() < deadline:
            processor.run_once()
        assert store.list_deliveries(job_id=job_id)[0].state == DeliveryState.DONE
        assert scp.counts()[r.sc_sop_instance_uid] == 1, "the SC was sent again"
        assert scp.counts()[r.sr_sop_instance_uid] == 1
    store.close()


def test_migration_adds_per_object_state_to_an_older_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        from pacs_ai.queue.models import schema_version

        schema_version.create(conn)
        for m in migrations.MIGRATIONS:
            if m.version < 4:  # a database of the release before the per-object state
                m.apply(conn)
                conn.execute(schema_version.insert().values(version=m.version, description=m.description, applied_at=sa.func.now()))
        conn.execute(sa.text(
            "INSERT INTO jobs (sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid, calling_aet, "
            "spool_path, sha256, size, state, attempts, received_at, updated_at) VALUES "
            "('1.2', '1.2.3', '1.2.3.4', '1.2.840.10008.5.1.4.1.1.1', 'M', '/x', 'h', 1, 'done', 1, '2026-01-01', '2026-01-01')"
        ))
        conn.execute(sa.text(
            "INSERT INTO deliveries (job_id, destination, state, attempts, created_at, updated_at, last_error) "
            "VALUES (1, 'pacs', 'dead', 5, '2026-01-01', '2026-01-01', 'refused')"
        ))
    engine.dispose()
    store = JobStore(url, upgrade=True)
    assert store.schema_version == migrations.LATEST_VERSION
    [delivery] = store.list_deliveries()
    assert delivery.objects is None and delivery.delivered_objects() == set()
    assert store.get(1).state == JobState.DONE
    store.close()


# ----------------------------------------------------------------------------------------------------
# dcmtk and Orthanc as restrictive peers
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("storescp") is None, reason="dcmtk storescp not installed")
def test_dcmtk_storescp_implicit_only(results: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    r = results["c07_iso2022_ir87"]
    port = free_port()
    out = tmp_path / "dcmtk"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "+xi", "+B", "-aet", "DCMTK", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        outcomes: list = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait for the listener, bounded
            try:
                outcomes = send_objects(_dest(ae="DCMTK", port=port), _objects(r), calling_ae_title="PACSAI", timeout_s=10)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.3)
        assert [o.stored for o in outcomes] == [True, True]
        files = sorted(out.iterdir())
        assert len(files) == 2
        for f in files:
            ds = pydicom.dcmread(f)
            assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_orthanc_implicit_only(results: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    from support.orthanc import OrthancServer, orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc not installed")
    r = results["c01_patient_sex_u"]
    with OrthancServer(tmp_path / "orthanc", extra_config={"AcceptedTransferSyntaxes": [ImplicitVRLittleEndian]}) as pacs:
        dest = Destination(name="orthanc", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port)
        # Without Implicit in the proposal this peer refuses everything (the field problem):
        only_explicit = send_objects(dest, [outgoing_object("o", "sc", Path(r.sc))], calling_ae_title="PACSAI", timeout_s=10)
        assert only_explicit[0].stored and only_explicit[0].transfer_syntax_uid == ImplicitVRLittleEndian
        outcomes = send_objects(dest, _objects(r), calling_ae_title="PACSAI", timeout_s=10)
        assert [o.stored for o in outcomes] == [True, True]
        stored = {pacs.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in pacs.get("/instances")}
        assert stored == {r.sc_sop_instance_uid, r.sr_sop_instance_uid}
        assert ExplicitVRLittleEndian not in {o.transfer_syntax_uid for o in outcomes}
