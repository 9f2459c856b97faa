"""``compare``: several model folders (and their ensemble) on the same images -> report.md, metrics.json, confusion.png."""

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
from training.evaluate import engine_run, full_metrics, read_regions, select_items
from training.metrics import json_clean
from training.plots import confusion_png
from training.pointing import read_boxes


@torch.inference_mode()
def ms_per_image(model: torch.nn.Module, images: np.ndarray, spec: Any, device: torch.device) -> float:
    """Median milliseconds of a batch-1 forward pass (after one warm-up), on ``device``."""
    model.eval()
    times = []
    for i, img in enumerate(images):
        x = normalise(np.ascontiguousarray(img), spec).unsqueeze(0).to(device).contiguous(memory_format=torch.channels_last)
        t = time.perf_counter()
        model(x)  # a fracture-map model's forward() is its full forward_map pass
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


def _card_row(folder: Path, model: torch.nn.Module, card: Any, ms: float) -> dict[str, Any]:
    size_mb = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()) / 1e6
    return {
        "label": f"{card.architecture}: {card.name} {card.version}",
        "folder": str(folder),
        "name": card.name,
        "version": card.version,
        "architecture": card.architecture,
        "head": card.head,
        "input_size": card.input.size,
        "epochs": card.training.get("epoch"),
        "weights": card.training.get("weights"),
        "training_seconds": card.training.get("seconds"),
        "training_machine": card.training.get("machine"),
        "parameters": count_parameters(model),
        "folder_mb": round(size_mb, 1),
        "ms_per_image_b1": round(ms, 1),
        "threshold": card.threshold,
    }


QUALITY = ("n", "n_fractured", "auc", "sensitivity", "specificity", "precision", "f1", "accuracy", "confusion_matrix",
           "sensitivity_at_specificity_90", "specificity_at_sensitivity_90", "pointing_game", "pointing_game_ci95", "hits", "n_boxed",
           "ece", "auc_by_region", "ci95", "heat_map")
"""The figures a comparison row takes from an evaluation (``evaluate``'s JSON or a run here)."""


def _reused(evaluations: list[Path], name: str, version: str, n: int, temperature: float | None) -> dict[str, Any] | None:
    """The figures of an ``evaluate --json`` file made for model ``name`` ``version`` (and, for a single model,
    the card's ``temperature``: a recalibrated copy is another model) on ``n`` images, if one is given."""
    for path in evaluations:
        m = json.loads(Path(path).read_text())
        same_t = temperature is None or m.get("temperature") is None or abs(float(m["temperature"]) - temperature) < 1e-9
        if m.get("model") == name and m.get("version") == version and m.get("n") == n and same_t:
            return {k: m[k] for k in QUALITY if k in m} | {"figures_from": str(path)}
    return None


def _quality(folders: list[Path], args: argparse.Namespace, items: list[Any], name: str, version: str, temperature: float | None) -> dict[str, Any]:
    got = _reused(list(args.evaluations or []), name, version, len(items), temperature)
    if got is not None:
        return got
    boxes_path = Path(args.data) / "boxes.csv"
    boxes = read_boxes(boxes_path) if boxes_path.is_file() else None
    run = engine_run(folders if len(folders) > 1 else folders[0], args.data, items, boxes, args.device, 8, args.threads or 0)
    m = full_metrics(run, run.card.threshold, read_regions(args.data), n_boot=args.n_boot)
    return {k: m[k] for k in QUALITY if k in m} | {"figures_from": "this run"}


