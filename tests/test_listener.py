"""The listener against real senders (pynetdicom and dcmtk storescu) on 127.0.0.1.

Every instance acknowledged with 0x0000 must be in the spool byte-exact (the dataset as sent, after the
file meta) and queued exactly once; failures answer an error status and lose nothing.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification

from pacs_ai.config import ListenerConfig
from pacs_ai.queue.jobstore import JobState, JobStore
from pacs_ai.receive import contexts as cx
from pacs_ai.receive.listener import Listener
from pacs_ai.store.spool import Spool
from support.common import REPO_ROOT, STORE_ERROR_LINE, copies, free_port, have_tool
from support.job_results import job_result

STORESCU_FLAGS = {  # transfer syntax of the file -> storescu option proposing it
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.5": "-xr",
}
PHI = ("CompressedSamples", "10RG2", "11RG3", "19790408")
needs_storescu = pytest.mark.skipif(not have_tool("storescu"), reason="dcmtk storescu not installed")


class Recorder:
    """An Observer that keeps every event."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *args: self.events.append((name, *args))

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [e[1:] for e in self.events if e[0] == name]


class Served:
    def __init__(self, listener: Listener, jobs: JobStore, spool: Spool, observer: Recorder) -> None:
        self.listener, self.jobs, self.spool, self.observer = listener, jobs, spool, observer

    @property
    def port(self) -> int:
        return self.listener.port


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[Served] = []

    def start(spool_root: Path | None = None, busy_timeout_s: float = 30.0, **listener: Any) -> Served:
        config = ListenerConfig(port=free_port(), network_timeout_s=20.0, **listener)
        jobs = JobStore(f"sqlite:///{tmp_path / 'pacs-ai.db'}", busy_timeout_s=busy_timeout_s, upgrade=True)
        spool = Spool(spool_root or tmp_path / "spool")
        observer = Recorder()
        server = Served(Listener(config, spool, jobs, observer=observer), jobs, spool, observer)
        server.listener.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.listener.stop(grace_s=2)
        server.jobs.close()


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # Send files as their encoded bytes (own transfer syntax, no decode/re-encode), like a PACS router.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def meta(path: Path) -> pydicom.Dataset:
    return pydicom.filereader.read_file_meta_info(path)


def dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def send(port: int, files: Sequence[Path], aet: str = "SENDER", called: str = "PACSAI") -> list[int | None]:
    """Send ``files`` over one association with pynetdicom; the status of each (None: no answer)."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for pair in dict.fromkeys((str(meta(f).MediaStorageSOPClassUID), str(meta(f).TransferSyntaxUID)) for f in files):
        ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    statuses: list[int | None] = []
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        assoc.release()
    return statuses


def echo(port: int, aet: str = "SENDER") -> bool:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return "Status" in rsp and rsp.Status == 0
    finally:
        assoc.release()


def storescu(port: int, files: Sequence[Path], flag: str, aet: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aet", aet, "-aec", "PACSAI", flag, "-R", "-to", "20", "-ta", "20", "-td", "20",
         "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def same_dataset(a: Path, b: Path) -> bool:
    """Same elements and values (pixel data byte for byte), ignoring length encoding and trailing padding."""
    da, db = pydicom.dcmread(a), pydicom.dcmread(b)
    if da.PixelData != db.PixelData:
        return False
    strip = lambda ds: {e.tag: e.value for e in ds if e.tag.element != 0 and e.tag not in (0x7FE00010, 0xFFFCFFFC)}  # noqa: E731
    return strip(da) == strip(db)


def assert_stored_exact(server: Served, original: Path, *, byte_exact: bool = True) -> None:
    """The spool copy carries the dataset, right UIDs and transfer syntax; exactly one job.

    ``byte_exact``: the dataset after the file meta is the original's byte for byte (pynetdicom sends
    a file's bytes as they are). dcmtk's storescu re-encodes the dataset it reads (for instance item and
    sequence lengths), so for it elements and pixel data are compared instead.
    """
    uid = str(meta(original).MediaStorageSOPInstanceUID)
    stored = server.spool.path_for(uid)
    assert stored.is_file(), f"{original.name} not in the spool"
    if byte_exact:
        assert dataset_bytes(stored) == dataset_bytes(original), f"{original.name} stored bytes differ"
    else:
        assert same_dataset(stored, original), f"{original.name} stored dataset differs"
    stored_meta = meta(stored)
    assert stored_meta.MediaStorageSOPInstanceUID == uid
    assert stored_meta.TransferSyntaxUID == meta(original).TransferSyntaxUID
    job = server.jobs.find_by_sop_uid(uid)
    assert job is not None and job.spool_path == str(stored)
    assert job.size == stored.stat().st_size and job.state is JobState.QUEUED
    assert [j.sop_instance_uid for j in server.jobs.list_jobs(limit=10_000)].count(uid) == 1


# -- real images, real senders -----------------------------------------------------------------------


@needs_storescu
def test_committed_samples_with_pynetdicom_and_storescu(serve, chunked_send, sample_files: list[Path], tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    assert send(server.port, sample_files) == [0] * len(sample_files)
    for f in sample_files:
        assert_stored_exact(server, f)
    assert send(server.port, sample_files) == [0] * len(sample_files)  # resend: duplicates, no new job
    received = server.observer.of("image_received")
    assert [r[3] for r in received] == [False] * len(sample_files) + [True] * len(sample_files)
    # dcmtk storescu, as its own sender (fresh UIDs so these are new instances).
    fresh = [copies(f, tmp_path / f"fresh{i}", 1)[0] for i, f in enumerate(sample_files)]
    for f in fresh:
        result = storescu(server.port, [f], STORESCU_FLAGS[str(meta(f).TransferSyntaxUID)])
        assert result.returncode == 0, result.stderr
        assert_stored_exact(server, f, byte_exact=False)
        assert storescu(server.port, [f], STORESCU_FLAGS[str(meta(f).TransferSyntaxUID)]).returncode == 0
    assert server.jobs.counts()["queued"] == 2 * len(sample_files)
    assert [r[3] for r in server.observer.of("image_received")[2 * len(sample_files):]] == [False, True] * len(fresh)


def test_wg04_every_encoding_with_pynetdicom(serve, chunked_send, wg04_files, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    server = serve()
    assert send(server.port, wg04_files) == [0] * len(wg04_files)
    for f in wg04_files:
        assert_stored_exact(server, f)
    assert server.jobs.counts()["queued"] == len(wg04_files) == 10
    assert send(server.port, wg04_files) == [0] * len(wg04_files)  # resend: no duplicates
    assert len(server.jobs.list_jobs()) == 10
    assert sum("duplicate" in r.getMessage() for r in caplog.records) == 10
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert not [p for p in PHI if p in text], "patient attributes in the log"


@needs_storescu
@pytest.mark.parametrize("syntax", sorted(STORESCU_FLAGS))
def test_wg04_every_encoding_with_storescu(serve, wg04_files, syntax: str) -> None:  # type: ignore[no-untyped-def]
    files = [f for f in wg04_files if str(meta(f).TransferSyntaxUID) == syntax]
    assert len(files) == 2
    server = serve()
    result = storescu(server.port, files, STORESCU_FLAGS[syntax])
    assert result.returncode == 0, result.stderr
    for f in files:
        assert_stored_exact(server, f, byte_exact=False)
    assert storescu(server.port, files, STORESCU_FLAGS[syntax]).returncode == 0  # resend
    assert len(server.jobs.list_jobs()) == 2
    assert [r[3] for r in server.observer.of("image_received")] == [False, False, True, True]


def test_implicit_and_deflated_syntaxes(serve, chunked_send, sample_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

    files = []
    for syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds = pydicom.dcmread(sample_file)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = syntax
        path = tmp_path / f"{syntax.name.split()[0]}.dcm"
        ds.save_as(path, enforce_file_format=True, implicit_vr=syntax.is_implicit_VR, little_endian=True)
        files.append(path)
    server = serve()
    assert send(server.port, files) == [0, 0]
    for f in files:
        assert_stored_exact(server, f)
        job = server.jobs.find_by_sop_uid(str(meta(f).MediaStorageSOPInstanceUID))
        assert job is not None and job.series_instance_uid == pydicom.dcmread(sample_file).SeriesInstanceUID


def test_same_uid_with_changed_content_requeues_the_job(serve, chunked_send, sample_file, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    server = serve()
    assert server.listener.ae.maximum_pdu_size == 0  # config.max_pdu_size: unlimited
    assert send(server.port, [sample_file]) == [0]
    uid = str(meta(sample_file).MediaStorageSOPInstanceUID)
    first = server.jobs.find_by_sop_uid(uid)
    assert first is not None
    (claimed,) = server.jobs.claim("worker")
    corrected = craft(tmp_path, sample_file, "corrected.dcm", lambda ds: setattr(ds, "StudyDescription", "HIP (corrected)"))
    assert send(server.port, [corrected]) == [0]
    job = server.jobs.find_by_sop_uid(uid)
    assert job is not None and job.id == first.id and job.state is JobState.QUEUED and job.attempts == 0
    assert job.sha256 != first.sha256 and len(server.jobs.list_jobs()) == 1
    assert dataset_bytes(server.spool.path_for(uid)) == dataset_bytes(corrected)
    assert any("UID collision with changed content" in r.getMessage() for r in caplog.records)
    assert server.observer.of("image_received")[-1][3] is False  # not a plain duplicate


def test_resend_with_other_sender_and_trailing_padding_is_a_duplicate(serve, chunked_send, sample_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same data set from another AE and with a Data Set Trailing Padding element is the same instance."""
    server = serve()
    assert send(server.port, [sample_file], aet="ROUTER-A") == [0]
    uid = str(meta(sample_file).MediaStorageSOPInstanceUID)
    first = server.jobs.find_by_sop_uid(uid)
    assert first is not None
    (claimed,) = server.jobs.claim("worker")
    server.jobs.complete(claimed.id, "worker", job_result({"probability": 0.1}), [])
    assert 0xFFFCFFFC in pydicom.dcmread(sample_file)  # the WG-04 sample carries trailing padding
    unpadded = craft(tmp_path, sample_file, "unpadded.dcm", lambda ds: ds.__delitem__(0xFFFCFFFC))  # as dcmtk sends it
    padded = craft(tmp_path, sample_file, "padded.dcm", lambda ds: setattr(ds, "DataSetTrailingPadding", b"\xfc\xff" * 64))
    assert len({dataset_bytes(f) for f in (sample_file, unpadded, padded)}) == 3  # the wire bytes really differ
    assert send(server.port, [unpadded], aet="ROUTER-B") == [0]
    assert send(server.port, [padded], aet="ROUTER-C") == [0]
    job = server.jobs.find_by_sop_uid(uid)
    assert job is not None and job.id == first.id and job.state is JobState.DONE  # not re-queued
    assert [r[3] for r in server.observer.of("image_received")] == [False, True, True]  # plain duplicates


