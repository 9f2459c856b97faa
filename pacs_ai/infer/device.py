"""The one device rule and the one thread-count rule, for serving and training alike.

Device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (:func:`select_device`;
the daemon, ``pacs-ai classify`` and every ``python -m training`` command use it). On the CPU the engine
runs channels-last float32; on CUDA it runs the forward under autocast (bfloat16 where the GPU supports
it, else float16: :func:`autocast_dtype`).

Threads: a configured positive count wins; otherwise the cores this process may run on (its affinity
mask), less the cores ``reserve``d for other work (the listener keeps one) and at least one
(:func:`thread_count`). :func:`configure_threads` applies the count to torch's intra-op pool.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from pacs_ai.errors import ConfigError

__all__ = [
    "DEVICE_CHOICES",
    "autocast_dtype",
    "configure_threads",
    "default_threads",
    "idle_cores",
    "select_device",
    "thread_count",
]

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def select_device(name: str = "auto", *, key: str = "model.device") -> torch.device:
    """``auto`` -> ``cuda`` when a CUDA device is usable, else ``cpu``; ``cuda`` without one is an error.

    ``cuda:N`` is accepted too. Raises ``ConfigError`` naming ``key`` (the setting or option the name
    came from; ``model.device`` by default) for anything else.
    """
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(key, f"{name!r} requested but no CUDA device is available (use auto or cpu)")
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(key, f"{name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise ConfigError(key, f"must be one of {', '.join(DEVICE_CHOICES)}, not {name!r}")


def default_threads() -> int:
    """The CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def idle_cores(loadavg: Path = Path("/proc/loadavg"), *, samples: int = 10, interval_s: float = 0.002) -> int | None:
    """Cores of this process's affinity mask that no runnable task holds, or None where the kernel does
    not say (not Linux).

    Linux's ``/proc/loadavg`` fourth field is ``running/total`` (``proc(5)``): the tasks runnable at that
    instant, the calling thread included, so ``default_threads() - running`` cores are free besides the
    one the caller runs on. The fewest running tasks of up to ``samples`` reads ``interval_s`` apart
    counts (it stops at the first read where the caller runs alone), so that a task that runs for a
    moment (a poll, a log write) does not hide a core that is free, while a process that keeps a core
    busy shows in every read (then the reads cost ``samples * interval_s``).
    """
    fewest: int | None = None
    for i in range(max(1, samples)):
        if i:
            time.sleep(interval_s)
        try:
            running = int(loadavg.read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return None
        fewest = running if fewest is None else min(fewest, running)
        if fewest <= 1:
            break
    assert fewest is not None
    return max(0, default_threads() - fewest)


def thread_count(threads: int | None = 0, *, reserve: int = 0) -> int:
    """The thread rule: ``threads`` when positive, else :func:`default_threads` less ``reserve``, at least 1."""
    if threads and int(threads) > 0:
        return int(threads)
    return max(1, default_threads() - max(0, int(reserve)))


def configure_threads(threads: int | None = 0, *, reserve: int = 0) -> int:
    """Set torch's intra-op thread count to :func:`thread_count` (``threads``, ``reserve``); returns it.

    Process-wide: every model in the process shares it.
    """
    n = thread_count(threads, reserve=reserve)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``device``: bfloat16 or float16 on CUDA, None (float32) on the CPU."""
    if device.type != "cuda":
        return None
    try:
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
    except Exception:  # noqa: BLE001 - an old driver: fall back to float16
        pass
    return torch.float16
