"""Shadow models: scored in the worker's pass on the already-decoded image, stored beside the live
result, never sent; the report's agreement, distributions and drift (PSI).

Expected values: PSI worked out by hand from its definition; the shadow probabilities checked against the
shadow engine run on its own (its own decode of the same file) outside the worker.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch

import pacs_ai.daemon.worker as worker_module
from pacs_ai.daemon.worker import Worker
from pacs_ai.infer.engine import InferenceEngine
from pacs_ai.infer.model_card import load_card, save_card
from pacs_ai.infer.preprocess import dicom_to_gray, prepare
from pacs_ai.queue.jobstore import JobState, JobStore, RetryPolicy
from pacs_ai.results import JobResult
from pacs_ai.shadow.drift import histogram, psi, quantile_edges
from pacs_ai.shadow.scoring import ShadowScorer
from support.common import copies
from support.daemon_harness import Daemon, shared_model
from support.model_factory import model_folder
from support.orthanc import OrthancServer, orthanc_available
from test_worker import enqueue, png_writer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "cr_hip_mono2_small.dcm"
TIBIA = REPO / "tests" / "data" / "cr_tibia_mono1_small.dcm"


def test_psi_by_hand() -> None:
    # reference 50/50, now 25/75: (0.25-0.5) ln(0.25/0.5) + (0.75-0.5) ln(0.75/0.5)
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    assert psi([10, 0], [5, 5]) > 1.0  # an empty reference bin is floored, not infinite
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])


def test_quantile_edges_and_histogram() -> None:
    values = [i / 100 for i in range(100)]
    edges = quantile_edges(values, 4)
    assert edges[0] == 0.0 and edges[-1] == 1.0 and len(edges) == 5
    assert histogram(values, edges) == [25, 25, 25, 25]
    assert histogram([1.0], [0.0, 0.5, 1.0]) == [0, 1]


@pytest.fixture(scope="module")
def engines():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    live = InferenceEngine([model_folder("resnet50")], device="cpu", threads=1)
    same = InferenceEngine([model_folder("densenet121")], device="cpu", threads=1)  # same 64 px input
    other = InferenceEngine([model_folder("resnet50", size=96, seed=3, version="0.0.2-shadow")], device="cpu", threads=1)
    yield live, same, other
    torch.set_num_threads(before)


def test_worker_scores_shadows_on_the_same_decode(engines, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    live, same, other = engines
    assert same.spec == live.spec and other.spec != live.spec
    decodes: list[str] = []
    real = worker_module.dicom_to_gray

    def counting(ds, **kw):  # type: ignore[no-untyped-def]
        decodes.append(str(ds.SOPInstanceUID))
        return real(ds, **kw)

    monkeypatch.setattr(worker_module, "dicom_to_gray", counting)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", RetryPolicy(3, 0.0, 0.0), upgrade=True)
    files = [SAMPLE, TIBIA]
    ids = [enqueue(store, f) for f in files]
    worker = Worker(store, live, png_writer, tmp_path / "results", ["pacs"], owner="w1", shadow=ShadowScorer([same, other]))
    assert worker.run_once() == 2
    assert len(decodes) == 2  # one decode per image for the live model and both shadows
    for job_id, path in zip(ids, files, strict=True):
        job = store.get(job_id)
        assert job.state is JobState.DONE
        shadow = job.result["shadow"]
        assert [(s["model_name"], s["model_version"]) for s in shadow] == [
            (same.model_name, same.model_version), (other.model_name, other.model_version)
        ]
        gray = dicom_to_gray(pydicom.dcmread(path))  # the shadows on their own, outside the worker
        for entry, engine in zip(shadow, (same, other), strict=True):
            alone = engine.predict([prepare(gray, engine.spec)], with_cam=False)[0]
            assert entry["probability"] == pytest.approx(alone.probability, abs=1e-5)
            assert entry["fractured"] == alone.fractured
        # the stored JSON reads back as the typed record and is written again in the same one shape
        read = JobResult.from_json(job.result)
        assert [(s.model_name, s.scored) for s in read.shadow] == [(same.model_name, True), (other.model_name, True)]
        assert read.to_json() == job.result
    store.close()


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed (Debian package orthanc)")
def test_shadow_results_stored_not_sent_and_reported(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shutil.copytree(model_folder("densenet121"), shadow)
    card = load_card(shadow)
    card.name, card.version = "shadow-densenet", "2.0.0-candidate"
    # the validation distribution a card carries (here: made up for a random-weight model)
    card.validation_distribution = {"bin_edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [40, 30, 20, 10], "n": 100}
    save_card(shadow, card)
    files = copies(SAMPLE, tmp_path / "in", 3, new_study=True)
    sops = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        dest = {"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
        live = shared_model("resnet50", 64)
        with Daemon(tmp_path / "d", model=live, destinations=[dest], overrides={"model": {"shadow": [str(shadow)]}}) as daemon:
            assert daemon.send(files).statuses == [0, 0, 0]
            jobs = daemon.wait_settled(sops, timeout=120)
            assert all(str(j.state) == "done" for j in jobs.values()), daemon.log_tail()
            for job in jobs.values():
                (entry,) = job.result["shadow"]
                assert (entry["model_name"], entry["model_version"]) == ("shadow-densenet", "2.0.0-candidate")
                assert 0.0 <= entry["probability"] <= 1.0
            assert daemon.wait_until(lambda: len(orthanc.sop_uids()) == 6, 90), daemon.log_tail()
            # only the live model's SC and SR reached the PACS: nothing names the shadow model
            for study in orthanc.get("/studies"):
                for inst in orthanc.get(f"/studies/{study}/instances"):
                    raw = orthanc.get(f"/instances/{inst['ID']}/file", raw=True)[0]
                    assert b"shadow-densenet" not in raw and b"2.0.0-candidate" not in raw
            png = tmp_path / "report.png"
            out = subprocess.run(
                [sys.executable, "-m", "pacs_ai", "shadow", "report", "--since", "1h", "--png", str(png),
                 "--config", str(daemon.config_path)],
                capture_output=True, text=True, timeout=120,
            )
            assert out.returncode == 0, out.stderr
            print(out.stdout)
            same = sum(j.result["shadow"][0]["fractured"] == j.result["fractured"] for j in jobs.values())
            assert f"agreement with live  {same / 3:.1%}" in out.stdout
            assert "shadow  shadow-densenet 2.0.0-candidate" in out.stdout and "images scored        3" in out.stdout
            probs = [j.result["shadow"][0]["probability"] for j in jobs.values()]
            now = [sum(lo <= p < hi or (hi == 1.0 and p == 1.0) for p in probs) / 3 for lo, hi in ((0, .25), (.25, .5), (.5, .75), (.75, 1.0))]
            ref = [0.4, 0.3, 0.2, 0.1]
            expected = sum((max(a, 1e-4) - e) * math.log(max(a, 1e-4) / e) for a, e in zip(now, ref, strict=True))
            assert f"drift (PSI)          {expected:.3f}" in out.stdout
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
