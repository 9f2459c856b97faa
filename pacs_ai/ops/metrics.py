"""Prometheus metrics (an Observer) and the small HTTP server for ``/metrics`` and ``/healthz``.

Every metric is named ``pacs_ai_<name>``:

=====================================  =========  ============================================================
``images_received_total``              counter    instances stored and queued (duplicates included)
``images_duplicate_total``             counter    of which re-sent instances already known
``images_rejected_total{status}``      counter    C-STOREs answered with a failure status (hex, e.g. 0xA700)
``store_errors_total{exception}``      counter    unexpected exceptions in the C-STORE handler (a bug; 0 expected)
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
``/healthz`` (the :class:`~pacs_ai.ops.health.HealthCheck` report as JSON, 200 or 503) and, under ``/``,
the admin dashboard (:mod:`pacs_ai.dashboard`) when one is given: a Starlette application served by
uvicorn (:mod:`pacs_ai.ops.http_server`). Bind it to 127.0.0.1 (the default) and let Prometheus scrape
locally or through a reverse proxy: ``/metrics`` and ``/healthz`` have no authentication.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from pacs_ai.ops.health import HealthCheck
from pacs_ai.ops.http_server import AsgiServer

__all__ = ["Metrics", "MetricsServer"]

logger = logging.getLogger(__name__)

NAMESPACE = "pacs_ai"
_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0)


class Metrics:
    """The pipeline's metrics in ``registry`` (a fresh one by default, so instances never collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        counter = functools.partial(Counter, namespace=NAMESPACE, registry=self.registry)
        histogram = functools.partial(Histogram, namespace=NAMESPACE, registry=self.registry)
        gauge = functools.partial(Gauge, namespace=NAMESPACE, registry=self.registry)
        self.images_received = counter("images_received", "DICOM instances stored and queued")
        self.images_duplicate = counter("images_duplicate", "Received instances that were already known")
        self.images_rejected = counter("images_rejected", "C-STORE requests answered with a failure", ["status"])
        self.store_errors = counter("store_errors", "Unexpected exceptions in the C-STORE handler (answered 0xA700)", ["exception"])
        self.associations = counter("associations", "Association requests", ["result"])
        self.jobs_finished = counter("jobs_finished", "Job attempts ended, by resulting state", ["state"])
        self.inference_seconds = histogram("inference_seconds", "Model inference time per job", buckets=_STAGE_BUCKETS)
        self.gradcam_seconds = histogram("gradcam_seconds", "Grad-CAM time per job", buckets=_STAGE_BUCKETS)
        self.end_to_end_seconds = histogram(
            "end_to_end_seconds", "Seconds from receipt of an image to delivery of its results", buckets=_E2E_BUCKETS
        )
        self.deliveries_failed = counter("deliveries_failed", "Failed delivery attempts per destination", ["destination"])
        self.deliveries_dead = counter("deliveries_dead", "Deliveries given up per destination", ["destination"])
        self.jobs = gauge("jobs", "Jobs in the job store per state", ["state"])
        self.deliveries = gauge("deliveries", "Deliveries per destination and state", ["destination", "state"])
        self.model_info = Info("model", "The model(s) in use", namespace=NAMESPACE, registry=self.registry)
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

    def store_error(self, exception: str) -> None:
        self.store_errors.labels(exception=exception).inc()

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


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


def metrics_app(metrics: Metrics, health: HealthCheck, root: ASGIApp | None = None) -> Starlette:
    """The ASGI application of the metrics port: ``/metrics``, ``/healthz`` (also ``/health``) and, under
    ``/``, ``root`` (the dashboard) or a one-line text naming the endpoints."""

    def metrics_endpoint(request: Request) -> Response:
        return _no_store(Response(metrics.render(), media_type=CONTENT_TYPE_LATEST))

    def health_endpoint(request: Request) -> Response:
        ok, report = health.check()
        return _no_store(JSONResponse(report, status_code=200 if ok else 503))

    def index(request: Request) -> Response:
        return _no_store(PlainTextResponse("pacs-ai: /metrics /healthz\n"))

    routes: list[BaseRoute] = [
        Route("/metrics", metrics_endpoint),
        Route("/healthz", health_endpoint),
        Route("/health", health_endpoint),
    ]
    routes.append(Mount("/", app=root) if root is not None else Route("/", index))
    return Starlette(routes=routes)


class MetricsServer:
    """``/metrics``, ``/healthz`` and optionally the dashboard (``root``) on ``host:port``, served by
    uvicorn in a background thread (port 0 picks a free port: see :attr:`port`)."""

    def __init__(
        self, metrics: Metrics, health: HealthCheck, host: str, port: int, root: ASGIApp | None = None
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.host = host
        self._server = AsgiServer(metrics_app(metrics, health, root), host, port, name="metrics-http")

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> None:
        """Bind and serve; raises PacsAiError when the port cannot be bound."""
        self._server.start()
        logger.info("metrics and health on http://%s:%d/metrics /healthz", self.host, self.port)

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