def compare_command(args: argparse.Namespace) -> int:
    """Rows: each model folder, then (``--ensemble``) all of them as the daemon's ensemble. Quality figures come
    from the daemon's engine (``evaluate.engine_run`` + ``full_metrics``: AUROC, operating points, pointing game,
    ECE, with 95% intervals), or from a matching ``--evaluations`` file written by ``evaluate --json``; the
    batch-1 forward time is always measured here, on ``--device``."""
    items = select_items(args.data, args.split, args.subset)
    device = select_device(args.device, key="--device")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    extra = list(args.extra_models or [])
    for folder in [*extra, *args.models]:
        model, card = load_model_folder(folder, map_location=device)
        model.to(memory_format=torch.channels_last)
        timing_imgs = load_images(args.data, items[: max(2, args.timing_images)], card.input, None, progress=False)
        row = _card_row(folder, model, card, ms_per_image(model, timing_imgs, card.input, device))
        del model
        row.update(_quality([folder], args, items, card.name, card.version, card.temperature))
        rows.append(row)
        print(f"{row['label']}: AUROC {_fmt(row['auc'], row['ci95'].get('auc'))}, pointing game {_fmt(row.get('pointing_game'))}, "
              f"{row['ms_per_image_b1']:.1f} ms/img", flush=True)
    members = rows[len(extra) :]
    if args.ensemble and len(members) > 1:
        name, version = "+".join(r["name"] for r in members), "+".join(r["version"] for r in members)
        ens = {
            "label": "ensemble (" + " + ".join(r["architecture"] for r in members) + ")",
            "folder": " ".join(r["folder"] for r in members), "name": name, "version": version, "architecture": "+".join(r["architecture"] for r in members),
            "head": members[0]["head"], "input_size": members[0]["input_size"], "epochs": None, "weights": members[0]["weights"],
            "training_seconds": sum(r["training_seconds"] or 0 for r in members), "training_machine": members[0]["training_machine"],
            "parameters": sum(r["parameters"] for r in members), "folder_mb": round(sum(r["folder_mb"] for r in members), 1),
            "ms_per_image_b1": round(sum(r["ms_per_image_b1"] for r in members), 1), "threshold": members[0]["threshold"],
        }
        ens.update(_quality(list(args.models), args, items, name, version, None))
        rows.append(ens)
        print(f"{ens['label']}: AUROC {_fmt(ens['auc'], ens['ci95'].get('auc'))}, pointing game {_fmt(ens.get('pointing_game'))}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    confusion_png({r["label"]: {**r["confusion_matrix"], "threshold": r["threshold"]} for r in rows}, out / "confusion.png")
    (out / "metrics.json").write_text(json.dumps(json_clean(rows), indent=2) + "\n")
    (out / "report.md").write_text(render_report(rows, len(items), int(sum(i.label for i in items)), device))
    print(f"wrote {out / 'report.md'}")
    return 0


def render_report(rows: list[dict[str, Any]], n: int, n_pos: int, device: torch.device) -> str:
    from training.export import machine_description

    lines = [
        "# Backbone comparison",
        "",
        f"{n} images ({n_pos} fractured). Each model through the daemon's engine (preprocessing, inference, explainer); "
        "sensitivity/specificity at each model's calibrated threshold (the ensemble: the first model's); 95% bootstrap "
        "intervals (pointing game: Wilson) in brackets.",
        f"Forward time: median batch-1 forward at the model's input size on {device.type} ({machine_description()}); "
        "the ensemble's is the sum of its members'.",
        "",
        "| model | input | parameters | folder MB | training | ms/image | AUROC | sensitivity | specificity | sens. at spec. 0.90 | spec. at sens. 0.90 | pointing game | ECE | threshold |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = r.get("ci95", {})
        train = f"{r['training_seconds'] / 60:.1f} min" if r.get("training_seconds") else "n/a"
        pg = _fmt(r.get("pointing_game"), r.get("pointing_game_ci95"))
        if r.get("n_boxed"):
            pg += f" [{r['hits']}/{r['n_boxed']}]"
        lines.append(
            f"| {r['label']} | {r['input_size']} | {r['parameters'] / 1e6:.1f} M | {r['folder_mb']} | {train} | {r['ms_per_image_b1']} | "
            + " | ".join(_fmt(r.get(k), ci.get(k)) for k in ("auc", "sensitivity", "specificity", "sensitivity_at_specificity_90", "specificity_at_sensitivity_90"))
            + f" | {pg} | {_fmt(r.get('ece'))} | {r['threshold']:.3f} |"
        )
    machines = sorted({str(r["training_machine"]) for r in rows if r.get("training_machine")})
    sources = sorted({str(r["figures_from"]) for r in rows if r.get("figures_from")})
    lines += ["", "Training machine(s): " + "; ".join(machines) + ".", "", "Quality figures from: " + "; ".join(f"`{s}`" for s in sources) + ".",
              "", "![Confusion matrices](confusion.png)", ""]
    return "\n".join(lines)
