"""Liveness: components beat regularly; a component silent for too long, or a failing probe, is "stuck".

``HealthCheck({"listener": 30, "worker": 60})`` expects ``beat("listener")`` at least every 30 s and
``beat("worker")`` every 60 s (the worker loop beats on each poll, busy or idle). Silence is counted from
the last beat, or from the creation of the check for a component that has not beaten yet. Probes are
callables returning True when healthy (for example ``listener.running``); a probe that raises counts as
failing. ``check()`` returns ``(ok, report)``; the metrics server answers ``/healthz`` with it (200 or 503).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["HealthCheck"]

logger = logging.getLogger(__name__)


class HealthCheck:
    def __init__(self, max_silence_s: Mapping[str, float]) -> None:
        self._limits = {name: float(limit) for name, limit in max_silence_s.items()}
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._beats: dict[str, float] = {}
        self._probes: dict[str, Callable[[], bool]] = {}

    def beat(self, name: str) -> None:
        """Record that component ``name`` is alive now."""
        now = time.monotonic()
        with self._lock:
            self._beats[name] = now

    def register_probe(self, name: str, probe: Callable[[], bool]) -> None:
        """Add a check run on each ``check()``: healthy when ``probe()`` returns a true value."""
        with self._lock:
            self._probes[name] = probe

    def check(self) -> tuple[bool, dict[str, Any]]:
        """``(ok, report)``: report is ``{"status": "ok"|"fail", "failing": [...], "components": ..., "probes": ...}``."""
        now = time.monotonic()
        with self._lock:
            limits, beats, probes = dict(self._limits), dict(self._beats), dict(self._probes)
        failing: list[str] = []
        components: dict[str, dict[str, Any]] = {}
        for name in sorted(set(limits) | set(beats)):
            last = beats.get(name)
            silence = now - (last if last is not None else self._started)
            limit = limits.get(name)
            ok = limit is None or limit <= 0 or silence <= limit
            components[name] = {"ok": ok, "silence_s": round(silence, 3), "max_silence_s": limit, "beaten": last is not None}
            if not ok:
                failing.append(name)
        probe_results: dict[str, dict[str, Any]] = {}
        for name, probe in sorted(probes.items()):
            try:
                ok, error = bool(probe()), ""
            except Exception as exc:  # a broken probe is a failing probe
                ok, error = False, f"{type(exc).__name__}: {exc}"
            probe_results[name] = {"ok": ok, **({"error": error} if error else {})}
            if not ok:
                failing.append(name)
        healthy = not failing
        report: dict[str, Any] = {
            "status": "ok" if healthy else "fail",
            "failing": failing,
            "components": components,
            "probes": probe_results,
        }
        if not healthy:
            report["message"] = "stuck or down: " + ", ".join(failing)
        return healthy, report
