#!/usr/bin/env python3
"""The model's forward pass beside a thread that runs Python, at two interpreter switch intervals.

The worker runs the forward pass in one thread while its loader and writer threads decode images and
build Structured Reports in Python. torch releases the interpreter lock inside each operator and takes it
back between operators, waiting up to ``sys.getswitchinterval()`` for a thread that holds it. This prints
the seconds per forward pass (the bundled model, one image, ``--threads`` torch threads):

1. alone (the baseline);
2. beside a thread looping in Python, at CPython's default switch interval (5 ms);
3. the same at the worker's ``GIL_SWITCH_INTERVAL_S`` (``pacs_ai.daemon.worker``);

with the ratios to (1), and the Python thread's loop turns per second in (2) and (3) (what the smaller
interval costs it).

    .venv/bin/python benchmarks/bench_switch_interval.py               # about 30 s on 2 cores
    .venv/bin/python benchmarks/bench_switch_interval.py --model FOLDER --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pacs_ai.daemon.worker import GIL_SWITCH_INTERVAL_S
from pacs_ai.infer.model_card import load_model_folder


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``repeats`` forward passes."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def beside_python(model: torch.nn.Module, x: torch.Tensor, repeats: int, interval: float) -> tuple[float, float]:
    """(median forward seconds, Python loop turns per second) with a looping thread, at ``interval``."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    stop = threading.Event()
    turns = [0]

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1
        turns[0] = n

    thread = threading.Thread(target=spin, daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        seconds = forward_seconds(model, x, repeats)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(before)
    return seconds, turns[0] / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "reference")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the worker's burst setting on 2 cores)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, card = load_model_folder(args.model)
    model = model.to(memory_format=torch.channels_last)
    size = card.input.size
    x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    forward_seconds(model, x, 2)  # warm-up: oneDNN primitives, allocator
    alone = forward_seconds(model, x, args.repeats)
    default, default_turns = beside_python(model, x, args.repeats, 0.005)
    worker, worker_turns = beside_python(model, x, args.repeats, GIL_SWITCH_INTERVAL_S)
    print(f"forward pass of {card.name} {card.version} ({card.architecture}, {size} px, batch 1, "
          f"{args.threads} torch thread(s)), median of {args.repeats}")
    print(f"{'condition':58s} {'s':>7s} {'x alone':>8s} {'Python M turns/s':>17s}")
    print(f"{'alone':58s} {alone:7.3f} {1.0:8.2f}")
    print(f"{'beside a Python thread, switch interval 5 ms':58s} {default:7.3f} {default / alone:8.2f} "
          f"{default_turns / 1e6:17.1f}")
    label = f"beside a Python thread, switch interval {GIL_SWITCH_INTERVAL_S * 1000:g} ms (worker)"
    print(f"{label:58s} {worker:7.3f} {worker / alone:8.2f} {worker_turns / 1e6:17.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
