"""The field cases end to end (issue 10): the real daemon (``pacs-ai serve``) receives every committed
field case (tests/data/field_cases) and delivers its results to a restrictive PACS: a pynetdicom Storage
SCP that accepts only Implicit VR Little Endian and does not take Comprehensive 3D SR.

Every case must end ``done`` (none ``result_not_writable``), and the PACS must hold an SC and an SR of
every case, each passing dciodvfy without errors; c07 keeps its character set and name bytes; the two
views of c16 do not collide in series or instance number; no job leaves an empty results folder.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from support.daemon_harness import Daemon, shared_model
from support.dest_scp import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, DestSCP

FIELD_CASES = Path(__file__).resolve().parent / "data" / "field_cases"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_field_cases_through_the_daemon_to_a_restrictive_pacs(tmp_path: Path) -> None:
    files = sorted(FIELD_CASES.glob("*.dcm"))
    assert len(files) == 7
    sources = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}
    received = tmp_path / "pacs"
    with DestSCP(
        ae_title="RESTRICT",
        transfer_syntaxes=[ImplicitVRLittleEndian],
        refuse_sop_classes=frozenset({COMPREHENSIVE_3D_SR}),
        save_dir=received,
    ) as pacs, Daemon(tmp_path / "daemon", model=shared_model(), destinations=[pacs]) as daemon:
        result = daemon.send(files)
        assert result.statuses == [0] * len(files)
        jobs = daemon.wait_settled(sources, timeout=180)
        states = {uid: (j.state.value if hasattr(j.state, "value") else str(j.state), j.last_error) for uid, j in jobs.items()}
        assert all(s == "done" for s, _ in states.values()), states
        assert pacs.wait_for(lambda d: len(d.stored()) >= 2 * len(files), timeout=120), daemon.log_tail()
        stored = pacs.stored()
        assert {s.transfer_syntax for s in stored} == {ImplicitVRLittleEndian}
        by_source: dict[str, dict[str, pydicom.Dataset]] = {}
        for s in stored:
            ds = pydicom.dcmread(received / f"{s.sop_instance_uid}.dcm")
            assert _dciodvfy_errors(received / f"{s.sop_instance_uid}.dcm") == [], s.sop_instance_uid
            ref = s.referenced_sop_instance_uids[0]
            kind = "sc" if s.sop_class_uid == SECONDARY_CAPTURE else "sr"
            assert kind == "sc" or s.sop_class_uid == COMPREHENSIVE_SR
            by_source.setdefault(ref, {})[kind] = ds
        assert set(by_source) == set(sources) and all(set(v) == {"sc", "sr"} for v in by_source.values())

        for uid, src in sources.items():
            for obj in by_source[uid].values():
                assert obj.StudyInstanceUID == src.StudyInstanceUID and obj.PatientID == src.PatientID
                if "SpecificCharacterSet" in src:
                    assert list(obj.SpecificCharacterSet) == list(src.SpecificCharacterSet)
                    assert obj.PatientName.original_string.rstrip(b" ") == src.PatientName.original_string.rstrip(b" ")
        series_numbers = [int(o.SeriesNumber) for v in by_source.values() for o in v.values()]
        assert len(set(series_numbers)) == 2 * len(files), "series numbers collide"
        sc_instances = [int(v["sc"].InstanceNumber) for v in by_source.values()]
        assert len(set(sc_instances)) == len(files), "instance numbers collide"
        results_dir = daemon.data_dir / "results"
        if results_dir.is_dir():
            assert not [p for p in results_dir.iterdir() if p.is_dir() and not any(p.iterdir())]
