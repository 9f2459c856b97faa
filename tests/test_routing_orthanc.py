"""Routing with real peers: the daemon (``pacs-ai serve``) with a model whose card has the reference
model's intended use, Orthanc as its destination. A chest radiograph ends ``skipped`` with the rule
named and nothing of its study reaches Orthanc; a hip radiograph sent in the same association is
analysed and its SC and SR arrive."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pacs_ai.infer.model_card import load_card, save_card
from support.daemon_harness import Daemon, shared_model
from support.orthanc import OrthancServer, orthanc_available
from support.routing_samples import chest, variant

pytestmark = [pytest.mark.orthanc]

REPO = Path(__file__).resolve().parents[1]


def model_with_intended_use(folder: Path) -> Path:
    """The shared random test model with the bundled reference model's ``intended_use`` section."""
    shutil.copytree(shared_model("resnet50", 64), folder)
    card = load_card(folder)
    card.intended_use = load_card(REPO / "models" / "reference").intended_use
    save_card(folder, card)
    return folder


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed (Debian package orthanc)")
def test_chest_radiograph_is_skipped_and_nothing_is_sent(tmp_path: Path) -> None:
    model = model_with_intended_use(tmp_path / "model")
    chest_file = chest(tmp_path / "in")
    hip_file = variant(tmp_path / "in", "hip")
    chest_ds, hip_ds = pydicom.dcmread(chest_file), pydicom.dcmread(hip_file)
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        dest = {"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
        with Daemon(tmp_path / "d", model=model, destinations=[dest]) as daemon:
            assert daemon.send([chest_file, hip_file]).statuses == [0, 0]
            jobs = daemon.wait_settled([chest_ds.SOPInstanceUID, hip_ds.SOPInstanceUID], timeout=120)
            skipped, done = jobs[chest_ds.SOPInstanceUID], jobs[hip_ds.SOPInstanceUID]
            assert str(skipped.state) == "skipped", daemon.log_tail()
            assert skipped.result["routing"]["rule"] == "intended_use.body_part"
            assert str(done.state) == "done" and done.result["routing"]["rule"] == "intended_use"
            # the hip's results reach Orthanc; wait for them, then check the chest study got nothing
            assert daemon.wait_until(lambda: len(orthanc.instances_of_study(hip_ds.StudyInstanceUID)) == 2, 90)
            assert orthanc.instances_of_study(chest_ds.StudyInstanceUID) == []
            assert daemon.jobs().list_deliveries(job_id=skipped.id) == []
            assert not (daemon.data_dir / "results" / str(skipped.id)).exists()
            listing = subprocess.run(
                [sys.executable, "-m", "pacs_ai", "jobs", "list", "--state", "skipped", "--config", str(daemon.config_path)],
                capture_output=True, text=True, timeout=60,
            )
            assert listing.returncode == 0, listing.stderr
            assert "skipped by rule intended_use.body_part: outside the model's intended use: body part CHEST" in listing.stdout
            print(listing.stdout)
