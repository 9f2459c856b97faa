"""The C-STORE sender and the delivery processor against real peers: a pynetdicom Storage SCP
(tests/support/dest_scp.py), a port nobody listens on, a peer that accepts TCP but never answers, and a real
SQLite job store."""

from __future__ import annotations

import copy
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from pacs_ai.config import Destination
from pacs_ai.errors import DeliveryError
from pacs_ai.infer.preprocess import InputSpec, dicom_to_gray, prepare
from pacs_ai.queue.jobstore import DeliveryState, JobStore, RetryPolicy
from pacs_ai.results import JobResult, ResultFiles
from pacs_ai.send.deliveries import OUTBOX, DeliveryProcessor, destination_names, result_files
from pacs_ai.send.sender import DestinationUnreachable, is_permanent_status, send_files
from pacs_ai.write.results import write_results
from support.dest_scp import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, DestSCP, free_port
from support.job_results import job_result

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "cr_hip_mono2_small.dcm"
SHARED = REPO.parent / "shared" / "data" / "dicom" / "wg04_RG2_hip_CR" / "RG2_UNC.dcm"


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


def _source() -> pydicom.Dataset:
    for path in (SAMPLE, SHARED):
        if path.is_file():
            return pydicom.dcmread(path)
    pytest.skip("no sample radiograph (tests/data or ../shared/data) available")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """SC + SR of three 'different' images (same pixels, distinct UIDs and studies)."""
    base = _source()
    prepared = prepare(dicom_to_gray(base), InputSpec(size=64))
    out = []
    for i in range(3):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        folder = tmp_path_factory.mktemp(f"result{i}")
        r: dict[str, Any] = write_results(ds, prepared, _Prediction(i % 2 == 0), folder).files.to_json()
        r["study"] = str(ds.StudyInstanceUID)
        r["source"] = ds
        out.append(r)
    return out


def _dest(scp: DestSCP, name: str = "pacs") -> Destination:
    return Destination(name=name, ae_title=scp.ae_title, host="127.0.0.1", port=scp.port)


def _closed_port_destination(name: str = "down") -> Destination:
    return Destination(name=name, ae_title="NOBODY", host="127.0.0.1", port=free_port())


# ----------------------------------------------------------------------------------------------------
# send_files
# ----------------------------------------------------------------------------------------------------


def test_send_files_stores_sc_and_sr_over_one_association(results: list[dict[str, Any]]) -> None:
    with DestSCP(keep_datasets=True) as scp:
        r = results[0]
        send_files(_dest(scp), [Path(r["sc"]), Path(r["sr"])], calling_ae_title="PACSAI", timeout_s=10)
        assert scp.wait_for(lambda d: d.total() >= 2, timeout=10)
        stored = scp.stored()
        assert [s.sop_class_uid for s in stored] == [SECONDARY_CAPTURE, COMPREHENSIVE_3D_SR]
        assert {s.sop_instance_uid for s in stored} == {r["sc_sop_instance_uid"], r["sr_sop_instance_uid"]}
        assert {s.calling_ae for s in stored} == {"PACSAI"}
        assert all(s.study_instance_uid == r["study"] for s in stored)
        # Sent as encoded, byte for byte the same pixels.
        sc = scp.datasets[r["sc_sop_instance_uid"]]
        assert sc.PixelData == pydicom.dcmread(r["sc"]).PixelData


@pytest.mark.parametrize(("status", "permanent"), [(0xC000, True), (0xA900, True), (0x0122, True), (0xA700, False), (0x0110, False)])
def test_refusal_statuses(results: list[dict[str, Any]], status: int, permanent: bool) -> None:
    assert is_permanent_status(status) is permanent
    with DestSCP() as scp:
        scp.refuse(lambda ds: True, status)
        with pytest.raises(DeliveryError) as info:
            send_files(_dest(scp), [Path(results[0]["sc"])], calling_ae_title="PACSAI", timeout_s=10)
        assert info.value.permanent is permanent
        assert f"0x{status:04X}" in info.value.detail
        assert info.value.destination == "pacs"


def test_unreachable_destination_is_transient_and_fast(results: list[dict[str, Any]]) -> None:
    started = time.monotonic()
    with pytest.raises(DestinationUnreachable) as info:
        send_files(_closed_port_destination(), [Path(results[0]["sc"])], calling_ae_title="PACSAI", timeout_s=5)
    assert not info.value.permanent
    assert time.monotonic() - started < 5


def test_missing_file_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as info:
        send_files(_closed_port_destination(), [tmp_path / "gone.dcm"], calling_ae_title="PACSAI")
    assert info.value.permanent


# ----------------------------------------------------------------------------------------------------
# DeliveryProcessor with a real job store
# ----------------------------------------------------------------------------------------------------


