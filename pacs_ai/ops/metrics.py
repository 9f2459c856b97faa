"""Prometheus metrics (an Observer) and the small HTTP server for ``/metrics`` and ``/healthz``.

Every metric is named ``pacs_ai_<name>``:

=====================================  =========  ============================================================
``images_received_total``              counter    instances stored and queued (duplicates included)
``images_duplicate_total``             counter    of which re-sent instances already known
``images_rejected_total{status}``      counter    C-STOREs answered with a failure status (hex, e.g. 0xA700)
``associations_total{result}``         counter    association requests, accepted/rejected
``jobs_finished_total{state}``         counter    job attempts ended done / failed / dead
``inference_seconds``                  histogram  model time per job
``gradcam_seconds``                    histogram  Grad-CAM time per job
``end_to_end_seconds``                 histogram  receipt of the image to delivery of its results
``deliveries_failed_total{destination}`` counter  failed delivery attempts
``deliveries_dead_total{destination}``  counter   deliveries given up
``jobs{state}``                        gauge      jobs per state in the job store (set by ``update_queue``)
``deliveries{destination,state}``      gauge      deliveries per destination and state
``model_info``                         info       model name, version, architecture ...
=====================================  =========  ============================================================

``MetricsServer`` serves them on ``host:port`` (``/metrics``, Prometheus text format) next to
``/healthz`` (the :class:`~pacs_ai.ops.health.HealthCheck` report as JSON, 200 or 503). Bind it to
127.0.0.1 (the default) and let Prometheus scrape locally or through a reverse proxy: the endpoint has
no authentication.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from pacs_ai.ops.health import HealthCheck

__all__ = ["Metrics", "MetricsServer"]

logger = logging.getLogger(__name__)

NAMESPACE = "pacs_ai"
_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0)


class Metrics:
    """The pipeline's metrics in ``registry`` (a fresh one by default, so instances never collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        kw = {"namespace": NAMESPACE, "registry": self.registry}
        self.images_received = Counter("images_received", "DICOM instances stored and queued", **kw)
        self.images_duplicate = Counter("images_duplicate", "Received instances that were already known", **kw)
        self.images_rejected = Counter("images_rejected", "C-STORE requests answered with a failure", ["status"], **kw)
        self.associations = Counter("associations", "Association requests", ["result"], **kw)
        self.jobs_finished = Counter("jobs_finished", "Job attempts ended, by resulting state", ["state"], **kw)
        self.inference_seconds = Histogram(
            "inference_seconds", "Model inference time per job", buckets=_STAGE_BUCKETS, **kw
        )
        self.gradcam_seconds = Histogram("gradcam_seconds", "Grad-CAM time per job", buckets=_STAGE_BUCKETS, **kw)
        self.end_to_end_seconds = Histogram(
            "end_to_end_seconds", "Seconds from receipt of an image to delivery of its results", buckets=_E2E_BUCKETS, **kw
        )
        self.deliveries_failed = Counter(
            "deliveries_failed", "Failed delivery attempts per destination", ["destination"], **kw
        )
        self.deliveries_dead = Counter("deliveries_dead", "Deliveries given up per destination", ["destination"], **kw)
        self.jobs = Gauge("jobs", "Jobs in the job store per state", ["state"], **kw)
        self.deliveries = Gauge("deliveries", "Deliveries per destination and state", ["destination", "state"], **kw)
        self.model_info = Info("model", "The model(s) in use", **kw)
        self._lock = threading.Lock()
        self._job_states: set[str] = set()
        self._delivery_keys: set[tuple[str, str]] = set()

    # -- Observer --------------------------------------------------------------------------------------
    def association(self, calling_aet: str, peer: str, accepted: bool, reason: str = "") -> None:
        self.associations.labels(result="accepted" if accepted else "rejected").inc()

    def image_received(self, job_id: int, sop_instance_uid: str, size: int, duplicate: bool) -> None:
        self.images_received.inc()
        if duplicate:
            self.images_duplicate.inc()

    def image_rejected(self, status: int, reason: str) -> None:
        self.images_rejected.labels(status=f"0x{int(status):04X}").inc()

    def job_finished(self, job_id: int, state: str, inference_s: float, cam_s: float) -> None:
        self.jobs_finished.labels(state=state).inc()
        if inference_s > 0:
            self.inference_seconds.observe(inference_s)
        if cam_s > 0:
            self.gradcam_seconds.observe(cam_s)

    def delivered(self, job_id: int, destination: str, end_to_end_s: float) -> None:
        self.end_to_end_seconds.observe(max(0.0, end_to_end_s))

    def delivery_failed(self, job_id: int, destination: str, reason: str, dead: bool) -> None:
        self.deliveries_failed.labels(destination=destination).inc()
        if dead:
            self.deliveries_dead.labels(destination=destination).inc()

    # -- set by the daemon -----------------------------------------------------------------------------
    def set_model_info(self, info: Mapping[str, str]) -> None:
        """Publish ``info`` (e.g. name, version, architecture, device) as ``pacs_ai_model_info``."""
        self.model_info.info({str(k): str(v) for k, v in info.items()})

    def update_queue(self, counts: Mapping[str, int], delivery_counts: Mapping[str, Mapping[str, int]]) -> None:
        """Set the ``jobs`` and ``deliveries`` gauges from the job store's counts; states that disappeared
        from the counts are set to 0 rather than left at their last value."""
        with self._lock:
            for state in self._job_states - set(counts):
                self.jobs.labels(state=state).set(0)
            for state, n in counts.items():
                self.jobs.labels(state=state).set(n)
            self._job_states |= set(counts)
            seen = {(dest, state) for dest, states in delivery_counts.items() for state in states}
            for dest, state in self._delivery_keys - seen:
                self.deliveries.labels(destination=dest, state=state).set(0)
            for dest, states in delivery_counts.items():
                for state, n in states.items():
                    self.deliveries.labels(destination=dest, state=state).set(n)
            self._delivery_keys |= seen

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, self.server.metrics.render())
        elif path in ("/healthz", "/health"):
            ok, report = self.server.health.check()
            self._send(200 if ok else 503, "application/json", json.dumps(report).encode() + b"\n")
        elif path == "/":
            self._send(200, "text/plain; charset=utf-8", b"pacs-ai: /metrics /healthz\n")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: stay quiet
        logger.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], metrics: Metrics, health: HealthCheck) -> None:
        self.metrics = metrics
        self.health = health
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``host:port`` (port 0 picks a free port: see :attr:`port`)."""

    def __init__(self, metrics: Metrics, health: HealthCheck, host: str, port: int) -> None:
        self.metrics = metrics
        self.health = health
        self.host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self._requested_port

    def start(self) -> None:
        if self._server is not None:
            return
        self._server = _Server((self.host, self._requested_port), self.metrics, self.health)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-http", daemon=True
        )
        self._thread.start()
        logger.info("metrics and health on http://%s:%d/metrics /healthz", self.host, self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "MetricsServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
