#!/usr/bin/env python3
"""Pipeline throughput: images/s from queued to results written, per backbone, vs the bare forward pass.

For each backbone (random weights; 224 px by default) this script measures, in one process and one run:

- **forward**: the bare forward pass of the same model (``load_model_folder``, eval, channels-last, the
  engine's layout on CPU, ``torch.inference_mode``) on random input batches of ``--batch-size``;
- **engine**: ``InferenceEngine.predict`` (forward + Grad-CAM, the heat map every result needs) on
  already-preprocessed images, the same batch size;
- **pipeline**: the real worker (``pacs_ai.daemon.worker.Worker`` with the real engine, the real result
  writer and a SQLite job store, wired as ``pacs-ai serve`` wires them) draining ``--images`` queued jobs:
  read the spooled DICOM, decode, preprocess, classify, Grad-CAM, write the Secondary Capture and the
  SR, commit; from the first claim to the last job done.

Ratios pipeline / forward and pipeline / engine show what the pipeline loses to the model itself and to
the work around it. The per-image breakdown comes from the jobs' own timings (preprocess, forward, cam);
the rest is reading/decoding plus writing results and the database.

Input: the committed CR sample (tests/data/cr_hip_mono2_small.dcm, 535x440), re-UID'd; ``--image`` takes
another file (e.g. ../shared/data/dicom/wg04_RG2_hip_CR/RG2_UNC.dcm, 2140x1760).

    .venv/bin/python benchmarks/bench_pipeline.py                       # 3 backbones, ~3-4 min on 2 cores
    .venv/bin/python benchmarks/bench_pipeline.py --arch resnet50 --images 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from support.common import copies
from support.daemon_harness import random_model


def bare_forward(folder: Path, batch: int, n: int, device: str, threads: int) -> float:
    """Images/s of the bare model forward at ``batch`` (one warm-up batch, then ``n`` images)."""
    import torch

    from pacs_ai.infer.model_card import load_model_folder

    torch.set_num_threads(threads)
    model, card = load_model_folder(folder, map_location=device)
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    size = card.input.size
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    iters = max(1, n // batch)
    with torch.inference_mode():
        model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    del model
    return iters * batch / elapsed


def engine_only(engine, files: list[Path], n: int) -> float:  # type: ignore[no-untyped-def]
    """Images/s of ``engine.predict`` (forward + CAM) on preprocessed images (one warm-up batch first)."""
    import pydicom

    from pacs_ai.infer.preprocess import dicom_to_gray, prepare

    prepared = [prepare(dicom_to_gray(pydicom.dcmread(f)), engine.spec) for f in files[: engine.batch_size]]
    engine.predict(prepared)
    items = [prepared[i % len(prepared)] for i in range(n)]
    t0 = time.perf_counter()
    engine.predict(items)
    return n / (time.perf_counter() - t0)


def pipeline(engine, folder: Path, files: list[Path], work: Path, batch: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Queue ``files`` as jobs, drain them with the real worker; images/s and per-stage means."""
    import pydicom

    from pacs_ai.daemon.worker import Worker
    from pacs_ai.queue.jobstore import JobStore
    from pacs_ai.send.deliveries import destination_names
    from pacs_ai.store.spool import Spool
    from pacs_ai.write.results import write_results

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    jobs = JobStore(f"sqlite:///{work / 'pacs-ai.db'}", upgrade=True)
    spool = Spool(work / "spool")
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        stored = spool.store(str(ds.SOPInstanceUID), f.read_bytes())
        jobs.enqueue(
            sop_instance_uid=str(ds.SOPInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            calling_aet="BENCH",
            spool_path=str(stored.path),
            sha256=stored.sha256,
            size=stored.size,
        )
    from pacs_ai.write.overlay import SC_MAX_SIDE

    worker = Worker(jobs, engine, write_results, work / "results", destination_names(()), owner="bench:worker",
                    batch_size=batch, lease_seconds=600.0, display_max_side=SC_MAX_SIDE)  # as the daemon's
    t0 = time.perf_counter()
    worker.drain(threading.Event())
    elapsed = time.perf_counter() - t0
    done = jobs.list_jobs(state="done", limit=len(files) + 10)
    counts = jobs.counts()
    jobs.close()
    if len(done) != len(files):
        raise SystemExit(f"pipeline: only {len(done)} of {len(files)} jobs done: {counts}")
    stage = {k: sum(float(j.result["timings"].get(k, 0.0)) for j in done) / len(done)
             for k in ("preprocess", "forward", "cam")}
    per_image = elapsed / len(done)
    return {"img_s": len(done) / elapsed, "per_image_s": per_image, **{f"{k}_s": v for k, v in stage.items()},
            "other_s": per_image - sum(stage.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", choices=["resnet50", "densenet121", "vgg16"],
                    help="backbone(s) to measure (default: all three)")
    ap.add_argument("--size", type=int, default=224, help="model input size (px)")
    ap.add_argument("--images", type=int, default=32, help="jobs per backbone")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                    help="torch CPU threads for every run (default: as `pacs-ai serve`, all cores but one)")
    ap.add_argument("--image", type=Path, default=REPO / "tests" / "data" / "cr_hip_mono2_small.dcm")
    ap.add_argument("--workdir", type=Path, default=None, help="keep models and files here (reused)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    archs = args.arch or ["resnet50", "densenet121", "vgg16"]
    import logging

    logging.basicConfig(level=logging.WARNING)
    for name in ("highdicom", "pacs_ai", "pydicom"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import torch

    from pacs_ai.infer.engine import InferenceEngine

    work = args.workdir or Path(tempfile.mkdtemp(prefix="pacs-ai-bench-pipeline-"))
    files = copies(args.image, work / "in", args.images, new_study=True, prefix="job-")
    rows = []
    for arch in archs:
        t = time.perf_counter()
        folder = random_model(work / f"model-{arch}-{args.size}", arch, args.size, version="bench-1")
        build_s = time.perf_counter() - t
        fwd = bare_forward(folder, args.batch_size, args.images, args.device, args.threads)
        engine = InferenceEngine([folder], device=args.device, batch_size=args.batch_size, threads=args.threads)
        eng = engine_only(engine, files, args.images)
        pipe = pipeline(engine, folder, files, work / f"run-{arch}", args.batch_size)
        engine.close()
        del engine
        rows.append({"arch": arch, "size": args.size, "batch": args.batch_size, "device": args.device,
                     "threads": torch.get_num_threads(), "forward_img_s": fwd, "engine_img_s": eng,
                     "pipeline_img_s": pipe["img_s"], "pipeline_over_forward": pipe["img_s"] / fwd,
                     "pipeline_over_engine": pipe["img_s"] / eng, **{k: v for k, v in pipe.items() if k != "img_s"},
                     "model_build_s": build_s})
        print(f"{arch}: forward {fwd:.1f} img/s, engine {eng:.1f} img/s, pipeline {pipe['img_s']:.1f} img/s",
              flush=True)

    print()
    print(f"pipeline throughput, queued -> results written ({args.images} jobs of {args.image.name}, batch "
          f"{args.batch_size}, {args.size} px, random weights, device {args.device}, {rows[0]['threads']} threads)")
    head = (f"{'backbone':12s} {'forward':>9s} {'fwd+CAM':>9s} {'pipeline':>9s} {'pipe/fwd':>9s} {'pipe/eng':>9s}"
            f"   per image ms: {'prep':>5s} {'fwd':>5s} {'cam':>5s} {'other':>6s}")
    print(head)
    print(f"{'':12s} {'img/s':>9s} {'img/s':>9s} {'img/s':>9s}")
    for r in rows:
        print(f"{r['arch']:12s} {r['forward_img_s']:9.1f} {r['engine_img_s']:9.1f} {r['pipeline_img_s']:9.1f} "
              f"{r['pipeline_over_forward']:9.2f} {r['pipeline_over_engine']:9.2f}   {'':14s}"
              f"{r['preprocess_s'] * 1000:5.0f} {r['forward_s'] * 1000:5.0f} {r['cam_s'] * 1000:5.0f} "
              f"{r['other_s'] * 1000:6.0f}")
    print("forward: bare model forward (inference_mode); fwd+CAM: InferenceEngine.predict on preprocessed images;"
          "\npipeline: Worker.drain on queued jobs (read, decode, preprocess, forward+CAM, write SC+SR, commit);"
          "\n'other' = per-image pipeline time not in preprocess/forward/cam (reading, writing results, database)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
