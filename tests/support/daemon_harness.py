"""Run the real daemon (``pacs-ai serve``) as a subprocess for tests and benchmarks.

    model = random_model(tmp_path / "model", size=64)
    with Daemon(tmp_path / "d", model=model, destinations=[dest]) as daemon:   # started, C-ECHO answered
        result = send_files(daemon.port, files)            # pynetdicom SCU, files sent byte for byte
        daemon.wait_settled(uids, timeout=60)              # every job done or dead
        daemon.kill(); daemon.start()                      # SIGKILL daemon and worker child, restart
        daemon.jobs().find_by_sop_uid(uid).last_error      # the daemon's own job store

Everything listens on 127.0.0.1 on free ports; every wait is bounded. ``Daemon`` writes a TOML config in
its folder (the keys of config/pacs-ai.toml; test-friendly defaults: short poll intervals and backoffs,
no metrics port, CPU, one torch thread), keeps the daemon's output in ``daemon.log`` and, while the
process runs, samples its peak RSS (``VmHWM``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pynetdicom import _config, build_context
from pynetdicom.sop_class import Verification

from pacs_ai.config import Destination
from pacs_ai.send.sender import ContextsRefused, DestinationUnreachable, c_store, open_association
from support.dest_scp import DestSCP, free_port

REPO = Path(__file__).resolve().parents[2]

DAEMON_AE = "PACSAI"
TEST_AE = "TESTSCU"
TERMINAL = ("done", "dead", "skipped")


# ----------------------------------------------------------------------------------------------------
# A model folder with random weights
# ----------------------------------------------------------------------------------------------------


def random_model(folder: Path, arch: str = "resnet50", size: int = 64, version: str = "test-1") -> Path:
    """Write a model folder (card + random weights) for ``arch`` at input ``size``; reuse it if present.

    Uses tests/support/model_factory.py (calibrated random heads) when it is there, else plain random weights.
    """
    folder = Path(folder)
    if (folder / "model.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    try:
        from support.model_factory import make_model_folder
    except ImportError:
        make_model_folder = None
    if make_model_folder is not None:
        return make_model_folder(folder, arch, size=size, version=version)
    import torch

    from pacs_ai.infer.architectures import build_model
    from pacs_ai.infer.model_card import ModelCard, save_model_folder
    from pacs_ai.infer.preprocess import InputSpec

    torch.manual_seed(0)
    model = build_model(arch, num_classes=2)
    card = ModelCard(
        name=f"random-{arch}",
        architecture=arch,
        version=version,
        input=InputSpec(size=size),
        description="random weights, for tests and benchmarks only",
    )
    return save_model_folder(folder, model, card)


_MODEL_LOCK = threading.Lock()
_MODEL_CACHE: dict[tuple[str, int], Path] = {}


def shared_model(arch: str = "resnet50", size: int = 64) -> Path:
    """A random-weight model folder built once per process (tests only read it)."""
    key = (arch, size)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            try:
                from support.model_factory import model_folder

                _MODEL_CACHE[key] = model_folder(arch, size=size)
            except ImportError:
                import atexit
                import tempfile

                root = Path(tempfile.mkdtemp(prefix="pacs-ai-harness-model-"))
                atexit.register(shutil.rmtree, root, True)
                _MODEL_CACHE[key] = random_model(root / f"{arch}-{size}", arch, size)
        return _MODEL_CACHE[key]


# ----------------------------------------------------------------------------------------------------
# Sending
# ----------------------------------------------------------------------------------------------------

_raw_lock = threading.Lock()
_raw_users = 0


@contextmanager
def raw_file_sending() -> Iterable[None]:
    """While active, ``send_c_store(path)`` sends the file's bytes after the meta header as they are.

    pynetdicom reads this switch at call time; it is process-wide, so it is reference-counted and put
    back as it was when the last user leaves.
    """
    global _raw_users
    with _raw_lock:
        if _raw_users == 0:
            raw_file_sending.previous = _config.STORE_SEND_CHUNKED_DATASET  # type: ignore[attr-defined]
        _raw_users += 1
        _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        with _raw_lock:
            _raw_users -= 1
            if _raw_users == 0:
                _config.STORE_SEND_CHUNKED_DATASET = raw_file_sending.previous  # type: ignore[attr-defined]


@dataclass
class Sent:
    """The outcome of one file: ``status`` is the C-STORE status, or None with ``error`` saying why."""

    path: Path
    sop_instance_uid: str
    status: int | None
    error: str = ""
    sent_at: float = 0.0
    answered_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status in (0x0000, 0xB000, 0xB006, 0xB007)


@dataclass
class AssocResult:
    accepted: bool
    rejected: str = ""  # why the association was refused
    sent: list[Sent] = field(default_factory=list)

    @property
    def statuses(self) -> list[int | None]:
        return [s.status for s in self.sent]


def file_identity(path: Path) -> tuple[str, str, str]:
    """(SOP class, SOP instance, transfer syntax) from a file's meta header."""
    meta = read_file_meta_info(path)
    return (
        str(meta.get("MediaStorageSOPClassUID", "")),
        str(meta.get("MediaStorageSOPInstanceUID", "")),
        str(meta.get("TransferSyntaxUID", "")),
    )


