"""``compare``: several model folders on the same images -> report.md, metrics.json, roc.png, confusion.png."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pacs_ai.infer.architectures import count_parameters
from pacs_ai.infer.device import select_device
from pacs_ai.infer.model_card import load_model_folder
from pacs_ai.infer.preprocess import normalise
from training.data import load_images
from training.evaluate import predict_model, select_items
from training.metrics import summarize
from training.plots import confusion_png, roc_png


@torch.inference_mode()
def ms_per_image(model: torch.nn.Module, images: np.ndarray, spec: Any, device: torch.device) -> float:
    """Median milliseconds of a batch-1 forward pass (after one warm-up), on ``device``."""
    model.eval()
    times = []
    for i, img in enumerate(images):
        x = normalise(np.ascontiguousarray(img), spec).unsqueeze(0).to(device).contiguous(memory_format=torch.channels_last)
        t = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0 or len(images) == 1:
            times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times)) if times else float("nan")


def _fmt(v: float | None, ci: list[float | None] | None = None) -> str:
    if v is None:
        return "n/a"
    s = f"{v:.3f}"
    if ci and ci[0] is not None and ci[1] is not None:
        s += f" ({ci[0]:.3f}-{ci[1]:.3f})"
    return s


def compare_command(args: argparse.Namespace) -> int:
    items = select_items(args.data, args.split, args.subset)
    device = select_device(args.device, key="--device")
    rows: list[dict[str, Any]] = []
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    matrices: dict[str, dict[str, Any]] = {}
    for folder in args.models:
        model, card = load_model_folder(folder, map_location=device)
        model.to(memory_format=torch.channels_last)
        pred = predict_model(model, card, args.data, items, args.cache_dir, args.batch_size)
        m = summarize(pred.y, pred.prob, card.threshold, n_boot=args.n_boot)
        timing_imgs = load_images(args.data, items[: max(2, args.timing_images)], card.input, args.cache_dir, progress=False)
        ms = ms_per_image(model, timing_imgs, card.input, device)
        size_mb = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()) / 1e6
        label = f"{card.architecture} ({Path(folder).name})"
        row = {
            "label": label,
            "folder": str(folder),
            "name": card.name,
            "architecture": card.architecture,
            "input_size": card.input.size,
            "epochs": card.training.get("epoch"),
            "weights": card.training.get("weights"),
            "parameters": count_parameters(model),
            "folder_mb": round(size_mb, 1),
            "ms_per_image_b1": round(ms, 1),
            **m,
        }
        rows.append(row)
        curves[label] = (pred.y, pred.prob)
        matrices[label] = {**m["confusion_matrix"], "threshold": card.threshold}
        print(f"{label}: AUROC {_fmt(m['auc'], m['ci95'].get('auc'))}, {ms:.1f} ms/img", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    roc_png(curves, out / "roc.png", f"ROC curves on {len(items)} images")
    confusion_png(matrices, out / "confusion.png")
    (out / "metrics.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "report.md").write_text(render_report(rows, len(items), int(sum(i.label for i in items)), device))
    print(f"wrote {out / 'report.md'}")
    return 0


def render_report(rows: list[dict[str, Any]], n: int, n_pos: int, device: torch.device) -> str:
    from training.export import machine_description

    lines = [
        "# Backbone comparison",
        "",
        f"{n} images ({n_pos} fractured). Metrics at each model's calibrated threshold; 95% bootstrap intervals in brackets.",
        f"Timing: median batch-1 forward on {device.type} ({machine_description()}).",
        "",
        "| model | input | epochs | weights | parameters | folder MB | ms/image | AUROC | accuracy | sensitivity | specificity | precision | F1 | threshold |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = r.get("ci95", {})
        lines.append(
            f"| {r['label']} | {r['input_size']} | {r['epochs']} | {r['weights']} | {r['parameters'] / 1e6:.1f} M | {r['folder_mb']} | {r['ms_per_image_b1']} | "
            + " | ".join(_fmt(r[k], ci.get(k)) for k in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1"))
            + f" | {r['threshold']:.3f} |"
        )
    lines += ["", "![ROC curves](roc.png)", "", "![Confusion matrices](confusion.png)", ""]
    return "\n".join(lines)
