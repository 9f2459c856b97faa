"""The daemon: wires receive -> store -> queue -> infer -> explain -> write -> send in one process.

``Service`` builds every component from the configuration, runs the periodic work on an APScheduler
background scheduler (worker loop, delivery loop, retention, queue gauges, watchdog) and stops in a
bounded time on SIGTERM: the listener stops accepting associations and finishes the C-STOREs in flight,
the worker finishes its batch or returns its jobs to the queue, and nothing is left half-written (every
file is written with temp file + fsync + rename, every state change is one transaction).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from pacs_ai import __version__
from pacs_ai.config import Config
from pacs_ai.daemon.wakeup import Doorbell, WakeUpObserver
from pacs_ai.daemon.worker_process import WorkerProcess, lower_priority
from pacs_ai.errors import ModelError, PacsAiError, ResultFormatError
from pacs_ai.ops.audit import AuditLog
from pacs_ai.ops.events import CompositeObserver, Observer
from pacs_ai.ops.health import HealthCheck
from pacs_ai.ops.metrics import Metrics, MetricsServer
from pacs_ai.ops.notify import SystemdNotifier
from pacs_ai.ops.tls import client_context, server_context
from pacs_ai.queue.jobstore import Job, JobStore, open_job_store
from pacs_ai.queue.retention import purge_old_jobs

if TYPE_CHECKING:  # built lazily: a role that is off never imports its module (torch for the worker)
    from starlette.applications import Starlette

    from pacs_ai.daemon.worker import Worker
    from pacs_ai.receive.listener import Listener
    from pacs_ai.send.deliveries import DeliveryProcessor
    from pacs_ai.studies.processor import StudyProcessor

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Roles:
    """Which parts this process runs: ``serve`` runs all, ``worker`` only the worker."""

    listener: bool = True
    worker: bool = True
    deliveries: bool = True
    worker_process: bool = False  # supervise a `pacs-ai worker` child instead of a worker thread
    beside_listener: bool = False  # the worker child of `serve`: a core stays free for the listener's process


def process_owner(role: str) -> str:
    """A lease owner name unique to this process: host, pid and role."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def reclaim_orphaned_leases(jobs: JobStore, host: str | None = None) -> tuple[int, int]:
    """End the leases held by pacs-ai processes of this host that no longer run (killed, crashed).

    Lease owners are ``host:pid:role`` (:func:`process_owner`); owners on other hosts are left to
    their lease expiry, since their liveness cannot be checked from here.
    """
    host = host or socket.gethostname()
    orphans = []
    for owner in jobs.lease_owners():
        owner_host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        if owner_host == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            orphans.append(owner)
    counts = jobs.expire_leases(orphans)
    if any(counts):
        log.warning(
            "took back %d job(s) and %d delivery(ies) left by stopped process(es) %s",
            counts[0],
            counts[1],
            ", ".join(sorted(orphans)),
        )
    return counts


def model_labels(folder: Path) -> dict[str, str]:
    """name, version and architecture from a model folder's ``model.json``, without importing torch.

    Raises ModelError when the card cannot be read; the full validation happens where the model is loaded.
    """
    path = Path(folder) / "model.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {k: str(data[k]) for k in ("name", "version", "architecture")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: cannot read the model card: {exc}") from exc


def torch_threads(config: Config, roles: Roles, *, single_image: bool = False) -> int:
    """CPU threads for inference: as configured, else all cores less one kept for the listener
    (``pacs_ai.infer.device.thread_count``); for a batch of one image (``single_image``) at most all
    cores unless configured: the listener has usually received it and is idle (the engine adds only the
    cores idle at that moment)."""
    from pacs_ai.infer.device import thread_count

    beside = (roles.listener or roles.beside_listener) and not single_image
    return thread_count(config.model.threads, reserve=1 if beside else 0)