def send_files(
    port: int,
    files: Sequence[Path],
    *,
    host: str = "127.0.0.1",
    called_ae: str = DAEMON_AE,
    calling_ae: str = TEST_AE,
    timeout: float = 60.0,
    stop: threading.Event | None = None,
    on_sent: Callable[[Sent], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AssocResult:
    """Send ``files`` byte for byte (as stored) in one association; one ``Sent`` per file, in order.

    Each file's own SOP class and transfer syntax are proposed (no conversion). A file whose context
    the peer did not accept gets ``status=None, error='no accepted presentation context'``; after an
    abort every remaining file gets ``status=None``. ``stop`` ends the association early. ``ssl_context``
    (a TLS client context) makes it a DICOM TLS association.
    """
    files = [Path(f) for f in files]
    idents = [file_identity(f) for f in files]
    proposals: dict[str, list[str]] = {}
    for sop_class, _uid, ts in idents:
        proposals.setdefault(sop_class, [])
        if ts not in proposals[sop_class]:
            proposals[sop_class].append(ts)
    # one context per (class, syntax): the peer may accept some only
    contexts = [build_context(cls, [ts]) for cls, tss in proposals.items() for ts in tss]
    if len(contexts) > 127:
        raise ValueError("too many presentation contexts for one association")
    peer = Destination(name="daemon", ae_title=called_ae, host=host, port=port)
    try:
        assoc = open_association(peer, contexts, calling_ae_title=calling_ae, timeout_s=timeout,
                                 ssl_context=ssl_context)
    except DestinationUnreachable as exc:
        result = AssocResult(accepted=False, rejected="no association" if exc.kind == "unreachable" else exc.kind)
        result.sent = [Sent(f, ident[1], None, result.rejected) for f, ident in zip(files, idents, strict=True)]
        return result
    except ContextsRefused:  # the peer aborts an association whose contexts it all rejected
        result = AssocResult(accepted=False, rejected="aborted")
        result.sent = [Sent(f, ident[1], None, result.rejected) for f, ident in zip(files, idents, strict=True)]
        return result
    result = AssocResult(accepted=True)
    try:
        with raw_file_sending():
            for i, (f, ident) in enumerate(zip(files, idents, strict=True)):
                if (stop is not None and stop.is_set()) or not assoc.is_established:
                    result.sent.extend(
                        Sent(g, ig[1], None, "association ended") for g, ig in zip(files[i:], idents[i:], strict=True)
                    )
                    break
                item = Sent(f, ident[1], None, sent_at=time.time())
                answer = c_store(assoc, f, msg_id=(i % 65535) + 1)
                item.status, item.error = answer.status, answer.error
                item.answered_at = time.time()
                result.sent.append(item)
                if on_sent is not None:
                    on_sent(item)
    finally:
        if assoc.is_established:
            assoc.release()
        assoc.ae.shutdown()
    return result


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def echo(
    port: int, host: str = "127.0.0.1", called_ae: str = DAEMON_AE, timeout: float = 5.0, quiet: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    """True when the peer answers a C-ECHO with success within ``timeout`` seconds.

    ``quiet`` drops pynetdicom's "connection refused" errors (while waiting for a daemon to start).
    """
    transport = logging.getLogger("pynetdicom.transport")
    hush = _Quiet()
    if quiet:
        transport.addFilter(hush)
    try:
        return _echo(port, host, called_ae, timeout, ssl_context)
    finally:
        transport.removeFilter(hush)


def _echo(port: int, host: str, called_ae: str, timeout: float, ssl_context: ssl.SSLContext | None = None) -> bool:
    peer = Destination(name="daemon", ae_title=called_ae, host=host, port=port)
    try:
        assoc = open_association(peer, [build_context(Verification)], calling_ae_title=TEST_AE, timeout_s=timeout,
                                 ssl_context=ssl_context)
    except Exception:  # noqa: BLE001 - not up (yet), rejected, or anything else: no echo
        return False
    try:
        rsp = assoc.send_c_echo()
        return bool(rsp is not None and "Status" in rsp and rsp.Status == 0)
    finally:
        if assoc.is_established:
            assoc.release()
        assoc.ae.shutdown()


# ----------------------------------------------------------------------------------------------------
# The daemon
# ----------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, sections: dict[str, dict[str, Any]], destinations: Sequence[dict[str, Any]]) -> Path:
    """Write the config; a dict value is a sub-table (``{"listener": {"tls": {...}}}`` is ``[listener.tls]``)."""
    lines: list[str] = ["# written by tests/support/daemon_harness.py"]

    def table(header: str, values: dict[str, Any], array: bool = False) -> None:
        lines.append(f"\n[[{header}]]" if array else f"\n[{header}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict))
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{header}.{k}", v)

    for name, values in sections.items():
        table(name, values)
    for dest in destinations:
        table("destinations", dest, array=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def serve_command(config: Path) -> list[str]:
    """``pacs-ai serve --config FILE``, with the console script next to this Python when installed."""
    script = Path(sys.executable).parent / "pacs-ai"
    if script.is_file():
        return [str(script), "serve", "--config", str(config)]
    return [sys.executable, "-c", "import sys; from pacs_ai.cli import main; sys.exit(main())", "serve",
            "--config", str(config)]


class DaemonError(AssertionError):
    pass


_RUNNING: set[subprocess.Popen[bytes]] = set()
STARTED_LOGS: list[Path] = []
"""The log of every daemon started since the last ``clear()`` (tests/conftest.py checks them after each test)."""


def _kill_leftovers() -> None:
    """At interpreter exit, SIGKILL daemons a crashed or interrupted test left running."""
    for proc in list(_RUNNING):
        if proc.poll() is None:
            proc.kill()


atexit.register(_kill_leftovers)


class Daemon:
    """``pacs-ai serve`` in a subprocess, with its own data folder, config and port.

    ``overrides`` merges into the config sections, e.g. ``{"worker": {"max_attempts": 3}}``;
    ``destinations`` takes ``DestSCP`` objects or dicts of ``[[destinations]]`` keys.
    """

    def __init__(
        self,
        root: Path,
        *,
        model: Path | Sequence[Path],
        destinations: Sequence[DestSCP | dict[str, Any]] = (),
        allowed_calling_aets: Sequence[str] = (),
        port: int | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.root / "data"
        self.port = port or free_port()
        self.ae_title = DAEMON_AE
        self.client_ssl = client_ssl  # the TLS client context of the harness's echo and send (a TLS listener)
        models = [model] if isinstance(model, (str, Path)) else list(model)
        sections: dict[str, dict[str, Any]] = {
            "listener": {
                "ae_title": self.ae_title,
                "host": "127.0.0.1",
                "port": self.port,
                "allowed_calling_aets": list(allowed_calling_aets),
                "max_associations": 10,
                "network_timeout_s": 30.0,
            },
            "storage": {"data_dir": str(self.data_dir)},
            "model": {"path": [str(m) for m in models], "device": "cpu", "batch_size": 8, "threads": 1},
            "worker": {
                "poll_interval_s": 0.1,
                "lease_seconds": 60.0,
                "max_attempts": 2,
                "backoff_base_s": 0.2,
                "backoff_max_s": 1.0,
            },
            "delivery": {
                "poll_interval_s": 0.2,
                "max_attempts": 30,
                "backoff_base_s": 0.2,
                "backoff_max_s": 2.0,
                "timeout_s": 10.0,
            },
            "logging": {"format": "plain", "level": "INFO"},
            "metrics": {"enabled": False},
            # Study SRs are extra instances at a destination, which the fault and ingest tests count per
            # image; the tests of study grouping turn them on.
            "studies": {"enabled": False},
        }
        for name, table in (overrides or {}).items():
            sections.setdefault(name, {}).update(table)
        dests = []
        for d in destinations:
            if isinstance(d, DestSCP):
                d = {"name": d.ae_title.lower(), "ae_title": d.ae_title, "host": "127.0.0.1", "port": d.port}
            dests.append(dict(d))
        self.sections = sections
        self.config_path = write_config(self.root / "pacs-ai.toml", sections, dests)
        self.log_path = self.root / "daemon.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss_kb = 0
        self.starts = 0
        self._store = None
        self._sampler: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 120.0) -> Daemon:
        """Start the daemon and wait (bounded) until it answers C-ECHO."""
        if self.alive:
            return self
        self.starts += 1
        if self.log_path not in STARTED_LOGS:
            STARTED_LOGS.append(self.log_path)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            log.write(f"\n===== start {self.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                serve_command(self.config_path),
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        _RUNNING.add(self.proc)
        self._sampler = threading.Thread(target=self._sample_rss, args=(self.proc,), daemon=True)
        self._sampler.start()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise DaemonError(f"pacs-ai serve exited with {self.proc.returncode if self.proc else '?'}:\n"
                                  f"{self.log_tail()}")
            if echo(self.port, timeout=2.0, quiet=True, ssl_context=self.client_ssl):
                return
            time.sleep(0.2)
        raise DaemonError(f"pacs-ai serve did not answer C-ECHO within {timeout:.0f} s:\n{self.log_tail()}")

    def _sample_rss(self, proc: subprocess.Popen[bytes]) -> None:
        """Peak memory of the daemon: its own high-water mark plus its worker child's (``serve`` runs the
        worker as a child process)."""
        peaks: dict[int, int] = {}
        while proc.poll() is None:
            pids = [proc.pid]
            try:
                for task in Path(f"/proc/{proc.pid}/task").iterdir():
                    pids += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                pass
            for pid in pids:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peaks[pid] = max(peaks.get(pid, 0), int(line.split()[1]))
                except (OSError, ValueError):
                    pass
            self.peak_rss_kb = max(self.peak_rss_kb, sum(peaks.values()))
            time.sleep(0.2)

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, wait (bounded), then SIGKILL. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def children(self) -> list[int]:
        """PIDs of the daemon's child processes (its worker) right now."""
        if not self.alive:
            return []
        pids: list[int] = []
        try:
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():  # type: ignore[union-attr]
                pids += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
        return pids

    def kill(self) -> list[int]:
        """SIGKILL the daemon and its worker child at once, like a power cut (nothing gets to clean up:
        the child's parent-death SIGTERM finds it already dead). ``serve`` runs in its own session, so its
        process group is the daemon and its children. Returns the PIDs killed."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        pids = [self.proc.pid, *self.children()]
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.05)  # the child is reaped by init
        left = [pid for pid in pids[1:] if _running(pid)]
        if left:
            raise DaemonError(f"processes of the killed daemon still run: {left}")
        return pids

    def restart(self, timeout: float = 120.0) -> Daemon:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.close_store()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- talking to it ----------------------------------------------------------------------------

    def echo(self, timeout: float = 5.0) -> bool:
        return echo(self.port, timeout=timeout, ssl_context=self.client_ssl)

    def cli(self, *args: str, timeout: float = 120.0) -> Any:
        """``pacs-ai ARGS --config <its config>`` in a subprocess; its JSON output (the command must succeed)."""
        command = serve_command(self.config_path)[:-3]  # the console script (or python -c ...) without "serve"
        out = subprocess.run([*command, *args, "--config", str(self.config_path)], capture_output=True, text=True,
                             timeout=timeout, cwd=self.root, env=self.env)
        if out.returncode != 0:
            raise DaemonError(f"pacs-ai {' '.join(args)} exited with {out.returncode}: {out.stderr[-2000:]}")
        return json.loads(out.stdout)

    def send(self, files: Sequence[Path], **kwargs: Any) -> AssocResult:
        kwargs.setdefault("ssl_context", self.client_ssl)
        return send_files(self.port, files, **kwargs)

    # -- its job store ------------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        url = self.sections.get("database", {}).get("url") or ""
        return url or f"sqlite:///{self.data_dir / 'pacs-ai.db'}"

    def jobs(self):  # type: ignore[no-untyped-def]
        """The daemon's JobStore, opened from this process (read it; the daemon owns the writes)."""
        if self._store is None:
            from pacs_ai.queue.jobstore import JobStore

            self._store = JobStore(self.database_url, busy_timeout_s=5.0)
        return self._store

    def close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def job(self, sop_instance_uid: str):  # type: ignore[no-untyped-def]
        return self.jobs().find_by_sop_uid(sop_instance_uid)

    def all_jobs(self, limit: int = 1_000_000) -> list[Any]:
        return self.jobs().list_jobs(limit=limit)

    def wait_settled(self, uids: Iterable[str], timeout: float = 60.0, poll: float = 0.2) -> dict[str, Any]:
        """Wait until every SOP UID has a job in done or dead; returns {uid: job or None} at the end."""
        uids = list(dict.fromkeys(uids))
        deadline = time.monotonic() + timeout
        while True:
            jobs = {u: self.job(u) for u in uids}
            if all(j is not None and str(j.state) in TERMINAL for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline or not self.alive:
                return jobs
            time.sleep(poll)

    def wait_until(self, condition: Callable[[], bool], timeout: float, poll: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(poll)
        return condition()


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst
