#!/usr/bin/env python3
"""End-to-end latency: seconds from C-STORE sent to both results (SC and SR) stored at the destination.

Runs the real daemon (``pacs-ai serve`` in a subprocess, via tests/support/daemon_harness.py) with a pynetdicom
Storage SCP as its destination PACS (tests/support/dest_scp.py) and a random-weight model (224 px by default),
then measures, in one run:

1. idle: single images sent one at a time, each waiting for its results (``--idle`` of them);
2. burst: ``--burst`` images sent back to back in one association; the latency of each burst image, the
   burst's throughput, and the latency of single "probe" images sent from a second association every
   ``--probe-every`` seconds while the burst is being processed (what a new study sees in a busy hour);
3. the daemon's peak memory (VmHWM of the process, sampled every 0.2 s).

The input is the committed CR sample (tests/data/cr_hip_mono2_small.dcm, 535x440), each copy with its own
Study/Series/SOP UIDs; ``--image PATH`` uses another file (e.g. a full-size WG-04 CR).

    .venv/bin/python benchmarks/bench_latency.py                 # about 2-4 min on 2 cores
    .venv/bin/python benchmarks/bench_latency.py --arch densenet121 --burst 500 --json out.json
    .venv/bin/python benchmarks/bench_latency.py --full-size      # WG-04 CR, bundled model, Orthanc
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from support.common import copies
from support.daemon_harness import Daemon, Sent, random_model, send_files
from support.dest_scp import DestSCP


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def study_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def complete_at(dest: DestSCP, study: str) -> float | None:
    sc, sr = dest.results_for_studies({study})[study]
    return max(sc, sr) if sc and sr else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50", choices=["resnet50", "densenet121", "vgg16"])
    ap.add_argument("--size", type=int, default=224, help="model input size (px)")
    ap.add_argument("--idle", type=int, default=10, help="single images at idle")
    ap.add_argument("--burst", type=int, default=200, help="images in the burst")
    ap.add_argument("--probe-every", type=float, default=3.0, help="seconds between probes during the burst")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image", type=Path, default=REPO / "tests" / "data" / "cr_hip_mono2_small.dcm")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up waiting after this many seconds")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the daemon's folder here (default: a scratch folder removed at the end)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    full = ap.add_argument_group("full-size mode (benchmarks/latency_fullsize.py)")
    full.add_argument("--full-size", action="store_true",
                      help="real WG-04 radiographs from ../shared, the bundled model, Orthanc as the PACS")
    full.add_argument("--burst-full", type=int, default=100, help="full-size images in the burst")
    full.add_argument("--gap", type=float, default=0.5, help="seconds between single images")
    full.add_argument("--bare-batches", type=int, default=10, help="batches timed for the bare forward + CAM rate")
    full.add_argument("--threads", type=int, default=0,
                      help="torch threads of the worker and of the bare rate (0: the daemon's default)")
    full.add_argument("--associations", type=int, default=0,
                      help="[delivery] associations of the daemon (0: its default)")
    full.add_argument("--model", type=Path, default=None,
                      help="model folder for the full-size mode (default: the bundled models/reference)")
    args = ap.parse_args(argv)
    if args.workdir is not None:
        return _run(args)
    # Without --workdir the folder (about 1.3 GB in full-size mode) is scratch, removed at the end.
    args.workdir = Path(tempfile.mkdtemp(prefix="pacs-ai-bench-latency-"))
    try:
        return _run(args)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    if args.full_size:
        from latency_fullsize import run

        if args.idle == 10:
            args.idle = 8
        return run(args)

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    model = random_model(work / f"model-{args.arch}-{args.size}", args.arch, args.size, version="bench-1")
    idle_files = copies(args.image, work / "in", args.idle, new_study=True, prefix="idle-")
    burst_files = copies(args.image, work / "in", args.burst, new_study=True, prefix="burst-")
    n_probes = 40
    probe_files = copies(args.image, work / "in", n_probes, new_study=True, prefix="probe-")
    studies = {p: study_of(p) for p in idle_files + burst_files + probe_files}
    print(f"prepared {len(studies)} images and the model in {time.monotonic() - t0:.0f} s", flush=True)

    dest = DestSCP(ae_title="BENCHPACS").start()
    daemon = Daemon(
        work / "daemon",
        model=model,
        destinations=[dest],
        overrides={
            "model": {"batch_size": args.batch_size, "threads": 0},
            "worker": {"poll_interval_s": 0.05, "lease_seconds": 300.0},
            "delivery": {"poll_interval_s": 0.05},
            "logging": {"level": "WARNING"},
        },
    )
    figures: dict[str, object] = {"arch": args.arch, "size": args.size, "image": args.image.name}
    try:
        t = time.monotonic()
        daemon.start(timeout=300)
        figures["startup_s"] = round(time.monotonic() - t, 2)
        time.sleep(0.5)
        figures["rss_after_start_mb"] = round(daemon.peak_rss_kb / 1024)

        # 1. idle: one at a time
        idle: list[float] = []
        for path in idle_files:
            sent_at = time.time()
            r = send_files(daemon.port, [path])
            assert r.sent[0].status == 0, f"not acknowledged: {r.sent[0]}"
            study = studies[path]
            if not dest.wait_for(lambda d, s=study: complete_at(d, s) is not None, args.timeout):
                raise SystemExit(f"no results for an idle image within {args.timeout} s:\n{daemon.log_tail()}")
            idle.append(complete_at(dest, study) - sent_at)  # type: ignore[operator]
            time.sleep(0.3)
        rss_idle = daemon.peak_rss_kb

        # 2. burst, with probes
        sent_times: dict[Path, float] = {}

        def remember(s: Sent) -> None:
            sent_times[s.path] = s.sent_at

        burst_done = threading.Event()
        burst_started = time.time()
        burst_result: dict[str, object] = {}

        def run_burst() -> None:
            r = send_files(daemon.port, burst_files, on_sent=remember, timeout=120)
            burst_result["acked"] = sum(1 for s in r.sent if s.status == 0)
            burst_result["ingest_s"] = time.time() - burst_started
            burst_done.set()

        sender = threading.Thread(target=run_burst, daemon=True)
        sender.start()
        probes: list[tuple[Path, float]] = []
        burst_studies = {studies[p] for p in burst_files}
        deadline = time.monotonic() + args.timeout
        probe_iter = iter(probe_files)
        while time.monotonic() < deadline:
            if dest.complete_studies(burst_studies) == burst_studies:
                break
            path = next(probe_iter, None)
            if path is not None:
                t_sent = time.time()
                r = send_files(daemon.port, [path])
                if r.sent[0].status == 0:
                    probes.append((path, t_sent))
            time.sleep(args.probe_every)
        sender.join(30)
        probe_studies = {studies[p] for p, _ in probes}
        dest.wait_for(lambda d: d.complete_studies(probe_studies) == probe_studies, 120)
        burst_lat = [
            complete_at(dest, studies[p]) - sent_times[p]  # type: ignore[operator]
            for p in burst_files
            if p in sent_times and complete_at(dest, studies[p])
        ]
        probe_lat = [complete_at(dest, studies[p]) - t for p, t in probes if complete_at(dest, studies[p])]
        last = max((complete_at(dest, studies[p]) or 0) for p in burst_files)
        throughput = len(burst_lat) / (last - burst_started) if last > burst_started else float("nan")
        figures.update(
            idle_n=len(idle),
            idle_p50_s=round(percentile(idle, 0.5), 3),
            idle_p95_s=round(percentile(idle, 0.95), 3),
            idle_mean_s=round(statistics.fmean(idle), 3),
            burst_n=args.burst,
            burst_acked=burst_result.get("acked"),
            burst_delivered=len(burst_lat),
            burst_ingest_s=round(float(burst_result.get("ingest_s", float("nan"))), 2),
            burst_p50_s=round(percentile(burst_lat, 0.5), 2),
            burst_p95_s=round(percentile(burst_lat, 0.95), 2),
            burst_throughput_img_s=round(throughput, 2),
            probe_n=len(probe_lat),
            probe_p50_s=round(percentile(probe_lat, 0.5), 2),
            probe_p95_s=round(percentile(probe_lat, 0.95), 2),
            duplicates=sum(n - 1 for n in dest.duplicates().values()),
            peak_rss_idle_mb=round(rss_idle / 1024),
            peak_rss_mb=round(daemon.peak_rss_kb / 1024),
        )
    finally:
        daemon.stop()
        daemon.close_store()
        dest.stop()

    f = figures
    print()
    print(f"end-to-end latency, C-STORE sent -> SC and SR stored at the destination "
          f"({f['arch']} {f['size']} px, random weights, CPU; input {f['image']})")
    print(f"{'phase':34s} {'n':>5s} {'p50 s':>8s} {'p95 s':>8s}")
    print(f"{'single image at idle':34s} {f['idle_n']:5d} {f['idle_p50_s']:8.3f} {f['idle_p95_s']:8.3f}")
    print(f"{'burst images (all queued at once)':34s} {f['burst_delivered']:5d} "
          f"{f['burst_p50_s']:8.2f} {f['burst_p95_s']:8.2f}")
    print(f"{'single image during the burst':34s} {f['probe_n']:5d} {f['probe_p50_s']:8.2f} {f['probe_p95_s']:8.2f}")
    ratio = f["probe_p50_s"] / f["idle_p50_s"] if f["idle_p50_s"] else float("nan")  # type: ignore[operator]
    print(f"ratio single-during-burst / idle (p50): {ratio:.1f}x")
    print(f"burst: {f['burst_acked']}/{f['burst_n']} acknowledged in {f['burst_ingest_s']} s "
          f"(ingest {f['burst_n'] / f['burst_ingest_s']:.1f} img/s), results delivered at "
          f"{f['burst_throughput_img_s']} img/s end to end, duplicates {f['duplicates']}")
    print(f"daemon peak RSS (serve + its worker process): {f['rss_after_start_mb']} MB after start-up, {f['peak_rss_idle_mb']} MB after the idle "
          f"phase, {f['peak_rss_mb']} MB overall; "
          f"daemon start-up (model load) {f['startup_s']} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
