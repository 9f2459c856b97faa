"""Event-driven wake-ups: the doorbell pipe, across threads and processes, and in the running daemon."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from pacs_ai.daemon.wakeup import ENV_VAR, Doorbell, WakeUpObserver
from support.common import copies
from support.daemon_harness import Daemon, send_files, shared_model
from support.dest_scp import DestSCP


def test_wait_times_out_without_a_ring_and_returns_at_once_after_one() -> None:
    bell = Doorbell()
    try:
        t = time.monotonic()
        assert bell.wait(0.2) is False
        assert time.monotonic() - t >= 0.15
        bell.ring()
        bell.ring()  # rings coalesce: one wait consumes them all
        assert bell.wait(5.0) is True
        assert bell.wait(0.05) is False
    finally:
        bell.close()


def test_a_ring_from_another_thread_wakes_the_waiter_long_before_its_timeout() -> None:
    bell = Doorbell()
    try:
        threading.Timer(0.2, bell.ring).start()
        t = time.monotonic()
        assert bell.wait(30.0) is True
        assert time.monotonic() - t < 10.0
    finally:
        bell.close()


def test_ringing_a_full_pipe_never_blocks() -> None:
    bell = Doorbell()
    try:
        for _ in range(200_000):  # far more than a pipe buffer holds
            bell.ring()
        assert bell.wait(1.0) is True
    finally:
        bell.close()


def test_a_child_process_inherits_the_doorbells_waits_on_jobs_and_rings_results() -> None:
    jobs, results = Doorbell(), Doorbell()
    env_entry, fds = Doorbell.to_env(jobs, results)
    child_code = (
        "from pacs_ai.daemon.wakeup import Doorbell\n"
        "jobs, results = Doorbell.from_env()\n"
        "assert jobs.wait(30.0), 'jobs bell never rang'\n"
        "results.ring()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child_code], env={**os.environ, **env_entry}, pass_fds=fds)
    try:
        jobs.ring()
        assert results.wait(30.0) is True
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        jobs.close()
        results.close()


def test_from_env_without_or_with_stale_descriptors_gives_none() -> None:
    assert Doorbell.from_env({}) is None
    assert Doorbell.from_env({ENV_VAR: "jobs=999999,results=999998"}) is None
    assert Doorbell.from_env({ENV_VAR: "garbage"}) is None


def test_observer_rings_jobs_on_every_image_and_results_only_for_done_jobs() -> None:
    jobs, results = Doorbell(), Doorbell()
    try:
        observer = WakeUpObserver(jobs, results)
        observer.image_received(1, "1.2.3", 10, duplicate=False)
        assert jobs.wait(0) is True and results.wait(0) is False
        observer.job_finished(1, "failed", 0.0, 0.0)
        assert results.wait(0) is False
        observer.job_finished(1, "done", 0.1, 0.01)
        assert results.wait(0) is True
    finally:
        jobs.close()
        results.close()


def test_daemon_processes_and_delivers_without_waiting_for_its_poll_intervals(tmp_path: Path, sample_file: Path) -> None:
    """With 60 s poll intervals, an image still reaches the destination within seconds: the listener wakes
    the worker child and the worker wakes the delivery loop. The worker warms up before its first claim."""
    dest = DestSCP(ae_title="WAKEPACS").start()
    daemon = Daemon(
        tmp_path / "d",
        model=shared_model("resnet50"),
        destinations=[dest],
        overrides={"worker": {"poll_interval_s": 60.0}, "delivery": {"poll_interval_s": 60.0}},
    )
    try:
        daemon.start()
        # The child's first poll happens right after its warm-up: wait for it, so that only a wake-up can
        # bring the next images in before the 60 s poll interval.
        assert daemon.wait_until(lambda: "worker warmed up" in daemon.log_text(), timeout=120), daemon.log_tail()
        time.sleep(1.0)
        files = copies(sample_file, tmp_path / "in", 3, new_study=True)
        studies = set()
        import pydicom

        for f in files:
            studies.add(str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID))
        sent_at = time.monotonic()
        result = send_files(daemon.port, files)
        assert [s.status for s in result.sent] == [0, 0, 0]
        assert dest.wait_for(lambda d: d.complete_studies(studies) == studies, 45.0), daemon.log_tail()
        assert time.monotonic() - sent_at < 45.0
        log = daemon.log_text()
        assert log.index("worker warmed up") < log.index(" done: "), log[-3000:]
        # once warm, every thread of the worker child runs 10 nice levels below the daemon
        assert daemon.pid is not None
        children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
        assert len(children) == 1, children
        parent_nice = os.getpriority(os.PRIO_PROCESS, daemon.pid)
        tasks = [int(t) for t in os.listdir(f"/proc/{children[0]}/task")]
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in tasks} == {min(19, parent_nice + 10)}
        # torch is loaded by the worker child only, never by the listener's process
        assert "libtorch" in Path(f"/proc/{children[0]}/maps").read_text()
        assert "libtorch" not in Path(f"/proc/{daemon.pid}/maps").read_text()
    finally:
        daemon.stop()
        daemon.close_store()
        dest.stop()


def modules_loaded_by(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a fresh interpreter has imported after running ``code``."""
    probe = code + f"\nimport json, sys\nprint(json.dumps(sorted(m for m in {names!r} if m in sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def test_the_serve_process_does_not_import_torch() -> None:
    """The listener's process starts in about a second: torch (seconds, hundreds of MB) is the worker's."""
    code = (
        "from pacs_ai.cli import build_parser\n"
        "build_parser()  # every sub-command's module\n"
        "import pacs_ai.daemon.service, pacs_ai.receive.listener, pacs_ai.send.deliveries\n"
    )
    assert modules_loaded_by(code, ("torch",)) == []


def test_each_command_is_built_from_its_own_module_alone() -> None:
    """``pacs-ai serve`` imports only its own module and validates its configuration (routing included)
    before starting the worker child, without pynetdicom, SQLAlchemy or pydicom yet; every command still
    parses when only its module is registered."""
    from pacs_ai.cli import COMMANDS, build_parser

    def commands(parser: argparse.ArgumentParser) -> set[str]:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return set(sub.choices)

    assert commands(build_parser()) == set(COMMANDS)
    for command, module in COMMANDS.items():
        assert command in commands(build_parser((module,))), (command, module)
    code = (
        "from pacs_ai.cli import build_parser, COMMANDS\n"
        "build_parser((COMMANDS['serve'],))\n"
        "from pacs_ai.cli.serve import require_model_folders\n"
        "from pacs_ai.config import load_config\n"
        "require_model_folders(load_config(None))  # what serve does before it starts the worker child\n"
    )
    assert modules_loaded_by(code, ("pynetdicom", "sqlalchemy", "pydicom", "numpy")) == []
    shown = subprocess.run([sys.executable, "-m", "pacs_ai", "echo", "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "usage: pacs-ai echo" in shown.stdout, shown.stderr