class Obs:
    """Observer that records delivered / delivery_failed events."""

    def __init__(self) -> None:
        self.ok: list[tuple[int, str, float]] = []
        self.bad: list[tuple[int, str, str, bool]] = []

    def delivered(self, job_id: int, destination: str, end_to_end_s: float) -> None:
        self.ok.append((job_id, destination, end_to_end_s))

    def delivery_failed(self, job_id: int, destination: str, reason: str, dead: bool) -> None:
        self.bad.append((job_id, destination, reason, dead))


def _store(tmp_path: Path, max_attempts: int = 3, base: float = 60.0) -> JobStore:
    return JobStore(
        f"sqlite:///{tmp_path / 'jobs.db'}",
        delivery_policy=RetryPolicy(max_attempts=max_attempts, backoff_base_s=base, backoff_max_s=base * 8),
        upgrade=True,
    )


def _finish_jobs(store: JobStore, results: list[dict[str, Any]], destinations: list[str]) -> list[int]:
    ids = []
    for r in results:
        ds = r["source"]
        outcome = store.enqueue(
            sop_instance_uid=str(ds.SOPInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            calling_aet="MODALITY",
            spool_path="/nonexistent",
            sha256=str(ds.SOPInstanceUID),
            size=1,
        )
        ids.append(outcome.job_id)
    claimed = store.claim("worker", limit=len(results))
    by_id = dict(zip(ids, results, strict=True))
    for job in claimed:
        r = by_id[job.id]
        files = {k: r[k] for k in ("sc", "sr", "overlay")}
        store.complete(job.id, "worker", job_result({"files": files, "probability": 0.5}), destinations)
    return ids


def test_destination_names() -> None:
    assert destination_names([]) == [OUTBOX]
    d = Destination(name="a", ae_title="A", host="h", port=1)
    assert destination_names([d, replace(d, name="b")]) == ["a", "b"]
    assert result_files(JobResult(files=ResultFiles(sc=Path("x/sc.dcm"), sr=Path("x/sr.dcm"), overlay=Path("x/o.png")))) == [
        Path("x/sc.dcm"),
        Path("x/sr.dcm"),
    ]
    with pytest.raises(DeliveryError):
        result_files(JobResult(files=ResultFiles(overlay=Path("x/o.png"))))
    with pytest.raises(DeliveryError):
        result_files(None)


def test_down_destination_does_not_block_the_other_and_dies_after_the_limit(
    results: list[dict[str, Any]], tmp_path: Path
) -> None:
    store = _store(tmp_path, max_attempts=2, base=0.0)
    obs = Obs()
    with DestSCP() as scp:
        up, down = _dest(scp, "up"), _closed_port_destination("down")
        ids = _finish_jobs(store, results, ["up", "down"])
        proc = DeliveryProcessor(store, [up, down], tmp_path / "outbox", calling_ae_title="PACSAI", owner="d1",
                                 timeout_s=5, observer=obs)
        assert proc.run_once() == 6
        assert scp.wait_for(lambda d: d.total() >= 6, timeout=10)
        assert not scp.duplicates()
        assert sorted(j for j, dest, _ in obs.ok) == sorted(ids) and {d for _, d, _ in obs.ok} == {"up"}
        assert all(0 <= s < 120 for _, _, s in obs.ok)
        # "down": every delivery failed once, transiently (the first tried, the rest not attempted).
        assert len(obs.bad) == 3 and not any(dead for *_, dead in obs.bad)
        assert any("cannot connect" in reason for *_, reason, _ in obs.bad)
        states = {(d.destination, d.state) for d in store.list_deliveries()}
        assert states == {("up", DeliveryState.DONE), ("down", DeliveryState.FAILED)}
        # Second attempt (backoff 0 s): the limit of 2 is reached, dead with the reason.
        assert proc.run_once() == 3
        dead = store.list_deliveries(state=DeliveryState.DEAD)
        assert len(dead) == 3 and all("cannot connect" in (d.last_error or "") or "not attempted" in (d.last_error or "") for d in dead)
        assert sum(1 for *_, d in obs.bad if d) == 3
        assert proc.run_once() == 0
        # Re-sent from the CLI's retry: the destination is back.
        down_scp = DestSCP(ae_title="NOBODY", port=down.port).start()
        try:
            assert store.retry_dead_deliveries() == 3
            assert proc.run_once() == 3
            assert down_scp.wait_for(lambda d: d.total() >= 6, timeout=10)
        finally:
            down_scp.stop()
        assert all(d.state == DeliveryState.DONE for d in store.list_deliveries())


def test_refused_results_are_dead_at_once(results: list[dict[str, Any]], tmp_path: Path) -> None:
    store = _store(tmp_path)
    obs = Obs()
    with DestSCP() as scp:
        scp.refuse_studies({results[0]["study"]}, 0xC000)
        _finish_jobs(store, results[:2], ["pacs"])
        proc = DeliveryProcessor(store, [_dest(scp)], tmp_path / "o", calling_ae_title="PACSAI", owner="d", observer=obs)
        assert proc.run_once() == 2
        deliveries = {d.job_id: d for d in store.list_deliveries()}
        states = sorted(d.state for d in deliveries.values())
        assert states == [DeliveryState.DEAD, DeliveryState.DONE]
        dead = next(d for d in deliveries.values() if d.state == DeliveryState.DEAD)
        assert "0xC000" in (dead.last_error or "")
        assert [b[3] for b in obs.bad] == [True]


def test_silent_destination_does_not_hold_up_others(results: list[dict[str, Any]], tmp_path: Path) -> None:
    """A peer that accepts the TCP connection and never answers: the healthy destination is served meanwhile."""
    store = _store(tmp_path, base=60.0)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        with DestSCP() as scp:
            hang = Destination(name="hang", ae_title="HANG", host="127.0.0.1", port=silent.getsockname()[1])
            _finish_jobs(store, results[:1], ["hang", "ok"])
            proc = DeliveryProcessor(store, [hang, _dest(scp, "ok")], tmp_path / "o", calling_ae_title="PACSAI",
                                     owner="d", timeout_s=20, max_wait_s=1.0)
            started = time.monotonic()
            assert proc.run_once() == 1  # "ok" done; "hang" still waiting for its answer
            # A processor that waited for the silent peer would take its whole 20 s timeout here; the bound
            # is loose so that a loaded machine cannot fail it.
            assert time.monotonic() - started < 15
            assert scp.total() == 2
            assert proc.busy() == ["hang"]
            assert proc.wait_idle(60)
            assert proc.run_once() == 1  # the hung attempt's outcome is collected now
            hung = next(d for d in store.list_deliveries() if d.destination == "hang")
            assert hung.state == DeliveryState.FAILED
    finally:
        silent.close()


def test_outbox_when_no_destination(results: list[dict[str, Any]], tmp_path: Path) -> None:
    store = _store(tmp_path)
    obs = Obs()
    _finish_jobs(store, results[:2], destination_names([]))
    proc = DeliveryProcessor(store, [], tmp_path / "outbox", calling_ae_title="PACSAI", owner="d", observer=obs)
    assert proc.run_once() == 2
    for r in results[:2]:
        folder = tmp_path / "outbox" / r["study"]
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted([f"{r['sc_sop_instance_uid']}.dcm", f"{r['sr_sop_instance_uid']}.dcm"])
    assert [d for _, d, _ in obs.ok] == [OUTBOX, OUTBOX]
    assert all(d.state == DeliveryState.DONE for d in store.list_deliveries())


def test_deliveries_to_a_removed_destination_are_dead_lettered(results: list[dict[str, Any]], tmp_path: Path) -> None:
    """Deliveries to a destination no longer configured end dead with the reason, not pending for ever."""
    store = _store(tmp_path)
    _finish_jobs(store, results[:2], ["old-pacs"])
    proc = DeliveryProcessor(store, [], tmp_path / "outbox", calling_ae_title="PACSAI", owner="d")
    assert proc.dead_letter_unconfigured() == 2
    deliveries = store.list_deliveries()
    assert [d.state for d in deliveries] == [DeliveryState.DEAD, DeliveryState.DEAD]
    assert all("no longer configured" in (d.last_error or "") for d in deliveries)
    assert proc.dead_letter_unconfigured() == 0


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="openssl CLI not installed")
def test_send_over_tls(results: list[dict[str, Any]], tmp_path: Path) -> None:
    """The sender hands its SSL context to pynetdicom: a TLS-only SCP receives the files."""
    import ssl
    import subprocess

    from pynetdicom import AE, evt

    from pacs_ai.config import TlsConfig
    from pacs_ai.ops.tls import client_context

    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "server.key", "-out", "server.crt", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        cwd=tmp_path, check=True, capture_output=True, timeout=60,
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    got: list[str] = []

    def on_store(event: Any) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="TLSSCP")
    for uid in (str(results[0]["source"].SOPClassUID), "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"):
        ae.add_supported_context(uid, ["1.2.840.10008.1.2.1"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_ctx,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        dest = Destination(name="tls", ae_title="TLSSCP", host="127.0.0.1", port=port,
                           tls=TlsConfig(ca_file=tmp_path / "server.crt"))
        ctx = client_context(dest.tls)
        r = results[1]
        send_files(dest, [Path(r["sc"]), Path(r["sr"])], calling_ae_title="PACSAI", timeout_s=10, ssl_context=ctx)
        assert got == [r["sc_sop_instance_uid"], r["sr_sop_instance_uid"]]
        # Without TLS the same peer cannot be reached: a transient failure, not a silent success.
        with pytest.raises(DeliveryError) as info:
            send_files(dest, [Path(r["sc"])], calling_ae_title="PACSAI", timeout_s=5)
        assert not info.value.permanent
    finally:
        server.shutdown()
