#!/usr/bin/env python3
"""Ingest throughput: pacs-ai's listener vs dcmtk storescp, both fed by one dcmtk storescu run.

Makes N copies (default 200) of one image under new SOP Instance UIDs in a temporary folder (default:
the 7.5 MB uncompressed WG-04 hip CR, else the committed small sample), then for each receiver: start it
as its own process on 127.0.0.1, time one ``storescu`` run sending all N files over one association,
check what arrived, stop it. The receivers: the bare pacs-ai listener, the whole daemon (``pacs-ai
serve`` with its worker running ResNet-50 inference and Grad-CAM on the images as they arrive), dcmtk
storescp, and storescp +B (bit-preserving). Prints images/s, MB/s and the ratio pacs-ai / storescp. Not a test.

pacs-ai stores each image with fsync + atomic rename and commits a job (SQLite WAL, synchronous=FULL)
before it answers; storescp writes its files without fsync, so the comparison favours storescp.

    .venv/bin/python benchmarks/bench_ingest.py [--count 200] [--source FILE] [--keep]
"""

from __future__ import annotations

import argparse
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "dicom" / "wg04_RG2_hip_CR" / "RG2_UNC.dcm"
FALLBACK_SOURCE = REPO / "tests" / "data" / "cr_hip_mono2_small.dcm"