@needs_storescu
@pytest.mark.parametrize("name", ["RG2_J2KR.dcm", "RG3_JLSL.dcm"])
def test_same_file_from_storescu_and_pynetdicom_is_a_duplicate(serve, chunked_send, wg04_files, name: str) -> None:  # type: ignore[no-untyped-def]
    """dcmtk rewrites undefined-length sequences as defined-length ones: the wire bytes differ, the instance does not."""
    (original,) = [f for f in wg04_files if f.name == name]
    server = serve()
    uid = str(meta(original).MediaStorageSOPInstanceUID)
    result = storescu(server.port, [original], STORESCU_FLAGS[str(meta(original).TransferSyntaxUID)], aet="DCMTK")
    assert result.returncode == 0, result.stderr
    first = server.jobs.find_by_sop_uid(uid)
    assert first is not None
    from_dcmtk = dataset_bytes(server.spool.path_for(uid))
    assert from_dcmtk != dataset_bytes(original)  # independent fact: storescu re-encoded the data set
    assert same_dataset(server.spool.path_for(uid), original)  # ... with the same elements and values
    (claimed,) = server.jobs.claim("worker")
    server.jobs.complete(claimed.id, "worker", job_result({"probability": 0.1}), [])
    assert send(server.port, [original], aet="PYNETDICOM") == [0]  # the file's own bytes
    job = server.jobs.find_by_sop_uid(uid)
    assert job is not None and job.id == first.id and job.state is JobState.DONE  # not re-queued
    assert job.sha256 == first.sha256 and len(server.jobs.list_jobs()) == 1
    assert [r[3] for r in server.observer.of("image_received")] == [False, True]  # a plain duplicate


def test_sop_classes_we_do_not_take_are_not_negotiated(serve) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom.sop_class import ComputedRadiographyImageStorage, MRImageStorage

    server = serve()
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.2"])  # big endian: not taken
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSAI")
    assert assoc.is_established
    try:
        accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
        assert accepted == {Verification}
    finally:
        assoc.release()


# -- association control ------------------------------------------------------------------------------


