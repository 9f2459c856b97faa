"""A peer that aborts or disconnects in the middle of a C-STORE (issue 10, point 5).

A real pynetdicom SCU sends a field-case radiograph to the real listener in 16 KiB PDUs and, after three
P-DATA PDUs of the dataset, either sends an A-ABORT and closes its socket or just closes it. The listener
must log the calling AE title and the bytes received of the incomplete message, store nothing, create no
job, and go on serving (a complete C-STORE afterwards succeeds, and logs no such line).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt

from pacs_ai.config import ListenerConfig
from pacs_ai.queue.jobstore import JobStore
from pacs_ai.receive.listener import Listener
from pacs_ai.store.spool import Spool
from support.common import free_port

SAMPLE = Path(__file__).resolve().parent / "data" / "field_cases" / "c16_study_view1.dcm"
A_ABORT = bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00])  # PS3.8 9.3.8, source 0 (user)


def _send_and_cut(port: int, mode: str, after_pdus: int = 3) -> None:
    ae = AE(ae_title="CUTTER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    meta = pydicom.filereader.read_file_meta_info(SAMPLE)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    sent = {"n": 0}

    def on_sent(event: evt.Event) -> None:
        if getattr(event.pdu, "pdu_type", None) != 0x04:
            return
        sent["n"] += 1
        if sent["n"] == after_pdus:
            sock = event.assoc.dul.socket.socket
            if mode == "abort":
                sock.sendall(A_ABORT)
            sock.close()

    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI", evt_handlers=[(evt.EVT_PDU_SENT, on_sent)])
    assert assoc.is_established
    try:
        assoc.send_c_store(SAMPLE)
    except Exception:  # noqa: BLE001 - the socket is gone under it: whatever pynetdicom raises
        pass
    finally:
        ae.shutdown()
    assert sent["n"] >= after_pdus, "the dataset did not span enough PDUs to cut it"


@pytest.mark.parametrize("mode", ["abort", "disconnect"])
def test_peer_cut_off_mid_c_store_is_logged_and_nothing_is_stored(mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pacs_ai.receive")
    jobs = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", upgrade=True)
    spool = Spool(tmp_path / "spool")
    listener = Listener(ListenerConfig(port=free_port(), max_pdu_size=16384, network_timeout_s=10), spool, jobs)
    listener.start()
    try:
        _send_and_cut(listener.port, mode)
        deadline = time.monotonic() + 15
        lines: list[str] = []
        while time.monotonic() < deadline and not lines:
            lines = [r.getMessage() for r in caplog.records if "in the middle of a C-STORE" in r.getMessage()]
            time.sleep(0.05)
        assert len(lines) == 1, lines
        line = lines[0]
        assert "CUTTER" in line and ("aborted (A-ABORT)" if mode == "abort" else "disconnected") in line
        received = int(line.split(" bytes of an incomplete message")[0].rsplit(" ", 1)[1])
        # At most the three 16 KiB PDUs sent (the last may be lost with the socket), at least one.
        assert 16384 <= received <= 3 * (16384 + 6)
        assert jobs.counts().get("queued", 0) == 0
        assert not [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]

        # Serving goes on: a complete C-STORE is stored and logs no cut-off line.
        caplog.clear()
        ae = AE(ae_title="SENDER")
        meta = pydicom.filereader.read_file_meta_info(SAMPLE)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACSAI")
        assert assoc.is_established
        assert int(assoc.send_c_store(SAMPLE).Status) == 0
        assoc.release()
        assert jobs.counts().get("queued", 0) == 1
        assert not [r for r in caplog.records if "in the middle of a C-STORE" in r.getMessage()]
    finally:
        listener.stop(grace_s=2)
        jobs.close()
