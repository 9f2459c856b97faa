"""The daemon as a whole: start-up with the embedded defaults, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pacs_ai.config import BUNDLED_MODEL
from pacs_ai.queue.jobstore import JobState, JobStore
from support.common import copies, free_port
from support.daemon_harness import Daemon, echo, send_files, shared_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (BUNDLED_MODEL / "model.json").is_file(), reason="no bundled model in models/reference")
def test_serve_with_embedded_defaults_starts_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`pacs-ai serve` without --config: data under ./pacs-ai-data, bundled model, SIGTERM exits 0."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacs_ai", "serve", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(raw.decode() for raw in proc.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not echo(port, timeout=2.0):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "daemon did not answer C-ECHO within 120 s"
            time.sleep(0.3)
        assert (tmp_path / "pacs-ai-data" / "pacs-ai.db").is_file()
        assert (tmp_path / "pacs-ai-data" / "spool").is_dir()
        deadline = time.monotonic() + 180  # the worker child warms the model and the codecs after the listener is up
        while not any("worker warmed up" in line for line in list(lines)):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "worker did not warm up within 180 s:\n" + "".join(lines)
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    log = "".join(lines)
    assert proc.returncode == 0, log
    assert "stopping" in log and "stopped in" in log, log
    # the warm-up's JPEG 2000 encode logs nothing of the codec's own (pylibjpeg-openjpeg logs each tile at INFO)
    assert "openjpeg" not in log, log
    assert "reference" in log or str(BUNDLED_MODEL.name) in log


def test_sigterm_during_burst_loses_nothing_and_leaves_no_job_running(tmp_path: Path, sample_file: Path) -> None:
    """SIGTERM while images arrive and jobs run: every acknowledged image is queued or done, none running."""
    files = copies(sample_file, tmp_path / "in", 200)
    daemon = Daemon(tmp_path / "d", model=shared_model("resnet50"))
    daemon.start()
    results: list = []

    def burst() -> None:
        results.append(send_files(daemon.port, files))

    sender = threading.Thread(target=burst)
    sender.start()
    time.sleep(1.0)
    started = time.monotonic()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(timeout=60)
    stop_s = time.monotonic() - started
    sender.join(timeout=60)
    assert code == 0, daemon.log_tail()
    assert stop_s < 45, f"stop took {stop_s:.1f} s"

    sent = results[0]
    acked = {s.sop_instance_uid for s in sent.sent if s.ok}
    assert acked, "no image was acknowledged before SIGTERM; the test proves nothing"
    store = JobStore(f"sqlite:///{daemon.data_dir / 'pacs-ai.db'}")
    try:
        jobs = store.list_jobs(limit=1000)
        by_uid = {j.sop_instance_uid: j for j in jobs}
        assert acked <= set(by_uid), f"acknowledged but not queued: {sorted(acked - set(by_uid))}"
        for job in jobs:
            assert Path(job.spool_path).is_file(), f"job {job.id}: spool file missing"
            assert job.state is not JobState.RUNNING, f"job {job.id} left running after SIGTERM"
    finally:
        store.close()
    print(f"\nSIGTERM during burst: {len(acked)} acknowledged, {len(jobs)} jobs, stopped in {stop_s:.1f} s")


def test_leases_of_a_stopped_process_on_this_host_are_taken_back_at_start(tmp_path: Path) -> None:
    """Work leased by a killed pacs-ai process is claimable at once, not after the lease runs out."""
    import socket

    from pacs_ai.daemon.service import reclaim_orphaned_leases

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", upgrade=True)
    try:
        for i in range(3):
            store.enqueue(
                sop_instance_uid=f"1.2.3.{i}", study_instance_uid="1.2", series_instance_uid="1.2.3",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_aet="T", spool_path=f"/x/{i}.dcm",
                sha256=str(i), size=1,
            )
        host = socket.gethostname()
        dead_pid = 2**22 + 12345  # above pid_max on Linux: never a live process
        dead = store.claim(f"{host}:{dead_pid}:worker", limit=1, lease_seconds=3600)
        alive = store.claim(f"{host}:{os.getpid()}:worker", limit=1, lease_seconds=3600)
        elsewhere = store.claim(f"otherhost:{dead_pid}:worker", limit=1, lease_seconds=3600)
        assert store.claim("new", limit=3) == []  # everything is leased for an hour

        assert reclaim_orphaned_leases(store, host) == (1, 0)
        again = store.claim("new", limit=3)
        assert [j.id for j in again] == [dead[0].id]  # not the live process's, not another host's
        assert again[0].attempts == 2  # the killed attempt still counts
        assert {alive[0].id, elsewhere[0].id}.isdisjoint({j.id for j in again})
    finally:
        store.close()


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_refuses_to_start_without_a_loadable_model(command: str, tmp_path: Path) -> None:
    """A daemon that could never classify must not start (it would acknowledge images nobody processes)."""
    data = tmp_path / "data"
    missing = tmp_path / "no-such-model"
    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{data}"\n[listener]\nport = {free_port()}\n'
        f'[metrics]\nenabled = false\n[model]\npath = ["{missing}"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "pacs_ai", command, "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "model.path[0]" in done.stderr and str(missing) in done.stderr
    assert not data.exists()  # refused before the spool or the job store were created


def test_worker_threads_keep_a_core_for_the_listener_except_for_a_lone_image() -> None:
    """Automatic threads: all cores less one wherever a listener runs beside the worker (in this process
    or, for `serve`'s worker child, in the parent), all cores for a single image; a configured count wins."""
    import dataclasses

    from pacs_ai.config import load_config
    from pacs_ai.daemon.service import Roles, torch_threads

    cores = len(os.sched_getaffinity(0))
    auto = load_config(None)
    assert auto.model.threads == 0
    for roles in (Roles(), Roles(listener=False, beside_listener=True)):
        assert torch_threads(auto, roles) == max(1, cores - 1)
        assert torch_threads(auto, roles, single_image=True) == cores
    alone = Roles(listener=False, worker=True)  # `pacs-ai worker` on its own machine
    assert torch_threads(auto, alone) == torch_threads(auto, alone, single_image=True) == cores
    fixed = dataclasses.replace(auto, model=dataclasses.replace(auto.model, threads=3))
    assert torch_threads(fixed, Roles(), single_image=True) == torch_threads(fixed, Roles()) == 3
