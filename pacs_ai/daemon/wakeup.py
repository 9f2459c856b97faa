"""Event-driven wake-ups between the daemon's loops, within one process or across the worker child.

A :class:`Doorbell` is a non-blocking pipe: ``ring()`` writes one byte (never blocks; a full pipe means
a wake-up is already pending), ``wait(timeout_s)`` sleeps until a byte arrives or the timeout passes and
then empties the pipe. Because it is a pipe, the same doorbell works between threads and between a
parent and the child it started (the child inherits the file descriptors, see :meth:`Doorbell.to_env` /
:meth:`Doorbell.from_env`).

The daemon uses two: the listener rings ``jobs`` when it has committed a job (the worker loop wakes at
once instead of at its next poll), and the worker rings ``results`` when a job is done (the delivery
loop wakes at once). The poll intervals stay as a fallback: retries whose backoff has expired, jobs
queued by other hosts, and workers started without a doorbell.

:class:`WakeUpObserver` rings the doorbells from the pipeline's observer events.
"""

from __future__ import annotations

import contextlib
import os
import select

from pacs_ai.ops.events import NullObserver

__all__ = ["ENV_VAR", "Doorbell", "WakeUpObserver"]

ENV_VAR = "PACS_AI_DOORBELLS"
"""Environment variable naming the doorbell file descriptors a worker child inherits:
``jobs=<read fd>,results=<write fd>``."""


class Doorbell:
    """A wake-up signal carried by a pipe (see the module docstring)."""

    def __init__(self, read_fd: int | None = None, write_fd: int | None = None) -> None:
        if read_fd is None and write_fd is None:
            read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.read_fd = read_fd
        self.write_fd = write_fd
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.set_blocking(fd, False)

    def ring(self) -> None:
        """Wake one waiter now or at its next wait; never blocks, never raises."""
        if self.write_fd is None:
            return
        with contextlib.suppress(OSError):  # BlockingIOError when full: a wake-up is pending anyway
            os.write(self.write_fd, b"\x01")

    def wait(self, timeout_s: float) -> bool:
        """Sleep until rung or ``timeout_s`` seconds passed; True when rung. Clears pending rings."""
        if self.read_fd is None:
            if timeout_s > 0:
                select.select([], [], [], timeout_s)
            return False
        try:
            ready, _, _ = select.select([self.read_fd], [], [], max(0.0, timeout_s))
        except (OSError, ValueError):  # closed while waiting (shutdown)
            return False
        if not ready:
            return False
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        return True

    def close(self) -> None:
        for name in ("read_fd", "write_fd"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)

    @staticmethod
    def to_env(jobs: Doorbell, results: Doorbell) -> tuple[dict[str, str], tuple[int, ...]]:
        """The environment entry and the fds to pass to a worker child (it waits on ``jobs`` and rings
        ``results``)."""
        assert jobs.read_fd is not None and results.write_fd is not None
        return {ENV_VAR: f"jobs={jobs.read_fd},results={results.write_fd}"}, (jobs.read_fd, results.write_fd)

    @staticmethod
    def from_env(environ: dict[str, str] | None = None) -> tuple[Doorbell, Doorbell] | None:
        """The (jobs, results) doorbells a worker child inherited, or None when it was given none."""
        text = (environ if environ is not None else os.environ).get(ENV_VAR, "")
        try:
            fds = dict(part.split("=", 1) for part in text.split(",") if part)
            jobs_fd, results_fd = int(fds["jobs"]), int(fds["results"])
            os.fstat(jobs_fd)
            os.fstat(results_fd)
        except (KeyError, ValueError, OSError):
            return None
        return Doorbell(read_fd=jobs_fd), Doorbell(write_fd=results_fd)


class WakeUpObserver(NullObserver):
    """Rings ``jobs`` when an image is queued and ``results`` when a job is done."""

    def __init__(self, jobs: Doorbell | None = None, results: Doorbell | None = None) -> None:
        self.jobs = jobs
        self.results = results

    def image_received(self, job_id: int, sop_instance_uid: str, size: int, duplicate: bool) -> None:
        if self.jobs is not None:
            self.jobs.ring()

    def job_finished(self, job_id: int, state: str, inference_s: float, cam_s: float) -> None:
        if self.results is not None and state == "done":
            self.results.ring()