def test_unknown_calling_ae_is_refused(serve, sample_file: Path, chunked_send) -> None:  # type: ignore[no-untyped-def]
    server = serve(allowed_calling_aets=("ROUTER",))
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSAI")
    assert assoc.is_rejected and not assoc.is_established
    if have_tool("storescu"):
        result = storescu(server.port, [sample_file], "-xe", aet="STRANGER")
        assert result.returncode != 0 and "Rejected" in result.stderr + result.stdout
    assert send(server.port, [sample_file], aet="ROUTER") == [0]
    assert server.jobs.counts()["queued"] == 1
    rejected = [e for e in server.observer.of("association") if not e[2]]
    assert rejected and all(e[0] == "STRANGER" and "not allowed" in e[3] for e in rejected)
    assert ("ROUTER", True) in [(e[0], e[2]) for e in server.observer.of("association")]


def test_max_associations(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(max_associations=1)
    ae = AE(ae_title="FIRST")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", server.port, ae_title="PACSAI")
    assert held.is_established
    try:
        second = AE(ae_title="SECOND")
        second.add_requested_context(Verification)
        assoc = second.associate("127.0.0.1", server.port, ae_title="PACSAI")
        assert assoc.is_rejected
        assert any(e[0] == "SECOND" and "too many" in e[3] for e in server.observer.of("association"))
    finally:
        held.release()
    # Once the first association has ended, a new one is accepted again (pynetdicom counts an acceptor
    # thread until it has wound down, so allow a moment).
    deadline = time.monotonic() + 10
    served = echo(server.port)
    while not served and time.monotonic() < deadline:
        time.sleep(0.1)
        served = echo(server.port)
    assert served


def test_stop_lets_the_association_in_flight_finish(serve, sample_files, chunked_send) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    f = sample_files[0]
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(str(meta(f).MediaStorageSOPClassUID), [str(meta(f).TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSAI")
    assert assoc.is_established
    stopper = threading.Thread(target=server.listener.stop, kwargs={"grace_s": 15})
    stopper.start()
    deadline = time.monotonic() + 5
    while server.listener.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.listener.running
    assert not echo(server.port)  # no longer accepting
    assert assoc.send_c_store(f).Status == 0  # but the open association is served
    assoc.release()
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    assert_stored_exact(server, f)


# -- failures: error status, nothing lost ------------------------------------------------------------


def craft(folder: Path, source: Path, name: str, change) -> Path:  # type: ignore[no-untyped-def]
    """A file whose file meta says CR image ``source``'s UIDs but whose dataset ``change`` altered."""
    ds = pydicom.dcmread(source)
    change(ds)
    path = folder / name
    ds.save_as(path, enforce_file_format=False)
    return path


def test_malformed_datasets_get_error_statuses_and_serving_goes_on(serve, chunked_send, sample_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    bad = tmp_path / "bad"
    bad.mkdir()
    no_series = craft(bad, sample_file, "no_series.dcm", lambda ds: delattr(ds, "SeriesInstanceUID"))
    empty_study = craft(bad, sample_file, "empty_study.dcm", lambda ds: setattr(ds, "StudyInstanceUID", ""))
    wrong_class = craft(
        bad, sample_file, "wrong_class.dcm", lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.4")
    )
    other_uid = craft(bad, sample_file, "other_uid.dcm", lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3.4.5"))
    garbage = bad / "garbage.dcm"
    head = sample_file.read_bytes()[: split_dataset(sample_file)[1]]
    garbage.write_bytes(head + b"\xff\xff\xff\xff" + os.urandom(5000))
    statuses = send(server.port, [no_series, empty_study, wrong_class, other_uid, garbage])
    assert statuses[:4] == [cx.STATUS_MISSING_UID, cx.STATUS_MISSING_UID, cx.STATUS_SOP_CLASS_MISMATCH,
                            cx.STATUS_INSTANCE_MISMATCH]
    assert statuses[4] is not None and 0xC000 <= statuses[4] <= 0xCFFF
    assert server.jobs.list_jobs() == []
    assert [e[0] for e in server.observer.of("image_rejected")] == statuses
    assert echo(server.port)
    assert send(server.port, [sample_file]) == [0]
    assert_stored_exact(server, sample_file)


def test_spool_blocked_answers_a700_and_loses_nothing(serve, chunked_send, sample_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "blocked-spool"
    blocker.write_text("a file where the spool directory should be")  # fails for root as well
    server = serve(spool_root=blocker)
    assert send(server.port, [sample_file]) == [cx.STATUS_OUT_OF_RESOURCES]
    assert server.jobs.list_jobs() == []
    blocker.unlink()
    assert send(server.port, [sample_file]) == [0]  # the sender's retry
    assert_stored_exact(server, sample_file)


def test_full_and_read_only_spool_answer_a700_and_lose_nothing(serve, chunked_send, sample_files, tmpfs) -> None:  # type: ignore[no-untyped-def]
    fs = tmpfs(128)  # smaller than any sample
    server = serve(spool_root=fs.path / "spool")
    assert send(server.port, sample_files) == [cx.STATUS_OUT_OF_RESOURCES] * len(sample_files)
    assert server.jobs.list_jobs() == []
    assert not [p for p in fs.path.rglob("*") if p.is_file()], "partial files left in the spool"
    fs.resize(8192)
    assert send(server.port, sample_files[:1]) == [0]
    fs.read_only()
    try:
        assert send(server.port, sample_files[1:]) == [cx.STATUS_OUT_OF_RESOURCES] * (len(sample_files) - 1)
    finally:
        fs.read_only(False)
    assert send(server.port, sample_files) == [0] * len(sample_files)
    for f in sample_files:
        assert_stored_exact(server, f)
    assert len(server.jobs.list_jobs()) == len(sample_files)


def test_database_trouble_answers_a700(serve, chunked_send, sample_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    server = serve(busy_timeout_s=0.3)
    holder = sqlite3.connect(tmp_path / "pacs-ai.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the database
    try:
        assert send(server.port, [sample_file]) == [cx.STATUS_OUT_OF_RESOURCES]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert server.jobs.list_jobs() == []
    assert send(server.port, [sample_file]) == [0]
    assert_stored_exact(server, sample_file)


# -- crash: SIGKILL while receiving -------------------------------------------------------------------

SERVER_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from pacs_ai.config import load_config
    from pacs_ai.queue.jobstore import JobStore
    from pacs_ai.receive.listener import Listener
    from pacs_ai.store.spool import Spool

    config = load_config(Path(sys.argv[1]))
    jobs = JobStore(config.database_url, upgrade=True)
    listener = Listener(config.listener, Spool(config.storage.spool), jobs)
    listener.start()
    print("READY", listener.port, flush=True)
    signal.signal(signal.SIGTERM, lambda *a: (listener.stop(), sys.exit(0)))
    while True:
        signal.pause()
    """
)


def start_server(script: Path, config: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(script), str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("READY"):
        proc.kill()
        pytest.fail(f"listener subprocess did not start: {line!r}")
    return proc


def test_sigkill_while_receiving_loses_no_acknowledged_image(chunked_send, sample_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    config = tmp_path / "pacs-ai.toml"
    config.write_text(f'[listener]\nport = {port}\n[storage]\ndata_dir = "data"\n')
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT)
    files = copies(sample_files[-1], tmp_path / "images", 50)

    proc = start_server(script, config)
    statuses: dict[Path, int | None] = {}
    kill_after = 20

    def killer() -> None:
        deadline = time.monotonic() + 60
        while sum(s == 0 for s in statuses.values()) < kill_after and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)

    thread = threading.Thread(target=killer)
    thread.start()
    ae = AE(ae_title="SENDER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(str(meta(files[0]).MediaStorageSOPClassUID), [str(meta(files[0]).TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    for f in files:
        if not assoc.is_established:
            statuses[f] = None
            continue
        try:
            rsp = assoc.send_c_store(f)
            statuses[f] = int(rsp.Status) if "Status" in rsp else None
        except (RuntimeError, OSError):
            statuses[f] = None
    if assoc.is_established:
        assoc.abort()
    thread.join(timeout=60)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    acknowledged = [f for f, s in statuses.items() if s == 0]
    assert kill_after <= len(acknowledged) < len(files), "the kill did not land during the transfer"

    proc = start_server(script, config)  # restart on the same data
    try:
        jobs = JobStore(f"sqlite:///{tmp_path / 'data' / 'pacs-ai.db'}", upgrade=True)
        spool = Spool(tmp_path / "data" / "spool")
        for f in acknowledged:
            uid = str(meta(f).MediaStorageSOPInstanceUID)
            stored = spool.path_for(uid)
            assert stored.is_file() and dataset_bytes(stored) == dataset_bytes(f)
            job = jobs.find_by_sop_uid(uid)
            assert job is not None and job.state is JobState.QUEUED
        # The sender retries everything it did not get a success for; then all 50 are queued once.
        # Whatever else reached the spool is whole (atomic rename): no truncated .dcm file.
        by_uid = {str(meta(f).MediaStorageSOPInstanceUID): f for f in files}
        for stored in spool.root.rglob("*.dcm"):
            source = by_uid[str(meta(stored).MediaStorageSOPInstanceUID)]
            assert dataset_bytes(stored) == dataset_bytes(source)
        retry = [f for f, s in statuses.items() if s != 0]
        assert send(port, retry) == [0] * len(retry)
        assert len(jobs.list_jobs(limit=1000)) == 50
        jobs.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# -- pacs-ai send / echo -------------------------------------------------------------------------------


def run_network_cli(*argv: str) -> int:
    import argparse

    from pacs_ai.cli import network

    parser = argparse.ArgumentParser(prog="pacs-ai")
    network.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return int(args.func(args) or 0)


def test_send_and_echo_commands(serve, chunked_send, sample_files, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    server = serve(allowed_calling_aets=("ADMIN",))
    address = f"127.0.0.1:{server.port}"
    assert run_network_cli("echo", address, "--aet", "ADMIN") == 0
    assert "success" in capsys.readouterr().out
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(sample_files[0].read_bytes())
    assert run_network_cli("send", str(folder), *map(str, sample_files[1:]), str(not_dicom), "--to", address, "--aet", "ADMIN") == 1
    out = capsys.readouterr().out
    assert out.count("OK ") == len(sample_files) and "SKIPPED" in out and "1 failed" in out
    for f in sample_files:
        assert_stored_exact(server, f)  # sent in its own transfer syntax, unchanged
    assert run_network_cli("send", str(sample_files[0]), "--to", address, "--aet", "INTRUDER") == 1
    assert "rejected" in capsys.readouterr().out
    assert run_network_cli("echo", f"127.0.0.1:{free_port()}", "--timeout", "5") == 1


def test_invalid_allow_list_entry_is_a_config_error(tmp_path: Path) -> None:
    from pacs_ai.errors import ConfigError

    jobs = JobStore(f"sqlite:///{tmp_path / 'db.sqlite'}", upgrade=True)
    with pytest.raises(ConfigError, match="listener.allowed_calling_aets"):
        Listener(ListenerConfig(allowed_calling_aets=("A_CALLING_TITLE_TOO_LONG",)), Spool(tmp_path), jobs)
    jobs.close()


def test_port_in_use_is_reported(serve) -> None:  # type: ignore[no-untyped-def]
    from pacs_ai.errors import PacsAiError

    server = serve()
    other = Listener(ListenerConfig(port=server.port), server.spool, server.jobs)
    with pytest.raises(PacsAiError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        other.start()
    assert not other.running and echo(server.port)


@pytest.mark.store_errors_expected
def test_a_bug_in_the_store_handler_is_logged_with_its_traceback_counted_and_answered_a700(
    tmp_path: Path, sample_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception (a bug, here a KeyError from the job commit) answers 0xA700 so the sender
    keeps the image, logs the traceback and counts it in ``pacs_ai_store_errors_total``; every other test
    fails when this happens (tests/conftest.py)."""
    from pacs_ai.ops.metrics import Metrics

    caplog.set_level(logging.ERROR, logger="pacs_ai.receive")
    metrics = Metrics()
    jobs = JobStore(f"sqlite:///{tmp_path / 'pacs-ai.db'}", upgrade=True)
    real_enqueue = jobs.enqueue

    def buggy_enqueue(**kwargs: Any) -> Any:
        raise KeyError("study_instance_uid")

    jobs.enqueue = buggy_enqueue  # type: ignore[method-assign]
    listener = Listener(ListenerConfig(port=free_port(), network_timeout_s=20.0), Spool(tmp_path / "spool"), jobs,
                        observer=metrics)
    listener.start()
    try:
        assert send(listener.port, [sample_file]) == [cx.STATUS_OUT_OF_RESOURCES]
        records = [r for r in caplog.records if r.getMessage().startswith(STORE_ERROR_LINE)]
        assert len(records) == 1 and records[0].exc_info is not None
        assert records[0].exc_info[0] is KeyError
        assert "buggy_enqueue" in caplog.text  # the traceback names where it happened
        text = metrics.render().decode()
        assert 'pacs_ai_store_errors_total{exception="KeyError"} 1.0' in text
        assert 'pacs_ai_images_rejected_total{status="0xA700"} 1.0' in text
        jobs.enqueue = real_enqueue  # type: ignore[method-assign]
        assert send(listener.port, [sample_file]) == [0]  # the sender's resend is stored; still one error
        assert 'pacs_ai_store_errors_total{exception="KeyError"} 1.0' in metrics.render().decode()
    finally:
        listener.stop(grace_s=2)
        jobs.close()
