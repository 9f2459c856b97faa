#!/usr/bin/env python3
"""Inference speed per backbone: forward alone vs forward + Grad-CAM, batch 1 and batch 8.

For each architecture a random-weight model folder (weights do not change the speed) is written to a
temporary folder and loaded by the real ``InferenceEngine``; the benchmark times
``engine.predict(batch, with_cam=False)`` (inference-mode forward) and ``engine.predict(batch)`` (one
forward + Grad-CAM/HiResCAM, probabilities from the same forward) on letterboxed 224 px inputs, after
warm-up, alternating the two so that load from other processes hits both alike, and prints a table with ms/image, images/s and the CAM/forward ratio (medians).

With ``--library`` it also times pytorch-grad-cam's default path (a fresh unfrozen model, full backward
with parameter gradients) at batch 1, for comparison.

    .venv/bin/python benchmarks/bench_inference.py                      # about 2-4 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_inference.py --device cuda --iters 20
    .venv/bin/python benchmarks/bench_inference.py --arch resnet50 --batch 1 --batch 16 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pacs_ai.explain.gradcam import cam_target_layers  # noqa: E402
from pacs_ai.infer.architectures import ARCHITECTURES, build_model  # noqa: E402
from pacs_ai.infer.engine import InferenceEngine  # noqa: E402
from pacs_ai.infer.model_card import ModelCard, save_model_folder  # noqa: E402
from pacs_ai.infer.preprocess import InputSpec, prepare  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1-minute load average (other processes competing for the cores skew CPU timings)."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def images(spec: InputSpec, n: int, seed: int = 0) -> list:
    """``n`` prepared inputs from smooth random 'radiographs' of 1760x2140 (the WG-04 hip's size)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.random((40, 33)).astype(np.float32)
        gray = cv2.resize(small, (1760, 2140), interpolation=cv2.INTER_CUBIC).clip(0, 1)
        out.append(prepare(gray, spec))
    return out


STAT = statistics.median


def timed(fn, iters: int, warmup: int, sync) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return STAT(times)


def timed_pair(first, second, iters: int, warmup: int, sync) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Time two functions alternately (first, second, first, ...) so machine load hits both alike."""
    for _ in range(warmup):
        first()
        second()
    sync()
    a, b = [], []
    for _ in range(iters):
        for fn, acc in ((first, a), (second, b)):
            t0 = time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - t0)
    return STAT(a), STAT(b)


def library_default(arch: str, x: torch.Tensor, iters: int, warmup: int, sync) -> float:  # type: ignore[no-untyped-def]
    """pytorch-grad-cam out of the box: trainable parameters, full backward, probabilities not reused."""
    from pytorch_grad_cam import GradCAM, HiResCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = build_model(arch).eval().to(x.device).to(memory_format=torch.channels_last)
    cls = HiResCAM if arch == "vgg16" else GradCAM
    with cls(model=model, target_layers=cam_target_layers(model, arch)) as cam:
        targets = [ClassifierOutputTarget(1)] * x.shape[0]
        return timed(lambda: cam(input_tensor=x, targets=targets), iters, warmup, sync)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--arch", action="append", choices=ARCHITECTURES, help="default: all three")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1 and 8)")
    ap.add_argument("--size", type=int, default=224, help="network input size (default 224)")
    ap.add_argument("--iters", type=int, default=0, help="timed repetitions (default: 5 at batch 1, 3 above; 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores of the process)")
    ap.add_argument("--library", action="store_true", help="also time pytorch-grad-cam's default path at batch 1")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="summary of the timed repetitions (min: best of N, steadier on a shared machine)")
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    archs = args.arch or list(ARCHITECTURES)
    batches = args.batch or [1, 8]
    spec = InputSpec(size=args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        for arch in archs:
            torch.manual_seed(0)
            card = ModelCard(name=f"bench-{arch}", architecture=arch, version="0", input=spec)
            folder = save_model_folder(Path(tmp) / arch, build_model(arch).eval(), card, half=True)
            engine = InferenceEngine([folder], device=args.device, batch_size=max(batches), threads=args.threads)
            dev = engine.device
            sync = functools.partial(torch.cuda.synchronize, dev) if dev.type == "cuda" else (lambda: None)
            for b in batches:
                batch = images(spec, b)
                iters = args.iters or (20 if dev.type == "cuda" else (5 if b == 1 else 3))
                t_fwd, t_cam = timed_pair(
                    functools.partial(engine.predict, batch, with_cam=False),
                    functools.partial(engine.predict, batch),
                    iters,
                    args.warmup,
                    sync,
                )
                row = {
                    "arch": arch, "batch": b, "device": str(dev), "threads": engine.threads,
                    "precision": engine.describe()["precision"], "cam": engine.describe()["cam_method"],
                    "forward_ms": 1000 * t_fwd / b, "cam_ms": 1000 * t_cam / b,
                    "forward_ips": b / t_fwd, "cam_ips": b / t_cam, "ratio": t_cam / t_fwd,
                }
                if args.library and b == 1:
                    x = torch.stack([p.tensor for p in batch]).to(dev).contiguous(memory_format=torch.channels_last)
                    t_lib = library_default(arch, x, max(2, iters // 2), args.warmup, sync)
                    row["library_ms"] = 1000 * t_lib / b
                    row["library_ratio"] = t_lib / t_fwd
                rows.append(row)
                print(
                    f"  {arch} b{b}: forward {row['forward_ms']:.1f} ms/img, +CAM {row['cam_ms']:.1f} ms/img, "
                    f"ratio {row['ratio']:.2f}" + (f", library default {row['library_ratio']:.2f}x" if "library_ms" in row else ""),
                    file=sys.stderr,
                    flush=True,
                )
            engine.close()
    dev_name = torch.cuda.get_device_name(0) if rows and rows[0]["device"].startswith("cuda") else cpu_name()
    print(f"\nInference at {args.size} px on {dev_name}; torch {torch.__version__}; "
          f"threads {rows[0]['threads'] if rows else '?'}; {rows[0]['precision'] if rows else ''}; {args.stat} of the timed runs; "
          f"load average at the end {load_average()}")
    lib = any("library_ms" in r for r in rows)
    head = "| model | CAM | batch | forward ms/img | forward img/s | forward+CAM ms/img | forward+CAM img/s | ratio |"
    sep = "|---|---|---|---|---|---|---|---|"
    if lib:
        head += " library default ms/img (ratio) |"
        sep += "---|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['arch']} | {r['cam']} | {r['batch']} | {r['forward_ms']:.1f} | {r['forward_ips']:.1f} | "
                f"{r['cam_ms']:.1f} | {r['cam_ips']:.1f} | {r['ratio']:.2f}x |")
        if lib:
            line += f" {r['library_ms']:.1f} ({r['library_ratio']:.2f}x) |" if "library_ms" in r else " |"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
