"""``pacs-ai status [--config FILE] [--json]``: how the installed service is doing, for a person or a script.

It reads the configuration and the job store and probes, without changing anything:

* listener: a C-ECHO to the configured listener (short timeout); a rejected association still proves
  the listener is up; a refused connection means it is down;
* health: the daemon's ``/healthz`` when metrics are enabled;
* jobs per state, the oldest queued job and its age, deliveries per destination and state;
* model: each ``model.path`` folder's card (``model.json``; the weights are not loaded);
* device: the configured device and whether CUDA is available.

Run it as the service user (``sudo -u pacs-ai pacs-ai status --config /etc/pacs-ai/pacs-ai.toml``) so
that it can read the configuration and database and creates nothing owned by root. A SQLite database
that does not exist yet is reported, not created. Exit status 0 when the report was made; with
``--strict``, 3 when something is down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from pacs_ai.cli.common import add_config_argument, config_from_args, print_json
from pacs_ai.cli.config_check import mask_url
from pacs_ai.config import Config

__all__ = ["collect_status", "format_status", "register"]

PROBE_TIMEOUT_S = 3.0
STATUS_AE = "PACSAI_STATUS"
DELIVERY_STATES = ("pending", "sending", "failed", "done", "dead")
PENDING_STATES = ("pending", "sending", "failed")


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _probe_tls_context(config: Config) -> ssl.SSLContext | None:
    tls = config.listener.tls
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a liveness probe of our own listener, not an authentication
    if tls.ca_file is not None and tls.cert_file is not None and tls.key_file is not None:
        # mutual TLS: present the listener's own certificate (works when it allows clientAuth)
        with contextlib.suppress(OSError, ssl.SSLError):
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


def probe_listener(config: Config, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """C-ECHO the configured listener: ``{"up": bool, "detail": str, "echo_ms": float | None, ...}``."""
    from pynetdicom import AE

    from pacs_ai.receive.contexts import VERIFICATION_SOP_CLASS

    listener = config.listener
    host, port = _probe_host(listener.host), listener.port
    report: dict[str, Any] = {
        "address": f"{listener.ae_title}@{host}:{port}",
        "tls": listener.tls is not None,
        "up": False,
        "listening": False,
        "echo_ms": None,
    }
    # Always our own AE title: with allowed_calling_aets set the association is rejected, which still
    # proves the listener is up, and the audit log never shows the probe as a modality.
    ae = AE(ae_title=STATUS_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    ctx = _probe_tls_context(config)
    started = time.monotonic()
    try:
        # pynetdicom hands tls_args[1] to wrap_socket(server_hostname=...), where None is allowed (no SNI)
        # though its annotation says str
        assoc = ae.associate(host, port, ae_title=listener.ae_title, tls_args=(ctx, None) if ctx else None)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - any failure is a finding, not a crash
        assoc, error = None, f"{type(exc).__name__}: {exc}"
    else:
        error = ""
    if assoc is not None and assoc.is_established:
        try:
            rsp = assoc.send_c_echo()
            ok = rsp is not None and "Status" in rsp and int(rsp.Status) == 0
        finally:
            assoc.release()
        report["up"] = bool(ok)
        report["listening"] = True
        report["echo_ms"] = round((time.monotonic() - started) * 1000, 1)
        report["detail"] = "C-ECHO answered" if ok else "association accepted, C-ECHO failed"
        return report
    if assoc is not None and assoc.is_rejected:
        report["up"] = report["listening"] = True
        report["detail"] = "association rejected (the listener is up; the probe's AE title or context was refused)"
        return report
    try:  # no DICOM answer: is anything listening at all?
        with socket.create_connection((host, port), timeout=timeout):
            report["listening"] = True
            if ctx is not None:
                report["detail"] = ("port open; TLS handshake refused for the probe (mutual TLS needs a client "
                                    "certificate it lacks), C-ECHO not verified")
            else:
                report["detail"] = "port open, but no DICOM answer"
    except OSError as exc:
        report["detail"] = (error or str(exc.strerror or exc)).lower()
    return report


def probe_health(config: Config, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any] | None:
    """The daemon's /healthz report, or None when metrics are disabled."""
    metrics = config.metrics
    if not metrics.enabled:
        return None
    host = _probe_host(metrics.host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{metrics.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        return {"url": url, "ok": False, "code": exc.code, "failing": body.get("failing", [])}
    except (OSError, ValueError) as exc:
        return {"url": url, "ok": False, "code": None, "error": str(getattr(exc, "reason", exc))}
    return {"url": url, "ok": body.get("status") == "ok", "code": 200, "failing": body.get("failing", [])}


def read_queue(config: Config) -> dict[str, Any]:
    """Jobs per state, the oldest queued job, deliveries per destination (from the job store)."""
    url = config.database_url
    report: dict[str, Any] = {"database": mask_url(url), "ok": False}
    from pacs_ai.queue.engine import missing_sqlite_file

    missing = missing_sqlite_file(url)
    if missing is not None:
        report["error"] = f"no database yet at {missing} (the service has not run)"
        return report
    from pacs_ai.errors import PacsAiError
    from pacs_ai.queue.jobstore import open_job_store

    try:  # opening reads the schema version and writes nothing; an old schema is reported, not upgraded
        store = open_job_store(config, connect_timeout_s=5)
    except PacsAiError as exc:
        report["error"] = str(exc)
        return report
    try:
        report["jobs"] = store.counts()
        oldest = store.oldest_queued()
        if oldest is not None:
            received = oldest.received_at if oldest.received_at.tzinfo else oldest.received_at.replace(tzinfo=UTC)
            report["oldest_queued"] = {
                "job_id": oldest.id,
                "received_at": received.isoformat(timespec="seconds"),
                "age_s": round((datetime.now(UTC) - received).total_seconds(), 1),
            }
        else:
            report["oldest_queued"] = None
        deliveries = store.delivery_counts()
        report["deliveries"] = deliveries
        report["deliveries_partial"] = store.partly_delivered_counts()
        names = [d.name for d in config.destinations]
        report["deliveries_pending"] = {
            name: sum(deliveries.get(name, {}).get(s, 0) for s in PENDING_STATES)
            for name in dict.fromkeys([*names, *deliveries])
        }
        report["ok"] = True
    except PacsAiError as exc:
        report["error"] = str(exc)
    finally:
        store.close()
    return report


def read_models(config: Config) -> list[dict[str, Any]]:
    """The card of each model folder (weights are not loaded, only looked for)."""
    from pacs_ai.errors import PacsAiError
    from pacs_ai.infer.model_card import PT_FILE, WEIGHTS_FILE, load_card

    models = []
    for folder in config.model.path:
        entry: dict[str, Any] = {"path": str(folder), "ok": False}
        try:
            card = load_card(folder)
        except (PacsAiError, OSError, ValueError) as exc:
            entry["error"] = str(exc)
        else:
            entry.update(name=card.name, version=card.version, architecture=card.architecture,
                         input_size=getattr(card.input, "size", None), threshold=card.threshold)
            weights = [f for f in (WEIGHTS_FILE, PT_FILE) if (folder / f).is_file()]
            entry["weights"] = weights[0] if weights else None
            entry["ok"] = bool(weights)
            if not weights:
                entry["error"] = f"no weights ({WEIGHTS_FILE} or {PT_FILE})"
        models.append(entry)
    return models


def read_device(config: Config) -> dict[str, Any]:
    report: dict[str, Any] = {"configured": config.model.device}
    try:
        import torch
    except ImportError as exc:
        report.update(cuda_available=False, effective=None, error=f"torch cannot be imported: {exc}")
        return report
    available = bool(torch.cuda.is_available())
    report["cuda_available"] = available
    report["torch"] = torch.__version__
    if available:
        report["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    effective = "cuda" if config.model.device == "cuda" or (config.model.device == "auto" and available) else "cpu"
    report["effective"] = effective
    if config.model.device == "cuda" and not available:
        report["error"] = "device = \"cuda\" but CUDA is not available"
    return report


def collect_status(config: Config) -> dict[str, Any]:
    """Everything ``pacs-ai status`` reports, as plain data."""
    queue = read_queue(config)
    status: dict[str, Any] = {
        "config": str(config.source) if config.source else "(embedded defaults)",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "listener": probe_listener(config),
        "health": probe_health(config),
        "worker_enabled": config.worker.enabled,
        "queue": queue,
        "models": read_models(config),
        "device": read_device(config),
    }
    listener = status["listener"]
    status["ok"] = bool(
        (listener["up"] or (listener["tls"] and listener["listening"]))
        and queue["ok"]
        and all(m["ok"] for m in status["models"])
        and "error" not in status["device"]
        and (status["health"] is None or status["health"]["ok"])
    )
    return status


def _age(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s} s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {m} min"
    return f"{hours // 24} d {hours % 24} h"


def format_status(status: dict[str, Any]) -> str:
    """The human-readable table."""
    rows: list[tuple[str, str]] = []
    listener = status["listener"]
    echo = f", {listener['echo_ms']:.0f} ms" if listener.get("echo_ms") is not None else ""
    rows.append(("listener", f"{listener['address']}{' (TLS)' if listener['tls'] else ''}  "
                             f"{'UP' if listener['up'] else 'LISTENING' if listener['listening'] else 'DOWN'}: "
                             f"{listener['detail']}{echo}"))
    health = status["health"]
    if health is not None:
        if health["ok"]:
            text = "ok"
        elif health.get("code") is None:
            text = f"UNREACHABLE: {health.get('error')}"
        else:
            text = f"FAILING ({health['code']}): {', '.join(health.get('failing') or []) or '?'}"
        rows.append(("health", f"{health['url']}  {text}"))
    queue = status["queue"]
    rows.append(("database", queue["database"] + ("" if queue["ok"] else f"  ERROR: {queue.get('error')}")))
    if queue["ok"]:
        rows.append(("jobs", "  ".join(f"{state} {n}" for state, n in queue["jobs"].items())))
        oldest = queue["oldest_queued"]
        rows.append(("oldest queued", "none" if oldest is None else
                     f"job {oldest['job_id']}, received {oldest['received_at']} ({_age(oldest['age_s'])} ago)"))
        pending = queue["deliveries_pending"]
        if not pending:
            rows.append(("deliveries", "no destinations (results go to the outbox)"))
        for name, n in pending.items():
            states = queue["deliveries"].get(name, {})
            detail = "  ".join(f"{s} {states.get(s, 0)}" for s in DELIVERY_STATES)
            partial = queue.get("deliveries_partial", {}).get(name, 0)
            extra = f"; {partial} partly delivered (some objects stored, see jobs show)" if partial else ""
            rows.append(("deliveries", f"{name}: {n} pending  ({detail}){extra}"))
    for model in status["models"]:
        if model["ok"]:
            text = (f"{model['name']} {model['version']} ({model['architecture']}, {model['input_size']} px, "
                    f"threshold {model['threshold']:.3g})  {model['path']}")
        else:
            text = f"ERROR: {model['error']}  {model['path']}"
        rows.append(("model", text))
    device = status["device"]
    text = f"{device['configured']} -> {device.get('effective')}"
    text += f" (CUDA: {', '.join(device['cuda_devices'])})" if device.get("cuda_devices") else " (CUDA not available)"
    if device.get("error"):
        text += f"  ERROR: {device['error']}"
    rows.append(("device", text))
    if not status["worker_enabled"]:
        rows.append(("worker", "disabled here ([worker] enabled = false): jobs are processed by `pacs-ai worker`"))
    width = max(len(k) for k, _ in rows)
    lines = [f"pacs-ai status  {status['time']}  config {status['config']}"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append(f"  {'overall':<{width}}  {'OK' if status['ok'] else 'PROBLEMS (see above)'}")
    return "\n".join(lines) + "\n"


def run_status(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    pynetdicom_logger = logging.getLogger("pynetdicom")
    previous = pynetdicom_logger.level
    pynetdicom_logger.setLevel(logging.CRITICAL)  # a failed probe is reported in the table, not logged
    try:
        status = collect_status(config)
    finally:
        pynetdicom_logger.setLevel(previous)
    if args.json:
        print_json(status)
    else:
        sys.stdout.write(format_status(status))
    return 3 if args.strict and not status["ok"] else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status``."""
    parser = subparsers.add_parser(
        "status",
        help="show listener, queue, deliveries, model and device status",
        description="Probe the listener (C-ECHO), read the job store and the model card, and print a "
        "summary. Changes nothing. Run it as the service user.",
    )
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--strict", action="store_true", help="exit with status 3 when something is down")
    parser.set_defaults(func=run_status)
