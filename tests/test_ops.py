"""Operations: logging formats and the PHI filter, the audit log, metrics, /healthz, sd_notify."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import urllib.error
import urllib.request

import pytest

from pacs_ai.config import LoggingConfig
from pacs_ai.ops.audit import AuditLog
from pacs_ai.ops.events import CompositeObserver
from pacs_ai.ops.health import HealthCheck
from pacs_ai.ops.logging_setup import REDACTED, configure_logging
from pacs_ai.ops.metrics import Metrics, MetricsServer
from pacs_ai.ops.notify import SystemdNotifier
from support.job_results import job_result

PHI = ("Doe^John", "PID-4711", "19700101")


@pytest.fixture
def log_stream():
    """configure_logging into a StringIO; the previous root logger state is restored afterwards."""
    import sys
    import threading

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("pynetdicom").level)
    hooks = (sys.excepthook, threading.excepthook)
    stream = io.StringIO()
    yield stream
    sys.excepthook, threading.excepthook = hooks
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
    root.setLevel(saved[1])
    logging.getLogger("pynetdicom").setLevel(saved[2])


def _emit_phi(logger: logging.Logger) -> None:
    logger.info("stored PatientName=%s PatientID=%s sop=1.2.3.4", PHI[0], PHI[1], extra={"job_id": 7})
    logger.info("attributes", extra={"PatientBirthDate": PHI[2], "patient": {"patient_name": PHI[0]}})
    logger.info("dataset:\n(0010,0010) Patient's Name   PN: '%s'\n(0010,0020) Patient ID   LO: '%s'", PHI[0], PHI[1])
    try:
        raise ValueError(f"bad PatientID={PHI[1]}")
    except ValueError:
        logger.exception("failed job_id=%d", 8)


def test_json_logs_redact_phi(log_stream):
    configure_logging(LoggingConfig(format="json", level="INFO", log_phi=False), stream=log_stream)
    _emit_phi(logging.getLogger("pacs_ai.test"))
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert len(lines) == 4
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])
    assert lines[0]["logger"] == "pacs_ai.test" and lines[0]["level"] == "INFO" and lines[0]["job_id"] == 7
    assert "sop=1.2.3.4" in lines[0]["msg"] and f"PatientName={REDACTED}" in lines[0]["msg"]
    assert lines[1]["PatientBirthDate"] == REDACTED and lines[1]["patient"]["patient_name"] == REDACTED
    assert "ValueError" in lines[3]["exc"]
    text = log_stream.getvalue()
    for value in PHI:
        assert value not in text


def test_uncaught_thread_exceptions_are_logged_and_redacted(log_stream):
    import threading

    configure_logging(LoggingConfig(format="json"), stream=log_stream)

    def boom() -> None:
        raise ValueError(f"cannot read PatientName={PHI[0]}")

    thread = threading.Thread(target=boom, name="reader")
    thread.start()
    thread.join()
    (entry,) = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert entry["level"] == "ERROR" and "thread reader" in entry["msg"] and "ValueError" in entry["exc"]
    assert PHI[0] not in log_stream.getvalue()


def test_plain_logs_redact_phi_unless_allowed(log_stream):
    configure_logging(LoggingConfig(format="plain", level="INFO", log_phi=False), stream=log_stream)
    logger = logging.getLogger("pacs_ai.test")
    _emit_phi(logger)
    logger.debug("hidden at INFO")
    text = log_stream.getvalue()
    assert "INFO pacs_ai.test: stored" in text and "job_id=7" in text and "hidden" not in text
    assert not any(value in text for value in PHI)
    # the admin may turn PHI logging on; a second call replaces the handler (no duplicate lines)
    allowed = io.StringIO()
    configure_logging(LoggingConfig(format="plain", level="DEBUG", log_phi=True), stream=allowed)
    _emit_phi(logger)
    assert all(value in allowed.getvalue() for value in PHI)
    assert log_stream.getvalue() == text
    assert allowed.getvalue().count("stored PatientName") == 1


def test_audit_log_records_associations_and_deliveries(tmp_path, caplog):
    audit = AuditLog(tmp_path / "sub" / "audit.log")
    observer = CompositeObserver(audit, Metrics())
    with caplog.at_level(logging.INFO, logger="pacs_ai.audit"):
        observer.association("MODALITY1", "10.0.0.5:40000", True)
        observer.association("EVIL", "10.0.0.9:40001", False, "calling AE title not allowed")
        observer.image_received(1, "1.2.3", 100, False)
        observer.delivered(1, "pacs", 2.5)
    entries = [json.loads(line) for line in (tmp_path / "sub" / "audit.log").read_text().splitlines()]
    assert [e["event"] for e in entries] == ["association", "association", "delivered"]
    assert entries[0]["calling_aet"] == "MODALITY1" and entries[0]["accepted"] is True
    assert entries[1]["accepted"] is False and entries[1]["reason"] == "calling AE title not allowed"
    assert entries[2]["job_id"] == 1 and entries[2]["destination"] == "pacs" and entries[2]["end_to_end_s"] == 2.5
    assert len([r for r in caplog.records if r.name == "pacs_ai.audit"]) == 3
    assert oct((tmp_path / "sub" / "audit.log").stat().st_mode & 0o777) == oct(0o640 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_and_healthz_endpoint():
    metrics = Metrics()
    metrics.image_received(1, "1.2.3", 10, False)
    metrics.image_received(2, "1.2.4", 10, True)
    metrics.image_rejected(0xA700, "disk full")
    metrics.job_finished(1, "done", 0.12, 0.05)
    metrics.job_finished(2, "failed", 0.0, 0.0)
    metrics.delivered(1, "pacs", 3.0)
    metrics.delivery_failed(2, "pacs", "refused", False)
    metrics.set_model_info({"name": "reference", "version": "1.0"})
    metrics.update_queue({"queued": 3, "running": 1}, {"pacs": {"pending": 2}})
    metrics.update_queue({"queued": 1}, {"pacs": {"done": 5}})  # vanished states drop to 0
    health = HealthCheck({"listener": 30.0, "worker": 30.0})
    listener_up = [True]
    health.register_probe("listener_running", lambda: listener_up[0])
    with MetricsServer(metrics, health, "127.0.0.1", 0) as server:
        base = f"http://127.0.0.1:{server.port}"
        status, text = _get(base + "/metrics")
        assert status == 200
        for line in (
            "pacs_ai_images_received_total 2.0",
            'pacs_ai_images_rejected_total{status="0xA700"} 1.0',
            'pacs_ai_jobs_finished_total{state="done"} 1.0',
            "pacs_ai_inference_seconds_count 1.0",
            "pacs_ai_gradcam_seconds_count 1.0",
            "pacs_ai_end_to_end_seconds_count 1.0",
            'pacs_ai_deliveries_failed_total{destination="pacs"} 1.0',
            'pacs_ai_jobs{state="queued"} 1.0',
            'pacs_ai_jobs{state="running"} 0.0',
            'pacs_ai_deliveries{destination="pacs",state="pending"} 0.0',
            'pacs_ai_deliveries{destination="pacs",state="done"} 5.0',
            'pacs_ai_model_info{name="reference",version="1.0"} 1.0',
        ):
            assert line in text.splitlines(), line
        health.beat("listener")
        health.beat("worker")
        status, body = _get(base + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        listener_up[0] = False
        status, body = _get(base + "/healthz")
        assert status == 503 and json.loads(body)["failing"] == ["listener_running"]
        assert _get(base + "/nothing")[0] == 404


def test_health_names_a_silent_component(monkeypatch):
    import pacs_ai.ops.health as health_module

    now = [1000.0]
    monkeypatch.setattr(health_module.time, "monotonic", lambda: now[0])
    health = HealthCheck({"listener": 30.0, "worker": 60.0})
    assert health.check()[0]
    now[0] += 45  # neither has beaten: the listener has been silent for too long since start
    health.beat("worker")
    ok, report = health.check()
    assert not ok and report["failing"] == ["listener"] and "listener" in report["message"]
    health.beat("listener")
    now[0] += 61
    health.beat("listener")
    ok, report = health.check()
    assert not ok and report["failing"] == ["worker"] and report["components"]["worker"]["silence_s"] == 61.0
    health.register_probe("broken", lambda: 1 / 0)
    assert health.check()[1]["probes"]["broken"]["error"].startswith("ZeroDivisionError")


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify(tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@pacs-ai-test-{os.getpid()}" if abstract else str(tmp_path / "notify.sock")
    sock.bind("\0" + name[1:] if abstract else name)
    sock.settimeout(5)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "20000000"})
        assert notifier.enabled and notifier.watchdog_interval() == 10.0
        assert notifier.ready() and notifier.status("idle,\n 3 queued") and notifier.watchdog() and notifier.stopping()
        got = [sock.recv(4096).decode() for _ in range(4)]
        assert got == ["READY=1", "STATUS=idle, 3 queued", "WATCHDOG=1", "STOPPING=1"]
        notifier.close()
    finally:
        sock.close()


def test_sd_notify_without_systemd_is_a_noop():
    notifier = SystemdNotifier({})
    assert not notifier.enabled and notifier.ready() is False and notifier.watchdog_interval() is None
    other = SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent/socket", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.ready() is False  # logged, not raised
    assert other.watchdog_interval() is None  # the watchdog is for another process


# ----------------------------------------------------------------------------------------------------
# pacs-ai config check / pacs-ai status
# ----------------------------------------------------------------------------------------------------


def _cli(*argv: str) -> tuple[int, str, str]:
    import contextlib

    from pacs_ai.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_config_check(tmp_path):
    from pacs_ai.config import load_config

    good = tmp_path / "good.toml"
    good.write_text(
        '[listener]\nport = 11999\n[database]\nurl = "postgresql+psycopg://pacs:secret@db.example/pacs"\n'
        '[model]\npath = ["no-such-model"]\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.1"\nport = 104\n'
        '[destinations.tls]\nca_file = "ca.crt"\n'
    )
    code, out, err = _cli("config", "check", str(good))
    assert code == 0 and "OK" in err and "secret" not in out and "pacs:***@db.example" in out
    assert "model.path[0]" in err and "destinations[0].tls.ca_file" in err  # warnings, not errors
    # the effective configuration is TOML that reads back to the same values (password masked)
    echoed = tmp_path / "echoed.toml"
    echoed.write_text(out)
    a, b = load_config(good), load_config(echoed)
    assert a.listener == b.listener and a.destinations == b.destinations and a.storage == b.storage
    code, out, _ = _cli("config", "check", str(good), "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["config"]["listener"]["port"] == 11999
    assert {w["key"] for w in data["warnings"]} >= {"model.path[0]"}

    bad = tmp_path / "bad.toml"
    bad.write_text("[listener]\nport = 70000\n")
    code, out, err = _cli("config", "check", str(bad))
    assert code == 1 and "listener.port" in err and out == ""
    code, out, _ = _cli("config", "check", str(bad), "--json")
    assert code == 1 and json.loads(out)["key"] == "listener.port"
    (tmp_path / "typo.toml").write_text("[listener]\nprot = 1\n")
    assert "listener.prot" in _cli("config", "check", str(tmp_path / "typo.toml"))[2]


def test_status_reports_listener_queue_model_and_device(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from pacs_ai.infer.model_card import ModelCard
    from pacs_ai.queue.jobstore import JobStore

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(ModelCard(name="tiny", architecture="resnet50", version="9.9").to_json())
    (model / "model.safetensors").write_bytes(b"")  # status looks for the weights, never loads them
    data = tmp_path / "data"
    data.mkdir()
    store = JobStore(f"sqlite:///{data / 'pacs-ai.db'}", upgrade=True)
    for i in range(3):
        store.enqueue(sop_instance_uid=f"1.2.3.{i}", study_instance_uid="1.2.3", series_instance_uid="1.2.3.9",
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_aet="X", spool_path=f"/s/{i}",
                      sha256=str(i), size=1)
    (job,) = store.claim("w", 1)
    store.complete(job.id, "w", job_result(), ["pacs"])
    store.close()

    scp = AE(ae_title="PACSAI")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]
        config = tmp_path / "pacs-ai.toml"
        config.write_text(
            f'[listener]\nport = {port}\n[storage]\ndata_dir = "data"\n[model]\npath = ["model"]\ndevice = "cpu"\n'
            '[metrics]\nenabled = false\n'
            '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 1\n'
        )
        code, out, _ = _cli("status", "--config", str(config), "--json")
        status = json.loads(out)
        assert code == 0 and status["ok"], status
        assert status["listener"]["up"] and status["listener"]["detail"] == "C-ECHO answered"
        assert status["queue"]["jobs"]["queued"] == 2 and status["queue"]["jobs"]["done"] == 1
        assert status["queue"]["oldest_queued"]["job_id"] == 2 and status["queue"]["oldest_queued"]["age_s"] >= 0
        assert status["queue"]["deliveries_pending"] == {"pacs": 1}
        assert status["models"][0]["name"] == "tiny" and status["models"][0]["ok"]
        assert status["device"]["effective"] == "cpu"
        code, text, _ = _cli("status", "--config", str(config))
        assert code == 0 and "UP" in text and "queued 2" in text and "pacs: 1 pending" in text and "tiny 9.9" in text
    finally:
        server.shutdown()
    # listener gone: reported (and --strict turns it into exit status 3); nothing is created for a new data_dir
    config.write_text(config.read_text().replace('data_dir = "data"', 'data_dir = "fresh"'))
    code, text, _ = _cli("status", "--config", str(config), "--strict")
    assert code == 3 and "DOWN" in text and "no database yet" in text
    assert not (tmp_path / "fresh").exists()


def test_status_counts_a_rejected_probe_as_up(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from pacs_ai.cli.status import probe_listener
    from pacs_ai.config import load_config

    scp = AE(ae_title="PACSAI")
    scp.add_supported_context(Verification)
    scp.require_calling_aet = ["MODALITY1"]
    server = scp.start_server(("127.0.0.1", 0), block=False)
    try:
        config = tmp_path / "pacs-ai.toml"
        config.write_text(f'[listener]\nport = {server.server_address[1]}\nallowed_calling_aets = ["MODALITY1"]\n')
        report = probe_listener(load_config(config))
    finally:
        server.shutdown()
    assert report["up"] and "rejected" in report["detail"]


def test_status_against_a_running_daemon(tmp_path, sample_file):
    """``pacs-ai status`` (the console command, in its own process) against the real ``pacs-ai serve``
    started by tests/support/daemon_harness.py, after it processed and delivered one image."""
    import subprocess
    import sys

    from pacs_ai.infer.model_card import load_model_folder
    from support.daemon_harness import Daemon, file_identity, shared_model
    from support.dest_scp import DestSCP

    model = shared_model()
    _model, card = load_model_folder(model)
    with DestSCP(ae_title="STATUSDEST") as dest, Daemon(tmp_path / "daemon", model=model, destinations=[dest]) as daemon:
        uid = file_identity(sample_file)[1]
        assert daemon.send([sample_file]).statuses == [0x0000]
        job = daemon.wait_settled([uid], timeout=120)[uid]
        assert job is not None and str(job.state) == "done", job
        assert daemon.wait_until(lambda: daemon.jobs().delivery_counts().get("statusdest") == {"done": 1}, 60)

        def status(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "pacs_ai", "status", "--config", str(daemon.config_path), *extra],
                                  capture_output=True, text=True, timeout=120, cwd=daemon.root)

        done = status("--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["ok"], report
        assert report["listener"]["up"] and report["listener"]["detail"] == "C-ECHO answered"
        assert report["listener"]["address"].endswith(f":{daemon.port}") and not report["listener"]["tls"]
        assert report["queue"]["jobs"]["done"] == 1 and report["queue"]["jobs"]["queued"] == 0
        assert report["queue"]["deliveries_pending"] == {"statusdest": 0}
        assert [(m["name"], m["version"], m["ok"]) for m in report["models"]] == [(card.name, card.version, True)]
        assert report["device"]["effective"] == "cpu"
        text = status("--strict")
        assert text.returncode == 0 and "UP" in text.stdout, text.stdout + text.stderr
    # the daemon stopped: the same command says so, and --strict turns it into exit status 3
    down = status("--strict")
    assert down.returncode == 3 and "DOWN" in down.stdout, down.stdout + down.stderr
