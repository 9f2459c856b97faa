"""Run the worker as a supervised child process (``pacs-ai worker``) beside the listener.

Why a process and not a thread: decoding, preprocessing, inference and result writing hold the Python
interpreter lock for long stretches, and the listener's C-STORE handler would wait for it; in a separate
process at a lower CPU priority (``nice``) the listener keeps storing at full speed while images are
classified. A native crash in a codec or in torch also ends only the child, which is started again
(with backoff), while the listener keeps acknowledging images.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pacs_ai.daemon.wakeup import Doorbell

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

NICENESS_ENV_VAR = "PACS_AI_WORKER_NICENESS"
"""How much a worker child lowers its CPU priority once warmed up (set by the daemon that starts it)."""


def lower_priority(environ: dict[str, str] | None = None) -> int | None:
    """Add ``$PACS_AI_WORKER_NICENESS`` to the niceness of every thread of this process; returns the new
    niceness of the calling thread, or None when the variable is unset or invalid.

    Linux applies niceness per thread, so each task under ``/proc/self/task`` is changed (threads started
    afterwards inherit the calling thread's). Raising one's own niceness needs no privilege.
    """
    text = (environ if environ is not None else os.environ).get(NICENESS_ENV_VAR, "")
    try:
        increment = int(text)
    except ValueError:
        return None
    if increment <= 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            current = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
        except OSError:  # the thread ended meanwhile
            pass
    return os.getpriority(os.PRIO_PROCESS, 0)


class WorkerProcess:
    """Starts ``pacs-ai worker`` with the same configuration, restarts it when it dies, stops it on request."""

    def __init__(
        self,
        config_path: Path | None,
        *,
        niceness: int = 10,
        cwd: Path | None = None,
        doorbells: tuple[Doorbell, Doorbell] | None = None,
    ) -> None:
        """``doorbells``: (jobs, results); the child waits on ``jobs`` and rings ``results``."""
        self.config_path = config_path
        self.doorbells = doorbells
        self.niceness = niceness
        self.cwd = cwd or Path.cwd()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._failures = 0
        self._next_start = 0.0

    @property
    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "pacs_ai", "worker", "--child"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _prepare_child(self) -> None:  # runs in the child between fork and exec
        # The niceness is applied by the child itself once it is warm (lower_priority): start-up and
        # warm-up run at the daemon's priority, so a busy machine does not starve the first image.
        try:  # Linux: SIGTERM the child when the daemon dies, so that no orphan worker lingers
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def start(self) -> None:
        with self._lock:
            if self._stopping or self.alive:
                return
            # The daemon alone talks to systemd (NotifyAccess=main).
            env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
            env[NICENESS_ENV_VAR] = str(self.niceness)
            fds: tuple[int, ...] = ()
            if self.doorbells is not None:
                bell_env, fds = Doorbell.to_env(*self.doorbells)
                env.update(bell_env)
            self._proc = subprocess.Popen(
                self.command, cwd=self.cwd, env=env, preexec_fn=self._prepare_child, pass_fds=fds
            )
            self._started_at = time.monotonic()
            log.info("worker process started (pid %d, nice %+d once warmed up)", self._proc.pid, self.niceness)

    def supervise(self) -> bool:
        """Restart the child if it died (with backoff); returns True when a child is running."""
        with self._lock:
            proc = self._proc
            if self._stopping or proc is None:
                return self.alive
            code = proc.poll()
            if code is None:
                if time.monotonic() - self._started_at > 60:
                    self._failures = 0
                return True
            if self._next_start == 0.0:
                delay = RESTART_BACKOFF_S[min(self._failures, len(RESTART_BACKOFF_S) - 1)]
                self._failures += 1
                self._next_start = time.monotonic() + delay
                how = f"signal {-code}" if code < 0 else f"status {code}"
                log.error("worker process %d ended with %s; restarting in %.0f s", proc.pid, how, delay)
            if time.monotonic() < self._next_start:
                return False
            self._next_start = 0.0
            self._proc = None
        self.start()
        return self.alive

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the child (it returns its claimed jobs to the queue), SIGKILL after ``timeout_s``."""
        with self._lock:
            self._stopping = True
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("worker process %d did not stop within %.0f s; killing it", proc.pid, timeout_s)
            proc.kill()
            return proc.wait(timeout=10)