class Service:
    """One pacs-ai process. ``start()`` returns once everything runs; ``stop()`` shuts down in order."""

    def __init__(self, config: Config, roles: Roles = Roles(), worker_process: WorkerProcess | None = None) -> None:
        """``worker_process``: a worker child already started (``pacs-ai serve`` starts it before importing
        the listener's libraries); its doorbells become this service's. Used when ``roles.worker_process``."""
        self.config = config
        self._early_child = worker_process
        self.roles = roles
        self._stop = threading.Event()
        self._loop_locks = {"worker": threading.Lock(), "deliveries": threading.Lock()}
        self._stopped = threading.Event()
        self._loop_threads: list[threading.Thread] = []
        self.notifier = SystemdNotifier()
        self.metrics = Metrics()
        storage = config.storage
        for folder in (storage.data_dir, storage.spool, storage.results, storage.outbox):
            folder.mkdir(parents=True, exist_ok=True)
        audit_path = config.logging.audit_file or storage.data_dir / "audit.log"
        self.audit = AuditLog(audit_path)
        # Wake-ups: the listener rings `jobs_bell` when a job is committed, the worker rings `results_bell`
        # when a job is done; a worker child inherits the ends it needs (see pacs_ai/daemon/wakeup.py).
        inherited = None if roles.listener else Doorbell.from_env()
        if worker_process is not None and worker_process.doorbells is not None:
            inherited = worker_process.doorbells
        self.jobs_bell, self.results_bell = inherited or (Doorbell(), Doorbell())
        self.observer: Observer = CompositeObserver(
            self.metrics, self.audit, WakeUpObserver(self.jobs_bell, self.results_bell)
        )
        # Migrating is explicit: serve and worker upgrade the schema when they start (idempotent; several
        # processes starting at once are serialised by the database), admin commands never do.
        self.jobs = open_job_store(config, upgrade=True)
        if self.jobs.upgraded is not None and self.jobs.upgraded.before != self.jobs.upgraded.after:
            log.info(
                "job database schema upgraded from version %d to %d",
                self.jobs.upgraded.before,
                self.jobs.upgraded.after,
            )
        self.scheduler = BackgroundScheduler(timezone="UTC")
        silence = max(60.0, config.worker.lease_seconds)
        self.health = HealthCheck(
            {name: silence for name, on in (("worker", roles.worker), ("deliveries", roles.deliveries)) if on}
        )
        self.listener = self._build_listener() if roles.listener else None
        self.worker = self._build_worker() if roles.worker else None
        self.worker_process = self._build_worker_process() if roles.worker_process else None
        self.studies = self._build_studies() if (roles.deliveries and config.studies.enabled) else None
        self.deliveries = self._build_deliveries() if roles.deliveries else None
        self.metrics_server = (
            MetricsServer(self.metrics, self.health, config.metrics.host, config.metrics.port, self._build_dashboard())
            if config.metrics.enabled
            else None
        )

    # -- construction -------------------------------------------------------------------------------

    def _build_dashboard(self) -> Starlette | None:
        """The admin dashboard, served under ``/`` of the metrics port (None when turned off)."""
        if not self.config.dashboard.enabled:
            return None
        from pacs_ai.dashboard import dashboard_app

        return dashboard_app(self.config, self.jobs, health=self.health, audit=self.audit.admin_action)

    def _build_listener(self) -> Listener:
        from pacs_ai.receive.listener import Listener
        from pacs_ai.store.spool import Spool

        tls = self.config.listener.tls
        spool = Spool(self.config.storage.spool)
        removed = spool.remove_stale_temp(writer_alive=_pid_alive)
        if removed:
            log.warning("removed %d partial file(s) a stopped listener left in the spool (never acknowledged)", removed)
        listener = Listener(
            self.config.listener,
            spool,
            self.jobs,
            observer=self.observer,
            ssl_context=server_context(tls) if tls else None,
        )
        self.health.register_probe("listener", lambda: listener.running or self._stop.is_set())
        return listener

    def _build_worker(self) -> Worker:
        from pacs_ai.daemon.worker import GIL_SWITCH_INTERVAL_S, Worker
        from pacs_ai.infer.device import thread_count
        from pacs_ai.infer.engine import InferenceEngine
        from pacs_ai.send.deliveries import destination_names
        from pacs_ai.write.overlay import SC_MAX_SIDE
        from pacs_ai.write.results import write_results

        model = self.config.model
        # Process-wide: the forward pass gives the lock back to the loader and writer threads quickly.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # JPEG 2000 (pylibjpeg-openjpeg's OpenJPEG) decodes a full-size radiograph's code-blocks on every
        # core when told so; an administrator's own setting wins.
        os.environ.setdefault("OPJ_NUM_THREADS", str(thread_count()))
        engine = InferenceEngine(
            model.path,
            device=model.device,
            batch_size=model.batch_size,
            threads=torch_threads(self.config, self.roles),
            single_image_threads=torch_threads(self.config, self.roles, single_image=True),
        )
        info = engine.describe()
        self.metrics.set_model_info({k: str(v) for k, v in info.items()})
        log.info("model loaded: %s", info)
        from pacs_ai.route.build import build_router  # imports torch: only where the model runs

        router = build_router(self.config.routing, engine.cards[0])
        for line in router.describe():
            log.info("routing: %s", line)
        from pacs_ai.shadow.scoring import load_shadow_scorer

        shadow = load_shadow_scorer(
            model.shadow, device=model.device, batch_size=model.batch_size, threads=torch_threads(self.config, self.roles)
        )
        return Worker(
            self.jobs,
            engine,
            write_results,
            self.config.storage.results,
            destination_names(self.config.destinations),
            owner=process_owner("worker"),
            batch_size=model.batch_size,
            lease_seconds=self.config.worker.lease_seconds,
            observer=self.observer,
            router=router,
            shadow=shadow,
            display_max_side=SC_MAX_SIDE,
        )

    def _build_worker_process(self) -> WorkerProcess:
        child = self._early_child or WorkerProcess(
            self.config.source, niceness=self.config.worker.niceness, doorbells=(self.jobs_bell, self.results_bell)
        )
        self.health.register_probe("worker process", lambda: child.alive or self._stop.is_set())
        try:
            # Only the labels are read here: importing torch to validate the card would cost this process
            # seconds of start-up and hundreds of MB; the worker child loads and checks the model.
            cards = [model_labels(path) for path in self.config.model.path]
            for path, card in zip(self.config.model.path, cards, strict=True):
                log.info("model %s %s (%s) from %s; loaded by the worker process", card["name"], card["version"], card["architecture"], path)
            self.metrics.set_model_info(
                {
                    "name": "+".join(c["name"] for c in cards),
                    "version": "+".join(c["version"] for c in cards),
                    "architecture": "+".join(c["architecture"] for c in cards),
                    "device": self.config.model.device,
                }
            )
        except PacsAiError as exc:  # the child reports it too, and keeps being restarted until fixed
            log.error("model: %s", exc)
        self._finished_watermark = self.jobs.now()
        return child

    def _supervise_worker(self) -> None:
        assert self.worker_process is not None
        if not self.worker_process.alive and not self._stop.is_set():
            reclaim_orphaned_leases(self.jobs)  # what the dead child held goes back to the queue now
        self.worker_process.supervise()

    def _observe_finished_jobs(self) -> None:
        """Feed the metrics with jobs that other processes (the worker child) finished."""
        for job in self.jobs.finished_since(self._finished_watermark):
            timings = _stored_timings(job) if job.state == "done" else {}
            self.metrics.job_finished(job.id, str(job.state), timings.get("forward", 0.0), timings.get("cam", 0.0))
            if job.finished_at is not None:
                self._finished_watermark = max(self._finished_watermark, job.finished_at)

    def _build_deliveries(self) -> DeliveryProcessor:
        from pacs_ai.send.deliveries import DeliveryProcessor

        delivery = self.config.delivery
        contexts = {d.name: client_context(d.tls) for d in self.config.destinations if d.tls}
        return DeliveryProcessor(
            self.jobs,
            self.config.destinations,
            self.config.storage.outbox,
            calling_ae_title=delivery.calling_ae_title or self.config.listener.ae_title,
            owner=process_owner("deliveries"),
            timeout_s=delivery.timeout_s,
            ssl_contexts=contexts,
            observer=self.observer,
            studies=self.studies.studies if self.studies is not None else None,
            keep_open_s=delivery.keep_open_s,
            associations=delivery.associations,
        )

    def _build_studies(self) -> StudyProcessor | None:
        from pacs_ai.send.deliveries import destination_names
        from pacs_ai.studies.processor import StudyProcessor, read_card, study_policy
        from pacs_ai.studies.store import StudyStore

        try:
            policy = study_policy(read_card(self.config.model.path[0]), self.config.studies.rule)
        except PacsAiError as exc:
            log.error("studies: no study results until pacs-ai is restarted with a readable model card: %s", exc)
            return None
        log.info(
            "studies: complete %.0f s after the last image; study rule %s, threshold %.3g (%s)",
            self.config.studies.quiet_period_s, policy.rule, policy.threshold, policy.source,
        )
        return StudyProcessor(
            StudyStore(self.jobs),
            self.config.storage.results,
            destination_names(self.config.destinations),
            policy,
            quiet_period_s=self.config.studies.quiet_period_s,
        )

    # -- periodic work ----------------------------------------------------------------------------

    def _loop(
        self, body: Callable[[], None], bell: Doorbell, interval_s: float, before: Callable[[], None] | None = None
    ) -> None:
        """Run ``before`` once, then ``body`` whenever ``bell`` rings, and at least every ``interval_s`` seconds,
        until stopped."""
        if before is not None:
            before()
        while not self._stop.is_set():
            body()
            bell.wait(interval_s)

    def _start_loop(
        self, name: str, body: Callable[[], None], bell: Doorbell, interval_s: float,
        before: Callable[[], None] | None = None,
    ) -> None:
        thread = threading.Thread(
            target=self._loop, args=(body, bell, interval_s, before), name=f"{name}-loop", daemon=True
        )
        self._loop_threads.append(thread)
        thread.start()

    def _warm_up(self) -> None:
        """Model and codecs warmed before the first claim (in the worker's thread: the listener is not
        held up); the result writer warms up in the worker's writer thread meanwhile."""
        from pacs_ai.daemon.warmup import warm_up

        assert self.worker is not None
        started = time.monotonic()
        try:
            timings = warm_up(
                self.worker.engine, self.worker.writer, self.config.storage.results, background=self.worker.warm_writer
            )
            log.info(
                "worker warmed up in %.2f s (%s)",
                time.monotonic() - started,
                ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()),
            )
        except Exception:  # noqa: BLE001 - never fatal: the first job pays the cold start instead
            log.exception("warm-up failed")
        finally:
            if not self.roles.listener:  # a worker child started by `serve` now yields to the listener
                niceness = lower_priority()
                if niceness is not None:
                    log.info("worker process now runs at nice %+d", niceness)

    def _work(self) -> None:
        assert self.worker is not None
        self.health.beat("worker")
        if self._stop.is_set() or not self._loop_locks["worker"].acquire(blocking=False):
            return
        try:
            self.worker.drain(self._stop)
        except PacsAiError as exc:
            log.error("worker: %s", exc)
        except Exception:  # the loop must survive anything a job throws at it
            log.exception("worker loop failed; will run again")
        finally:
            self._loop_locks["worker"].release()
        self.health.beat("worker")

    def _deliver(self) -> None:
        assert self.deliveries is not None
        self.health.beat("deliveries")
        if self._stop.is_set() or not self._loop_locks["deliveries"].acquire(blocking=False):
            return
        try:
            while not self._stop.is_set() and self.deliveries.run_once():
                self.health.beat("deliveries")
        except PacsAiError as exc:
            log.error("deliveries: %s", exc)
        except Exception:
            log.exception("delivery loop failed; will run again")
        finally:
            self._loop_locks["deliveries"].release()
        self.health.beat("deliveries")

    def _complete_studies(self) -> None:
        assert self.studies is not None
        if self._stop.is_set():
            return
        try:
            self.studies.run_once()
        except PacsAiError as exc:
            log.error("studies: %s", exc)
        except Exception:
            log.exception("study completion failed; will run again")

    def _update_gauges(self) -> None:
        try:
            if self.worker_process is not None:
                self._observe_finished_jobs()
            self.metrics.update_queue(self.jobs.counts(), self.jobs.delivery_counts())
        except Exception:
            log.exception("could not read queue depth")

    def _watchdog(self) -> None:
        healthy, detail = self.health.check()
        counts = self.jobs.counts() if healthy else {}
        if healthy:
            self.notifier.watchdog()
            queued = counts.get("queued", 0) + counts.get("failed", 0)
            self.notifier.status(f"running; {queued} job(s) waiting, {counts.get('done', 0)} done")
        else:
            log.warning("health check failing: %s", detail)

    def run_retention(self) -> int:
        """Remove jobs older than ``retention_days`` whose results were delivered, with their files."""
        if self.deliveries:
            self.deliveries.dead_letter_unconfigured()
        age = timedelta(days=self.config.storage.retention_days)
        report = purge_old_jobs(
            self.jobs, age, spool_dir=self.config.storage.spool, results_dir=self.config.storage.results
        )
        if report.job_ids:
            log.info("retention: removed %d job(s) older than %s", len(report.job_ids), age)
        for problem in report.errors:
            log.warning("retention: could not remove the files of %s", problem)
        return len(report.job_ids)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every part this process runs, then tell systemd we are ready."""
        if self.worker_process:  # first: its start-up (torch, model, warm-up) is the longest
            self.worker_process.start()
        if self.metrics_server:
            self.metrics_server.start()
            if self.config.dashboard.enabled:
                log.info("admin dashboard on http://%s:%d/", self.config.metrics.host, self.metrics_server.port)
        if self.listener:
            self.listener.start()
            log.info(
                "listening as %s on %s:%d",
                self.config.listener.ae_title,
                self.config.listener.host,
                self.listener.port,
            )
        sched = self.scheduler
        common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        if self.worker:
            self._start_loop(
                "worker", self._work, self.jobs_bell, self.config.worker.poll_interval_s, before=self._warm_up
            )
        if self.worker_process:
            sched.add_job(self._supervise_worker, "interval", seconds=2, id="worker-process", **common)
        if self.deliveries:
            self._start_loop("deliveries", self._deliver, self.results_bell, self.config.delivery.poll_interval_s)
            sched.add_job(self.run_retention, "interval", hours=1, id="retention", **common)
        if self.studies:
            sched.add_job(
                self._complete_studies, "interval", seconds=self.config.studies.poll_interval_s, id="studies", **common
            )
        sched.add_job(self._update_gauges, "interval", seconds=5, id="gauges", **common)
        watchdog = self.notifier.watchdog_interval()
        if watchdog:
            sched.add_job(self._watchdog, "interval", seconds=max(1.0, watchdog / 2), id="watchdog", **common)
        reclaim_orphaned_leases(self.jobs)
        if self.deliveries:
            self.deliveries.dead_letter_unconfigured()
        sched.start()
        self._update_gauges()
        self.notifier.ready()
        self.notifier.status("running")
        log.info("pacs-ai %s started (pid %d)", __version__, os.getpid())

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop in order: no new associations, finish in-flight work, close the store."""
        if self._stopped.is_set():
            return
        self._stop.set()
        self.jobs_bell.ring()
        self.results_bell.ring()
        self.notifier.stopping()
        log.info("stopping: no new associations; finishing work in flight")
        started = time.monotonic()
        if self.listener:
            self.listener.stop()
        self.scheduler.shutdown(wait=False)
        for name, lock in self._loop_locks.items():
            # Wait for a running loop to notice the stop event; its jobs are released or finished.
            remaining = max(0.1, timeout_s - (time.monotonic() - started))
            if not lock.acquire(timeout=remaining):
                log.warning("%s loop did not finish within %.0f s; its leases will expire", name, timeout_s)
        if self.deliveries:
            self.deliveries.close(max(0.1, timeout_s - (time.monotonic() - started)))
        if self.worker_process:
            remaining = max(1.0, timeout_s - (time.monotonic() - started))
            self.worker_process.stop(remaining)
        if self.metrics_server:
            self.metrics_server.stop()
        self.jobs.close()
        self._stopped.set()
        log.info("stopped in %.1f s", time.monotonic() - started)

    def run_forever(self) -> int:
        """Start, block until SIGTERM or SIGINT, stop. Returns the exit status."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()
        return 0


def _stored_timings(job: Job) -> Mapping[str, float]:
    """Seconds per step of a done job's stored result (empty when it has none or cannot be read)."""
    try:
        result = job.job_result()
    except ResultFormatError:
        return {}
    return result.timings if result is not None else {}
