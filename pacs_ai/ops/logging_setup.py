"""Logging for a service under journald: plain text or one JSON object per line, with a PHI filter.

``configure_logging(config)`` installs one handler on the root logger. Unless ``config.log_phi`` is true,
a filter on that handler replaces the values of patient name, patient ID and patient birth date with
``[REDACTED]`` wherever they appear:

* in the formatted message as ``key=value`` / ``key: value`` (``PatientName=Doe^John``,
  ``patient_id: 12345``, ``"PatientBirthDate": "19700101"``), including pydicom's dataset dump lines
  (``(0010,0010) Patient's Name  PN: 'Doe^John'``);
* in ``extra={...}`` fields whose name is one of those keys (``PatientName``, ``patient_name``, ...),
  at any depth of a dict/list value;
* in exception tracebacks.

Log UIDs and job IDs instead: they identify the work without identifying the patient.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

from pacs_ai.config import LoggingConfig

__all__ = ["JsonFormatter", "PhiFilter", "PlainFormatter", "REDACTED", "configure_logging", "redact_text"]

REDACTED = "[REDACTED]"

# Normalised (lower case, no separators) spellings of the protected attributes.
_PHI_KEYS = frozenset({"patientname", "patientid", "patientbirthdate", "patientsname", "patientsbirthdate"})

# key spellings: PatientName, patient_name, patient-name, "Patient's Name", Patient ID, PatientBirthDate ...
_KEY = r"patient[ _\-']*(?:s[ _\-]*)?(?:name|id|birth[ _\-]*date)"
# key, optional closing quote, separator (= or :), then a quoted value or a bare value up to a delimiter.
_KV_RE = re.compile(
    rf"""(?P<key>["']?\b{_KEY}\b["']?\s*(?:=|:)\s*)(?P<value>'[^']*'|"[^"]*"|\[[^\]\n]*\]|[^\s,;)}}\]]+)""",
    re.IGNORECASE,
)
# pydicom's element repr: "(0010,0010) Patient's Name   PN: 'Doe^John'" (VR between key and colon)
_PYDICOM_RE = re.compile(
    rf"""(?P<key>\b{_KEY}\s+[A-Z]{{2}}:\s*)(?P<value>'[^'\n]*'|"[^"\n]*"|[^\n]*)""",
    re.IGNORECASE,
)

# LogRecord attributes that are not "extra" fields.
_RESERVED = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName", "_phi_checked"}
)


def _quote_like(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return f"{value[0]}{REDACTED}{value[0]}"
    return REDACTED


def redact_text(text: str) -> str:
    """``text`` with the values of patient name/ID/birth date replaced by ``[REDACTED]``."""
    if "atient" not in text and "ATIENT" not in text:  # fast path: nearly every log line
        return text
    text = _PYDICOM_RE.sub(lambda m: m.group("key") + _quote_like(m.group("value").strip()), text)
    return _KV_RE.sub(
        lambda m: m.group("key") + (m.group("value") if REDACTED in m.group("value") else _quote_like(m.group("value"))),
        text,
    )


def _is_phi_key(name: str) -> bool:
    return re.sub(r"[^a-z]", "", name.lower()) in _PHI_KEYS


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and _is_phi_key(k) else _redact_value(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    return value


class PhiFilter(logging.Filter):
    """Redacts patient identifiers from a record (message, extra fields, traceback). Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_phi_checked", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the formatter report it as usual
            return True
        record.msg, record.args = redact_text(message), None
        for key, value in list(vars(record).items()):
            if key in _RESERVED:
                continue
            setattr(record, key, REDACTED if _is_phi_key(key) else _redact_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        record._phi_checked = True
        return True


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, extra fields, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """``2026-11-25 21:00:00,123 INFO pacs_ai.receive: message key=value ...`` (extra fields appended)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        line = super().formatMessage(record)
        extra = _extra_fields(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


_HANDLER_MARK = "_pacs_ai_handler"


def configure_logging(config: LoggingConfig, *, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (default: ``sys.stdout``, for journald) in ``config.format``.

    Calling it again replaces the handler installed by the previous call (other handlers are left alone).
    pynetdicom's per-message chatter is limited to warnings unless ``config.level`` is DEBUG.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if config.format == "json" else PlainFormatter())
    if not config.log_phi:
        handler.addFilter(PhiFilter())
    root.addHandler(handler)
    level = logging.getLevelName(config.level.upper())
    root.setLevel(level if isinstance(level, int) else logging.INFO)
    debug = config.level.upper() == "DEBUG"
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if debug else logging.WARNING)
    # Libraries that are noisy about what pacs-ai handles itself: APScheduler logs every poll and warns
    # when a poll is skipped because the previous one still runs (max_instances=1 is deliberate);
    # highdicom logs several INFO lines per object built; pydicom logs an ERROR with a traceback for
    # every decoder it tries on undecodable pixel data, which the worker reports as one clear reason;
    # uvicorn (the metrics/dashboard server) announces its start and stop, which pacs-ai logs itself;
    # pylibjpeg-openjpeg logs an INFO line per tile it encodes (the warm-up encodes one at every start).
    quiet_levels = (
        ("openjpeg", logging.WARNING),
        ("apscheduler", logging.ERROR),
        ("highdicom", logging.WARNING),
        ("pydicom", logging.CRITICAL),
        ("uvicorn", logging.WARNING),
    )
    for name, quiet in quiet_levels:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else quiet)
    logging.captureWarnings(True)
    _route_uncaught_exceptions()


def _route_uncaught_exceptions() -> None:
    """Send uncaught exceptions (main thread and other threads) through logging, so that they get the
    configured format and the PHI filter instead of a raw traceback on stderr."""
    log = logging.getLogger("pacs_ai")

    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        log.critical("uncaught exception", exc_info=(exc_type, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value is not None else None
        log.error("uncaught exception in thread %s", name, exc_info=exc_info)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
