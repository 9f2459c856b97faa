"""One association per destination kept open across a burst of deliveries (pacs_ai/send/link.py), against
a real pynetdicom Storage SCP (tests/support/dest_scp.py) that records which association each object came
in, and how each association ended; and a real SQLite job store.

What must hold: the jobs of a burst go over one association; it is released (not aborted) once idle; a
peer that drops it (while idle, or at the next C-STORE) gets a new one and nothing is lost or recorded as
delivered without the peer's success.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from pacs_ai.config import Destination
from pacs_ai.infer.preprocess import InputSpec, dicom_to_gray, prepare
from pacs_ai.queue.jobstore import DeliveryState, JobStore, RetryPolicy
from pacs_ai.send.deliveries import DeliveryProcessor
from pacs_ai.write.results import write_results
from support.dest_scp import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, DestSCP
from support.job_results import job_result

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "cr_hip_mono2_small.dcm"
JOBS = 5


class _Prediction:
    probability, fractured, threshold, label = 0.8, True, 0.5, "fractured"
    model_name, model_version, architecture = "fracture-resnet50", "0.0.1", "resnet50"

    def __init__(self) -> None:
        yy, xx = np.mgrid[0:64, 0:64]
        self.cam = np.exp(-(((xx - 40) / 6.0) ** 2 + ((yy - 20) / 6.0) ** 2)).astype(np.float32)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """SC + SR of JOBS images (same pixels, their own UIDs)."""
    base = pydicom.dcmread(SAMPLE)
    prepared = prepare(dicom_to_gray(base), InputSpec(size=64))
    out = []
    for i in range(JOBS):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        r: dict[str, Any] = write_results(ds, prepared, _Prediction(), tmp_path_factory.mktemp(f"r{i}")).files.to_json()
        r["source"] = ds
        out.append(r)
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _setup(
    tmp_path: Path, scp: DestSCP, results: list[dict[str, Any]], keep_open_s: float = 30.0, associations: int = 1
) -> tuple[JobStore, DeliveryProcessor, list[int]]:
    store = JobStore(
        f"sqlite:///{tmp_path / 'jobs.db'}", delivery_policy=RetryPolicy(3, 0.0, 0.0), upgrade=True
    )
    ids = []
    for r in results:
        ds = r["source"]
        ids.append(store.enqueue(
            sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            calling_aet="MODALITY", spool_path="/nonexistent", sha256=str(ds.SOPInstanceUID), size=1,
        ).job_id)
    dest = Destination(name="pacs", ae_title=scp.ae_title, host="127.0.0.1", port=scp.port)
    proc = DeliveryProcessor(store, [dest], tmp_path / "outbox", calling_ae_title="PACSAI", owner="d1", timeout_s=10,
                             batch_size=2, keep_open_s=keep_open_s, associations=associations)
    return store, proc, ids


def _finish(store: JobStore, job_ids: list[int], results: list[dict[str, Any]], all_ids: list[int]) -> None:
    """Mark these jobs done (each gets a pending delivery to "pacs")."""
    by_id = dict(zip(all_ids, results, strict=True))
    for job in store.claim("worker", limit=len(job_ids)):
        assert job.id in job_ids
        r = by_id[job.id]
        store.complete(job.id, "worker", job_result({"files": {k: r[k] for k in ("sc", "sr", "overlay")}}), ["pacs"])


def _deliver_all(proc: DeliveryProcessor) -> None:
    while proc.run_once():
        pass


def _expected(results: list[dict[str, Any]]) -> set[str]:
    return {r[k] for r in results for k in ("sc_sop_instance_uid", "sr_sop_instance_uid")}


def _all_delivered_at_first_attempt(store: JobStore, scp: DestSCP, results: list[dict[str, Any]]) -> list[Any]:
    """Every delivery done without a failed attempt, every result object stored exactly once; the
    objects the PACS stored, in order."""
    deliveries = store.list_deliveries()
    assert {d.state for d in deliveries} == {DeliveryState.DONE}
    assert all(d.attempts == 1 for d in deliveries), [d.last_error for d in deliveries if d.attempts != 1]
    stored = scp.stored()
    assert {s.sop_instance_uid for s in stored} == _expected(results) and len(stored) == 2 * len(results)
    return stored


def test_a_burst_goes_over_one_association_released_once_idle(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    with DestSCP() as scp:
        store, proc, ids = _setup(tmp_path, scp, results)
        clock = FakeClock()
        proc.links["pacs"][0].clock = clock
        _finish(store, ids[:3], results, ids)
        _deliver_all(proc)  # rounds of batch_size 2: the association outlives a round
        _finish(store, ids[3:], results, ids)
        clock.now += 10.0  # still within keep_open_s
        _deliver_all(proc)
        assert {d.state for d in store.list_deliveries()} == {DeliveryState.DONE}
        stored = scp.stored()
        assert {s.sop_instance_uid for s in stored} == _expected(results) and len(stored) == 2 * JOBS
        assert [s.sop_class_uid for s in stored] == [SECONDARY_CAPTURE, COMPREHENSIVE_3D_SR] * JOBS
        assert scp.associations() == 1 and {s.association for s in stored} == {1}
        assert scp.associations_ended == [] and proc.links["pacs"][0].is_established

        assert proc.release_idle() == 0  # used 0 s ago
        clock.now += 30.5
        assert proc.release_idle() == 1
        assert scp.wait_for(lambda d: d.associations_ended == [(1, "released")], timeout=10)
        assert not proc.links["pacs"][0].is_open


def test_keep_open_zero_releases_after_every_job(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    with DestSCP() as scp:
        store, proc, ids = _setup(tmp_path, scp, results[:2], keep_open_s=0.0)
        _finish(store, ids, results[:2], ids)
        _deliver_all(proc)
        assert scp.wait_for(lambda d: len(d.associations_ended) == 2, timeout=10)
        assert scp.associations_ended == [(1, "released"), (2, "released")] and not proc.links["pacs"][0].is_open
        assert [s.association for s in scp.stored()] == [1, 1, 2, 2]


def test_an_association_the_peer_dropped_while_idle_is_opened_again(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    with DestSCP() as scp:
        store, proc, ids = _setup(tmp_path, scp, results)
        _finish(store, ids[:2], results, ids)
        _deliver_all(proc)
        assert scp.associations() == 1
        assert scp.drop_associations() == 1  # the PACS closes the idle association
        assert scp.wait_for(lambda d: d.associations_ended == [(1, "aborted")], timeout=10)
        deadline = time.monotonic() + 10
        while proc.links["pacs"][0].is_established and time.monotonic() < deadline:
            time.sleep(0.02)  # the A-ABORT reaches the sender's reactor thread
        _finish(store, ids[2:], results, ids)
        _deliver_all(proc)
        stored = _all_delivered_at_first_attempt(store, scp, results)  # none failed on the dropped association
        assert scp.associations() == 2 and {s.association for s in stored[4:]} == {2}


def test_an_association_the_peer_drops_at_the_next_c_store_is_opened_again(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    with DestSCP() as scp:
        store, proc, ids = _setup(tmp_path, scp, results)
        _finish(store, ids[:1], results, ids)
        _deliver_all(proc)
        # The next object that arrives makes the PACS drop the (reused) association without answering.
        victim = results[1]["sc_sop_instance_uid"]
        scp.abort_on(lambda ds: str(ds.SOPInstanceUID) == victim)
        _finish(store, ids[1:], results, ids)
        _deliver_all(proc)
        # Nothing lost, nothing twice: the SC the peer never answered was sent again on association 2.
        stored = _all_delivered_at_first_attempt(store, scp, results)
        assert next(s.association for s in stored if s.sop_instance_uid == victim) == 2
        assert scp.associations() == 2 and (1, "aborted") in scp.associations_ended


@pytest.mark.parametrize("associations", [1, 2], ids=["one-association", "side-by-side"])
def test_a_refusal_on_a_kept_association_is_recorded_and_the_association_stays(
    tmp_path: Path, results: list[dict[str, Any]], associations: int
) -> None:
    """Delivered only on the peer's success: an SR refused with 0xC000 on a kept association (the shared
    one, or with two associations the second) is not recorded as delivered (its SC is), and the next jobs
    still go over the same association(s)."""
    with DestSCP() as scp:
        store, proc, ids = _setup(tmp_path, scp, results[:3], associations=associations)
        refused = results[1]["sr_sop_instance_uid"]
        scp.refuse(lambda ds: str(ds.SOPInstanceUID) == refused, 0xC000)
        _finish(store, ids, results[:3], ids)
        _deliver_all(proc)
        by_job = {d.job_id: d for d in store.list_deliveries()}
        assert by_job[ids[0]].state == by_job[ids[2]].state == DeliveryState.DONE
        bad = by_job[ids[1]]
        assert bad.state == DeliveryState.DEAD and bad.delivered_objects() == {"sc"}
        assert refused not in {s.sop_instance_uid for s in scp.stored()}
        assert scp.associations() == associations and all(link.is_established for link in proc.links["pacs"])
        proc.close()


# -- two associations at once ---------------------------------------------------------------------------


def test_side_by_side_each_job_sends_its_sc_and_sr_on_two_kept_associations(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    """``associations=2``: every job's SC and SR arrive on two different associations, the same two for the
    whole burst, both kept open and both released once idle; nothing lost or sent twice."""
    with DestSCP() as scp:
        store, proc, ids = _setup(tmp_path, scp, results, associations=2)
        clock = FakeClock()
        for link in proc.links["pacs"]:
            link.clock = clock
        _finish(store, ids, results, ids)
        _deliver_all(proc)
        deliveries = store.list_deliveries()
        assert {d.state for d in deliveries} == {DeliveryState.DONE}
        assert all(d.delivered_objects() == {"sc", "sr"} for d in deliveries)
        stored = scp.stored()
        assert {s.sop_instance_uid for s in stored} == _expected(results) and len(stored) == 2 * JOBS
        on = {s.sop_instance_uid: s.association for s in stored}
        for r in results:
            assert on[r["sc_sop_instance_uid"]] != on[r["sr_sop_instance_uid"]], "SC and SR on one association"
        assert scp.associations() == 2 and scp.associations_ended == []
        clock.now += 30.5
        assert proc.release_idle() == 2
        assert scp.wait_for(lambda d: sorted(d.associations_ended) == [(1, "released"), (2, "released")], timeout=10)
        proc.close()


def test_a_pacs_that_takes_one_association_gets_everything_over_one(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    """A PACS that rejects a second association (one per calling AE title): the first job's SR goes over
    the first association after all, and later jobs use that one only; every object stored once."""
    with DestSCP(maximum_associations=1) as scp:
        store, proc, ids = _setup(tmp_path, scp, results, associations=2)
        _finish(store, ids, results, ids)
        _deliver_all(proc)
        stored = _all_delivered_at_first_attempt(store, scp, results)  # none failed on the refused association
        assert {s.association for s in stored} == {1}
        proc.close()


def test_an_object_the_peer_confirmed_is_recorded_before_the_next_one_is_answered(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    """While the PACS holds the SR (its C-STORE not answered yet), the SC it already confirmed is recorded
    in the job store: a crash at that moment makes the retry send only the SR."""
    with DestSCP() as scp:
        store, proc, ids = _setup(tmp_path, scp, results[:1])
        sr = results[0]["sr_sop_instance_uid"]
        hold = scp.hold(lambda ds: str(ds.SOPInstanceUID) == sr)
        _finish(store, ids, results[:1], ids)
        import threading

        sender = threading.Thread(target=proc.run_once, daemon=True)
        sender.start()
        try:
            assert hold.entered.wait(30), "the SR never reached the PACS"
            (delivery,) = store.list_deliveries()
            assert delivery.state == DeliveryState.SENDING and delivery.delivered_objects() == {"sc"}
        finally:
            hold.release(store=True)
        sender.join(30)
        _deliver_all(proc)
        (delivery,) = store.list_deliveries()
        assert delivery.state == DeliveryState.DONE and delivery.delivered_objects() == {"sc", "sr"}
        proc.close()
