"""Full-size mode of bench_latency.py: real WG-04 radiographs, the bundled model, Orthanc as the PACS.

Measures, in one run on this machine:

1. the **bare forward + Grad-CAM rate** of the model (``InferenceEngine.predict`` on already prepared
   full-size images, batch ``--batch-size``, the worker's torch thread count): the ceiling for bursts;
2. the **first image after start**: the daemon (``pacs-ai serve`` with Orthanc as its only destination)
   is started, and as soon as its listener answers C-ECHO one JPEG 2000 image is sent with dcmtk
   ``storescu``; seconds from the C-STORE to the SC and SR both stored in Orthanc;
3. **warm single images**, ``--idle`` of each encoding (JPEG 2000 lossless, uncompressed, RLE hip), sent
   one at a time by ``storescu``: p50/p95 of the same end-to-end seconds, and the per-phase breakdown
   (receive, queue wait, the worker's own phases, delivery wait + association + C-STOREs);
4. a **burst** of ``--burst-full`` images (the three encodings in turn) sent in one association: the rate
   at which results reach Orthanc, as a ratio to (1).

Arrival times at the PACS come from Orthanc's ``/changes`` feed, polled every 20 ms by a thread of this
process. Nothing here mocks a part: Orthanc 1.10 (Debian), dcmtk ``storescu``, the real daemon.
Skips (exit status 0, saying why) when ``../shared/data/dicom`` or Orthanc or storescu is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
REFERENCE_MODEL = REPO / "models" / "reference"
ENCODINGS = {
    "J2K lossless": "wg04_RG2_hip_CR/RG2_J2KR.dcm",
    "uncompressed": "wg04_RG2_hip_CR/RG2_UNC.dcm",
    "RLE": "wg04_RG2_hip_CR/RG2_RLE.dcm",
}
STORESCU_FLAG = {"J2K lossless": "-xv", "uncompressed": "-xe", "RLE": "-xr"}

# Worker phases as recorded in each job's result ("timings"), in pipeline order, with their labels.
WORKER_PHASES = [
    ("read", "read (dcmread)"),
    ("decode", "decode + LUTs (modality, VOI, MONO1)"),
    ("contrast_resize", "resize + CLAHE + normalise"),
    ("forward", "forward"),
    ("cam", "Grad-CAM"),
    ("roi", "heat map on the picture grid + ROI"),
    ("sr_build", "SR build + encode"),
    ("overlay", "overlay rendering (2nd thread)"),
    ("png", "PNG preview (2nd thread)"),
    ("picture_wait", "waiting for the 2nd thread"),
    ("sc_encode", "SC build + encode"),
    ("fsync", "write + fsync (3 files)"),
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def skip_reason() -> str | None:
    if not SHARED_DICOM.is_dir():
        return f"{SHARED_DICOM} is absent (the full-size WG-04 images live in ../shared)"
    missing = [p for p in ENCODINGS.values() if not (SHARED_DICOM / p).is_file()]
    if missing:
        return f"missing in {SHARED_DICOM}: {', '.join(missing)}"
    if shutil.which("storescu") is None:
        return "dcmtk storescu is not installed"
    from support.orthanc import orthanc_available

    if not orthanc_available():
        return "Orthanc is not installed (Debian package orthanc)"
    return None


class ArrivalWatch:
    """Polls Orthanc's /changes every ``every`` seconds; remembers when each SOP Instance UID appeared."""

    def __init__(self, pacs: Any, every: float = 0.02) -> None:
        self.pacs = pacs
        self.every = every
        self.arrived: dict[str, float] = {}
        self._since = int(pacs.get("/changes?last")["Last"])
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="orthanc-changes")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.pacs.get(f"/changes?since={self._since}&limit=1000", timeout=10)
            except Exception:  # noqa: BLE001 - Orthanc busy: try again
                time.sleep(self.every)
                continue
            seen = time.time()
            for change in answer.get("Changes", []):
                if change.get("ChangeType") == "NewInstance":
                    try:
                        tags = self.pacs.get(f"/instances/{change['ID']}", timeout=10)["MainDicomTags"]
                    except Exception:  # noqa: BLE001
                        continue
                    with self._cond:
                        self.arrived.setdefault(str(tags["SOPInstanceUID"]), seen)
                        self._cond.notify_all()
            self._since = int(answer.get("Last", self._since))
            if answer.get("Done", True):
                self._stop.wait(self.every)

    def wait_for(self, uids: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not uids <= self.arrived.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def storescu(path: Path, encoding: str, port: int, called_ae: str) -> float:
    """Send one file with dcmtk storescu in its own transfer syntax; returns the time it was sent."""
    sent = time.time()
    out = subprocess.run(
        ["storescu", "-R", STORESCU_FLAG[encoding], "-aet", "BENCHSCU", "-aec", called_ae, "127.0.0.1", str(port),
         str(path)],
        capture_output=True, text=True, timeout=120,
    )
    if out.returncode != 0:
        raise SystemExit(f"storescu {path.name} failed ({out.returncode}): {out.stderr[-600:]}")
    return sent


def bare_rate(model: Path, image: Path, batch_size: int, threads: int, batches: int) -> dict[str, float]:
    """Images/s of InferenceEngine.predict (forward + Grad-CAM) on prepared full-size images."""
    import pydicom

    from pacs_ai.infer.engine import InferenceEngine
    from pacs_ai.infer.preprocess import dicom_to_gray, prepare

    engine = InferenceEngine(model, device="cpu", batch_size=batch_size, threads=threads)
    prepared = prepare(dicom_to_gray(pydicom.dcmread(image)), engine.spec)
    batch = [prepared] * batch_size
    engine.predict(batch)  # warm-up
    rates = []
    for _ in range(batches):
        t = time.perf_counter()
        engine.predict(batch)
        rates.append(batch_size / (time.perf_counter() - t))
    engine.close()
    return {"median_img_s": statistics.median(rates), "best_img_s": max(rates), "batches": batches}


def _seconds(a: Any, b: Any) -> float | None:
    return (b - a).total_seconds() if a is not None and b is not None else None


def job_breakdown(daemon: Any, sop_uid: str, sent_at: float, done_at: float) -> dict[str, float]:
    """Seconds per phase of one image, from the daemon's job store and the job's own timings."""
    store = daemon.jobs()
    job = store.find_by_sop_uid(sop_uid)
    out: dict[str, float] = {}
    if job is None:
        return out
    received = job.received_at.timestamp()
    out["receive (C-STORE sent -> job committed)"] = received - sent_at
    started = getattr(job, "started_at", None)
    if started is not None:
        out["queue wait (committed -> claimed)"] = started.timestamp() - received
    timings = (job.result or {}).get("timings", {})
    for key, _label in WORKER_PHASES:
        if key in timings:
            out[key] = float(timings[key])
    if "preprocess" in timings and "decode" not in timings:
        out["preprocess (read+decode+LUTs+resize+CLAHE)"] = float(timings["preprocess"])
    finished = job.finished_at.timestamp() if job.finished_at else None
    if started is not None and finished is not None:
        out["worker total (claimed -> job done)"] = finished - started.timestamp()
    deliveries = store.list_deliveries(job_id=job.id)
    delivered = max((d.delivered_at.timestamp() for d in deliveries if d.delivered_at), default=None)
    if finished is not None and delivered is not None:
        out["delivery (job done -> peer stored both)"] = delivered - finished
    out["end to end"] = done_at - sent_at
    return out


def measure_cstore(pacs: Any, files: list[Path], calling_ae: str, rounds: int = 5) -> dict[str, float]:
    """Association set-up and each C-STORE of one job's SC and SR to Orthanc (as the daemon sends them)."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    metas = [read_file_meta_info(f) for f in files]
    contexts = [build_context(str(m.MediaStorageSOPClassUID), [str(m.TransferSyntaxUID)]) for m in metas]
    setup, stores, release = [], [[] for _ in files], []
    for _ in range(rounds):
        ae = AE(ae_title=calling_ae)
        t = time.perf_counter()
        assoc = ae.associate("127.0.0.1", pacs.dicom_port, contexts=contexts, ae_title=pacs.aet, max_pdu=0)
        setup.append(time.perf_counter() - t)
        if not assoc.is_established:
            raise SystemExit("cannot associate with Orthanc")
        for i, f in enumerate(files):
            t = time.perf_counter()
            status = assoc.send_c_store(f)
            stores[i].append(time.perf_counter() - t)
            if int(getattr(status, "Status", -1)) != 0:
                raise SystemExit(f"Orthanc refused {f.name}: {status}")
        t = time.perf_counter()
        assoc.release()
        release.append(time.perf_counter() - t)
        ae.shutdown()
    out = {"association set-up": statistics.median(setup)}
    for f, values in zip(files, stores, strict=True):
        out[f"C-STORE {f.name} ({f.stat().st_size / 1e6:.1f} MB)"] = statistics.median(values)
    out["association release"] = statistics.median(release)
    return out


def run(args: Any) -> int:
    reason = skip_reason()
    if reason:
        print(f"full-size mode skipped: {reason}")
        return 0
    from pydicom import dcmread

    from pacs_ai.config import default_config
    from pacs_ai.infer.model_card import load_card
    from pacs_ai.write.uids import derive_uid
    from support.common import copies
    from support.daemon_harness import Daemon, send_files
    from support.orthanc import OrthancServer

    model = Path(args.model) if getattr(args, "model", None) else REFERENCE_MODEL
    card = load_card(model)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pacs-ai-bench-fullsize-"))  # bench_latency passes one
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    worker_threads = args.threads or max(1, cores - 1)
    figures: dict[str, Any] = {
        "model": f"{card.name} {card.version} ({card.architecture}, {card.input.size} px)",
        "cores": cores,
        "worker_threads": worker_threads,
        "associations": args.associations or default_config().delivery.associations,
        "loadavg_start": os.getloadavg(),
        "nice": os.nice(0),
    }
    t0 = time.monotonic()
    singles: dict[str, list[Path]] = {}
    for enc, rel in ENCODINGS.items():
        singles[enc] = copies(SHARED_DICOM / rel, work / "in", args.idle, new_study=True, prefix=f"idle-{enc[:3]}-")
    first = copies(SHARED_DICOM / ENCODINGS["J2K lossless"], work / "in", 1, new_study=True, prefix="first-")[0]
    per_enc = max(1, -(-args.burst_full // len(ENCODINGS)))
    pools = [copies(SHARED_DICOM / rel, work / "in", per_enc, new_study=True, prefix=f"burst-{enc[:3]}-")
             for enc, rel in ENCODINGS.items()]
    burst = [pools[i % len(pools)][i // len(pools)] for i in range(args.burst_full)]
    sop_of = {p: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in [first, *burst]
              + [p for ps in singles.values() for p in ps]}
    print(f"prepared {len(sop_of)} full-size images in {time.monotonic() - t0:.0f} s", flush=True)

    def results_of(path: Path) -> set[str]:
        src = sop_of[path]
        return {derive_uid(src, card.version, "sc"), derive_uid(src, card.version, "sr")}

    rate = bare_rate(model, SHARED_DICOM / ENCODINGS["J2K lossless"], args.batch_size, worker_threads, args.bare_batches)
    figures["bare_forward_cam"] = rate
    print(f"bare forward + heat map (Grad-CAM or the model's own map): {rate['median_img_s']:.1f} img/s (median of {args.bare_batches} batches of "
          f"{args.batch_size}, {worker_threads} thread(s))", flush=True)

    pacs = OrthancServer(work / "orthanc", aet="ORTHANC").start()
    watch = ArrivalWatch(pacs)
    daemon = Daemon(
        work / "daemon",
        model=model,
        destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
        overrides=_daemon_overrides(args),
    )
    try:
        spawned = time.time()
        daemon.start(timeout=300)
        figures["listener_ready_s"] = round(time.time() - spawned, 2)
        sent = storescu(first, "J2K lossless", daemon.port, daemon.ae_title)
        if not watch.wait_for(results_of(first), args.timeout):
            raise SystemExit(f"no results for the first image:\n{daemon.log_tail()}")
        figures["first_image_s"] = round(max(watch.arrived[u] for u in results_of(first)) - sent, 2)
        warm_at = _log_time(daemon.log_text(), "worker warmed up")
        figures["worker_warm_s"] = round(warm_at - spawned, 2) if warm_at else None
        print(f"first image after start: {figures['first_image_s']} s (listener answered C-ECHO "
              f"{figures['listener_ready_s']} s after spawn, worker warm {figures['worker_warm_s']} s after spawn)",
              flush=True)
        time.sleep(1.0)

        # warm singles, interleaving the encodings
        latencies: dict[str, list[float]] = {enc: [] for enc in ENCODINGS}
        phases: dict[str, dict[str, list[float]]] = {enc: {} for enc in ENCODINGS}
        timed: list[tuple[str, Path, float, float]] = []
        for i in range(args.idle):
            for enc in ENCODINGS:
                path = singles[enc][i]
                sent = storescu(path, enc, daemon.port, daemon.ae_title)
                if not watch.wait_for(results_of(path), args.timeout):
                    raise SystemExit(f"no results for {path.name}:\n{daemon.log_tail()}")
                done = max(watch.arrived[u] for u in results_of(path))
                latencies[enc].append(done - sent)
                timed.append((enc, path, sent, done))
                time.sleep(args.gap)
        time.sleep(1.0)  # the last delivery records are committed just after Orthanc has the files
        for enc, path, sent, done in timed:
            for k, v in job_breakdown(daemon, sop_of[path], sent, done).items():
                phases[enc].setdefault(k, []).append(v)
        figures["singles"] = {
            enc: {"n": len(v), "p50_s": round(percentile(v, 0.5), 3), "p95_s": round(percentile(v, 0.95), 3),
                  "max_s": round(max(v), 3)}
            for enc, v in latencies.items()
        }
        all_lat = [x for v in latencies.values() for x in v]
        figures["singles_all"] = {"n": len(all_lat), "p50_s": round(percentile(all_lat, 0.5), 3),
                                  "p95_s": round(percentile(all_lat, 0.95), 3)}
        figures["phases_ms"] = {
            enc: {k: round(1000 * statistics.median(v), 1) for k, v in ph.items()} for enc, ph in phases.items()
        }
        # association set-up and C-STOREs of one job's results, measured from here against the same Orthanc
        job = daemon.jobs().find_by_sop_uid(sop_of[singles["J2K lossless"][0]])
        files = [Path(job.result["files"]["sc"]), Path(job.result["files"]["sr"])]
        figures["cstore_ms"] = {k: round(1000 * v, 1) for k, v in measure_cstore(pacs, files, "BENCHSCU").items()}

        # burst in one association
        time.sleep(1.0)
        expected = set().union(*(results_of(p) for p in burst))
        processes = burst_processes(daemon, pacs.process.pid if pacs.process else None)
        cpu_before = cpu_seconds(processes)
        burst_sent = time.time()
        result = send_files(daemon.port, burst, timeout=120)
        acked = sum(1 for s in result.sent if s.status == 0)
        ingest_s = time.time() - burst_sent
        ok = watch.wait_for(expected, args.timeout)
        cpu_after = cpu_seconds(processes)
        burst_wall = time.time() - burst_sent
        arrivals = [max(watch.arrived.get(u, float("nan")) for u in results_of(p)) for p in burst]
        done_at = [a for a in arrivals if a == a]
        last = max(done_at) if done_at else float("nan")
        burst_rate = len(done_at) / (last - burst_sent) if done_at else float("nan")
        figures["burst"] = {
            "n": len(burst), "acked": acked, "delivered": len(done_at), "complete": ok,
            "ingest_s": round(ingest_s, 2), "seconds": round(last - burst_sent, 2),
            "rate_img_s": round(burst_rate, 2),
            "ratio_to_bare": round(burst_rate / rate["median_img_s"], 3),
            "cpu_s": {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 1) for k in cpu_after},
            "cpu_wall_s": round(burst_wall, 1),
        }
        figures["peak_rss_mb"] = round(daemon.peak_rss_kb / 1024)
    finally:
        watch.stop()
        daemon.stop()
        daemon.close_store()
        pacs.stop()
    figures["loadavg_end"] = os.getloadavg()
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def _log_time(log: str, needle: str) -> float | None:
    """Epoch seconds of the first log line containing ``needle`` (plain format: local asctime first)."""
    import datetime as dt

    for line in log.splitlines():
        if needle in line:
            try:
                stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            except ValueError:
                return None
            return stamp.timestamp()
    return None


def _daemon_overrides(args: Any) -> dict[str, dict[str, Any]]:
    """The embedded defaults for everything that shapes latency (the harness speeds some up for tests)."""
    from pacs_ai.config import default_config

    d = default_config()
    return {
        "model": {"batch_size": args.batch_size, "threads": args.threads},
        "worker": {"poll_interval_s": d.worker.poll_interval_s, "lease_seconds": 300.0, "max_attempts": 3},
        "delivery": {"poll_interval_s": d.delivery.poll_interval_s, "timeout_s": 30.0,
                     "associations": args.associations or d.delivery.associations},
        "logging": {"level": "INFO"},
    }


def burst_processes(daemon: Any, orthanc_pid: int | None) -> dict[str, int]:
    """The processes whose CPU time the burst report shows: serve (``daemon``, the harness's Daemon), its
    worker child, Orthanc, this one."""
    found = {"serve (listener, deliveries)": daemon.proc.pid, "benchmark (sender, watcher)": os.getpid()}
    children = daemon.children()
    if children:
        found["worker child"] = children[0]
    if orthanc_pid is not None:
        found["Orthanc"] = orthanc_pid
    return found


def cpu_seconds(processes: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of each process and its waited-for children so far (``/proc/PID/stat``
    fields 14-17, ``proc(5)``); dcmtk's ``storescu`` is not used in the burst. Missing processes read 0."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, pid in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = sum(int(v) for v in fields[11:15]) / tick
        except (OSError, IndexError, ValueError):
            out[name] = 0.0
    return out


def report(f: dict[str, Any]) -> None:
    print()
    print(f"full-size end-to-end latency: storescu C-STORE -> SC and SR stored in Orthanc; model {f['model']}; "
          f"{f['cores']} cores, worker {f['worker_threads']} torch thread(s), {f.get('associations', 1)} association(s) per "
          f"destination; load average at start "
          f"{f['loadavg_start'][0]:.2f}, at end {f['loadavg_end'][0]:.2f}; nice {f['nice']}")
    print(f"first image after start: {f['first_image_s']} s (sent when the listener answered C-ECHO, "
          f"{f['listener_ready_s']} s after the daemon was spawned; worker warm {f.get('worker_warm_s')} s after spawn)")
    print(f"{'warm single images':24s} {'n':>4s} {'p50 s':>7s} {'p95 s':>7s} {'max s':>7s}")
    for enc, s in f["singles"].items():
        print(f"{enc:24s} {s['n']:4d} {s['p50_s']:7.3f} {s['p95_s']:7.3f} {s['max_s']:7.3f}")
    a = f["singles_all"]
    print(f"{'all encodings':24s} {a['n']:4d} {a['p50_s']:7.3f} {a['p95_s']:7.3f}")
    print()
    encs = list(f["phases_ms"])
    keys: list[str] = []
    for ph in f["phases_ms"].values():
        keys += [k for k in ph if k not in keys]
    labels = dict(WORKER_PHASES)
    print("per-phase medians, ms      " + "".join(f"{e:>14s}" for e in encs))
    for k in keys:
        print(f"{labels.get(k, k)[:44]:44s}" + "".join(f"{f['phases_ms'][e].get(k, float('nan')):14.1f}" for e in encs))
    print("results to Orthanc from this process (pynetdicom, one association, medians of 5):")
    for k, v in f["cstore_ms"].items():
        print(f"  {k:40s} {v:8.1f} ms")
    b = f["burst"]
    bare = f["bare_forward_cam"]["median_img_s"]
    print(f"burst: {b['delivered']}/{b['n']} full-size images (3 encodings in turn) in one association, acknowledged "
          f"in {b['ingest_s']} s; results in Orthanc after {b['seconds']} s: {b['rate_img_s']} img/s = "
          f"{b['ratio_to_bare']:.2f}x the bare forward + heat map rate ({bare:.1f} img/s, same run)")
    cpu = b.get("cpu_s") or {}
    if cpu:
        total, wall = sum(cpu.values()), b["cpu_wall_s"]
        print(f"CPU seconds during the burst ({wall} s on {f['cores']} cores = {wall * f['cores']:.0f} core-seconds): "
              + ", ".join(f"{k} {v}" for k, v in cpu.items()) + f"; busy {total / (wall * f['cores']):.0%}")
    print(f"daemon peak RSS (serve + worker child): {f['peak_rss_mb']} MB")
