"""The spool: atomic durable writes, a sane layout, and StorageError naming the problem."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacs_ai.errors import StorageError
from pacs_ai.store.atomic import write_atomic, write_atomic_with
from pacs_ai.store.spool import Spool, StoredFile

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_store_writes_exact_bytes_in_the_layout(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = os.urandom(100_000)
    stored = spool.store(UID, data)
    prefix = hashlib.sha1(UID.encode()).hexdigest()[:2]
    assert stored == StoredFile(tmp_path / "spool" / prefix / f"{UID}.dcm", hashlib.sha256(data).hexdigest(), len(data))
    assert stored.path == spool.path_for(UID)
    assert stored.path.read_bytes() == data
    assert temp_files(tmp_path) == []


def test_store_replaces_an_older_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(UID, b"old" * 1000)
    stored = spool.store(UID, b"new")
    assert stored.path.read_bytes() == b"new"
    assert stored.size == 3
    assert len(list(tmp_path.rglob("*.dcm"))) == 1


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.3/../../x", "1.2 3\\4", "..", "é.1"])
def test_odd_uids_stay_inside_the_spool(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path / "spool")
    stored = spool.store(uid, b"x")
    assert stored.path.resolve().parent.parent == (tmp_path / "spool").resolve()
    assert "/" not in stored.path.name and stored.path.name.endswith(".dcm")
    # Two UIDs that sanitise alike still get distinct files.
    assert spool.path_for("1.2 3") != spool.path_for("1.2_3")


def test_spool_root_blocked_by_a_file_raises_storage_error(tmp_path: Path) -> None:
    # Works for root too: a regular file where the spool directory should be.
    blocker = tmp_path / "spool"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(StorageError, match="not a directory|in the way"):
        Spool(blocker).store(UID, b"data")
    assert blocker.read_bytes() == b"not a directory"


def test_write_atomic_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()  # a directory in the way: the rename fails after the temp file was written
    (target / "keep").write_text("x")
    with pytest.raises(StorageError, match="directory"):
        write_atomic(target, b"data")
    assert (target / "keep").read_text() == "x"
    assert temp_files(tmp_path) == []


def test_write_atomic_with_a_path_writer_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    """``write_atomic_with`` (checkpoints, model folders): a failing writer leaves the old file and no temp."""
    target = tmp_path / "last.pt"
    write_atomic_with(target, lambda p: p.write_bytes(b"first"))
    assert target.read_bytes() == b"first" and oct(target.stat().st_mode & 0o777) == "0o644"

    def half_then_fail(p: Path) -> None:
        p.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic_with(target, half_then_fail)
    assert target.read_bytes() == b"first"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["last.pt"]
    with pytest.raises(StorageError, match="cannot write"):
        write_atomic_with(tmp_path / "missing" / "x.pt", lambda p: p.write_bytes(b"x"))


def test_write_atomic_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot write"):
        write_atomic(tmp_path / "no" / "such" / "file", b"data")


def test_full_disk_raises_disk_full_and_keeps_old_copy(tmpfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fs = tmpfs(256)
    spool = Spool(fs.path / "spool")
    first = spool.store(UID, b"a" * 10_000)
    with pytest.raises(StorageError, match="disk full"):
        spool.store(UID, os.urandom(400_000))
    assert first.path.read_bytes() == b"a" * 10_000
    assert temp_files(fs.path) == []


def test_read_only_file_system_raises_read_only(tmpfs) -> None:  # type: ignore[no-untyped-def]
    fs = tmpfs(1024)
    spool = Spool(fs.path / "spool")
    spool.store("1.2.3", b"x")
    fs.read_only()
    try:
        with pytest.raises(StorageError, match="read-only"):
            spool.store(UID, b"data")
    finally:
        fs.read_only(False)


def test_concurrent_writers_of_one_uid_leave_one_whole_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=spool.store, args=(UID, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert spool.path_for(UID).read_bytes() in payloads
    assert temp_files(tmp_path) == []


def test_remove_stale_temp(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    stored = spool.store(UID, b"x")
    stale = stored.path.parent / f".{stored.path.name}.123.abc.tmp"
    fresh = stored.path.parent / f".{stored.path.name}.124.abd.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert spool.remove_stale_temp(3600) == 1
    assert not stale.exists() and fresh.exists() and stored.path.exists()


def test_remove_stale_temp_of_writers_that_are_gone(tmp_path: Path) -> None:
    """With ``writer_alive`` a temporary file goes at once when its writer's process has ended (a listener
    killed mid-write), not when the writer still runs (this process); other names only by age."""
    import subprocess
    import sys

    spool = Spool(tmp_path)
    stored = spool.store(UID, b"x")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    orphan = stored.path.parent / f".{stored.path.name}.{ended.pid}.a1b2c3d4e5f6.tmp"
    ours = stored.path.parent / f".{stored.path.name}.{os.getpid()}.a1b2c3d4e5f7.tmp"
    odd = stored.path.parent / ".not-our-naming.tmp"
    for f in (orphan, ours, odd):
        f.write_bytes(b"partial")
    from pacs_ai.store.atomic import temp_path, temp_writer_pid

    assert temp_writer_pid(temp_path(stored.path)) == os.getpid()  # the names write_atomic makes
    alive = {os.getpid()}
    assert spool.remove_stale_temp(writer_alive=alive.__contains__) == 1
    assert not orphan.exists() and ours.exists() and odd.exists() and stored.path.exists()


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=80).filter(lambda u: u.strip().rstrip("\x00").strip()))
def test_any_uid_maps_to_a_file_directly_in_a_bucket(uid: str) -> None:
    root = Path("/spool")
    path = Spool(root).path_for(uid)
    assert path.parent.parent == root and len(path.parent.name) == 2
    assert path.name.endswith(".dcm") and "/" not in path.name and path.name not in (".dcm", "..dcm")
    assert "\x00" not in path.name and len(path.name.encode()) < 255