SERVER = textwrap.dedent(
    """
    import logging, signal, sys, time
    from pathlib import Path
    from pacs_ai.config import ListenerConfig
    from pacs_ai.queue.jobstore import JobStore
    from pacs_ai.receive.listener import Listener
    from pacs_ai.store.spool import Spool

    logging.basicConfig(level=logging.WARNING)
    data, port = Path(sys.argv[1]), int(sys.argv[2])
    jobs = JobStore(f"sqlite:///{data / 'pacs-ai.db'}", upgrade=True)
    listener = Listener(ListenerConfig(port=port, max_pdu_size=0), Spool(data / "spool"), jobs)
    listener.start()
    print("READY", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: (listener.stop(), jobs.close(), sys.exit(0)))
    while True:
        time.sleep(1)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def storescu(port: int, files: list[Path], called: str) -> float:
    # -xe + -R: propose only Explicit VR Little Endian, the files' own transfer syntax; PDU 131072
    # (storescu's largest offer, also what storescp gets).
    cmd = ["storescu", "-xe", "-R", "-aec", called, "-pdu", "131072", "127.0.0.1", str(port), *map(str, files)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-500:]}")
    return elapsed


def time_receiver(
    proc: subprocess.Popen, port: int, files: list[Path], called: str, wait_ready: Callable[[], None],
    stop_timeout: float = 30.0,
) -> tuple[float, float]:
    """Wait until the receiver ``proc`` is ready, time one storescu run into it, then stop it.

    Returns (seconds, CPU seconds the receiver process used meanwhile).
    """
    try:
        wait_ready()
        cpu0 = cpu_seconds(proc.pid)
        elapsed = storescu(port, files, called)
        return elapsed, cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(timeout=stop_timeout)


def job_counts(database: Path) -> dict[str, int]:
    """Jobs per state in the SQLite job store at ``database``."""
    from pacs_ai.queue.jobstore import JobStore

    jobs = JobStore(f"sqlite:///{database}", upgrade=True)
    try:
        return jobs.counts()
    finally:
        jobs.close()


def run_pacs_ai(files: list[Path], work: Path) -> tuple[float, float]:
    data = work / "pacs-ai"
    data.mkdir()
    script = work / "server.py"
    script.write_text(SERVER)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(data), str(port)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )

    def wait_ready() -> None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready or not proc.stdout.readline().startswith("READY"):
            raise RuntimeError("pacs-ai listener did not start")

    elapsed, cpu = time_receiver(proc, port, files, "PACSAI", wait_ready)
    queued = job_counts(data / "pacs-ai.db")["queued"]
    stored = len(list((data / "spool").rglob("*.dcm")))
    if stored != len(files) or queued != len(files):
        raise RuntimeError(f"pacs-ai stored {stored} files and queued {queued} jobs of {len(files)}")
    return elapsed, cpu


def run_pacs_ai_daemon(files: list[Path], work: Path) -> tuple[float, float]:
    """The whole daemon (``pacs-ai serve``: listener + worker running ResNet-50 inference + deliveries)."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.model_factory import make_model_folder

    root = work / "daemon"
    model = make_model_folder(root / "model", "resnet50", size=224)
    port = free_port()
    config = root / "pacs-ai.toml"
    config.write_text(
        f'[listener]\nport = {port}\n[storage]\ndata_dir = "data"\n[model]\npath = ["{model}"]\n'
        '[metrics]\nenabled = false\n[logging]\nlevel = "WARNING"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacs_ai", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root,
    )
    elapsed, cpu = time_receiver(proc, port, files, "PACSAI", lambda: wait_port(port, timeout=120), 60.0)
    counts = job_counts(root / "data" / "pacs-ai.db")
    if sum(counts.values()) != len(files):
        raise RuntimeError(f"pacs-ai serve queued {sum(counts.values())} jobs of {len(files)}")
    print(f"(pacs-ai serve: {counts.get('done', 0)} of {len(files)} images classified by the time the last was stored)")
    return elapsed, cpu


def run_storescp(files: list[Path], work: Path, extra: list[str]) -> tuple[float, float]:
    out = work / ("storescp" + "".join(extra).replace("+", "_"))
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), *extra, str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    elapsed, cpu = time_receiver(proc, port, files, "STORESCP", lambda: wait_port(port))
    stored = len([p for p in out.iterdir() if p.is_file()])
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)}")
    return elapsed, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--source", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="where to put copies and received files")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if not shutil.which(tool):
            print(f"bench_ingest: {tool} (dcmtk) not installed; skipped")
            return 0
    source = args.source or (DEFAULT_SOURCE if DEFAULT_SOURCE.is_file() else FALLBACK_SOURCE)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    try:
        images = work / "images"
        images.mkdir()
        sys.path.insert(0, str(REPO / "tests"))
        from support.common import copies

        files = copies(source, images, args.count, prefix="img")
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
        results = []
        for name, run in (
            ("pacs-ai listener", lambda: run_pacs_ai(files, work)),
            ("pacs-ai + inference", lambda: run_pacs_ai_daemon(files, work)),
            ("dcmtk storescp", lambda: run_storescp(files, work, [])),
            ("dcmtk storescp +B", lambda: run_storescp(files, work, ["+B"])),
        ):
            subprocess.run(["sync"], check=False)
            elapsed, cpu = run()
            results.append((name, elapsed, cpu))
        print(
            f"ingest: {args.count} x {source.name} ({total_mb / args.count:.1f} MB each, {total_mb:.0f} MB), "
            f"one storescu association, 127.0.0.1; {platform.node()}, {os.cpu_count()} CPUs, "
            f"{platform.python_implementation()} {platform.python_version()}"
        )
        print(f"load average before the runs: {load} (other work on the machine skews wall-clock figures)")
        header = f"{'receiver':<20} {'seconds':>8} {'images/s':>9} {'MB/s':>8} {'vs storescp':>12} {'receiver CPU s':>15}"
        print(header)
        reference = next(elapsed for name, elapsed, _ in results if name == "dcmtk storescp")
        for name, elapsed, cpu in results:
            print(
                f"{name:<20} {elapsed:>8.2f} {args.count / elapsed:>9.1f} {total_mb / elapsed:>8.1f} "
                f"{reference / elapsed:>11.2f}x {cpu:>15.1f}"
            )
        print("(pacs-ai: fsync + rename + committed job per image; storescp: no fsync;")
        print(" pacs-ai + inference: the whole daemon, its worker classifying the images as they arrive)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
