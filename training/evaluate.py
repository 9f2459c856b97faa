"""``evaluate``, ``calibrate`` and ``export`` commands: a model folder (or checkpoint) against labelled images."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pacs_ai.infer.architectures import build_model
from pacs_ai.infer.device import select_device
from pacs_ai.infer.model_card import ModelCard, load_model_folder, save_card
from pacs_ai.infer.preprocess import Prepared, cam_to_original, prepare, read_gray
from training.data import Item, list_dataset, load_images, read_split
from training.export import calibration, export_model
from training.metrics import (
    binary_metrics,
    bootstrap,
    json_clean,
    operating_points,
    reliability,
    softmax_positive,
    summarize,
)
from training.plots import confusion_png, reliability_png, roc_png
from training.pointing import Box, peak_hit, pointing_game, read_boxes
from training.predict import predict_letterboxed

if TYPE_CHECKING:
    from pacs_ai.infer.engine import InferenceEngine, Prediction


@dataclass
class Predictions:
    """Labels, logits and calibrated probabilities of one model on one image set."""

    items: list[Item]
    y: np.ndarray
    logits: np.ndarray
    prob: np.ndarray


def select_items(data: Path, split: Path | None, subset: str) -> list[Item]:
    """The images to evaluate: a split CSV's subset, or every labelled image in ``data``."""
    if split is None:
        return list_dataset(data)
    rows = read_split(split)
    if subset not in rows:
        raise ValueError(f"{split}: no rows with split={subset!r} (has {', '.join(sorted(rows))})")
    return rows[subset]


def predict_model(
    model: torch.nn.Module, card: ModelCard, data: Path, items: list[Item], cache_dir: Path | None, batch_size: int = 32
) -> Predictions:
    """Run ``model`` on ``items`` with the card's preprocessing and temperature."""
    images = load_images(data, items, card.input, cache_dir)
    logits = predict_letterboxed(model, images, card.input, batch_size=batch_size, progress="predict")
    y = np.array([it.label for it in items])
    prob = softmax_positive(logits, card.temperature, card.positive_index)
    return Predictions(items, y, logits, prob)


def evaluate_folder(model_dir: Path, data: Path, items: list[Item], cache_dir: Path | None, device: str = "auto", n_boot: int = 1000, batch_size: int = 32) -> tuple[dict[str, Any], Predictions, ModelCard]:
    """Metrics of one model folder on ``items`` (card threshold and temperature)."""
    model, card = load_model_folder(model_dir, map_location=select_device(device, key="--device"))
    model.to(memory_format=torch.channels_last)
    pred = predict_model(model, card, data, items, cache_dir, batch_size)
    metrics = summarize(pred.y, pred.prob, card.threshold, n_boot=n_boot)
    metrics.update({"model": card.name, "architecture": card.architecture, "version": card.version, "temperature": card.temperature})
    return metrics, pred, card


REGIONS = ("hand", "leg", "hip", "shoulder")
"""Manifest flag columns scored separately (``auc_by_region``)."""


@dataclass
class EngineRun:
    """What the daemon's engine said about each image: probability, and for boxed fractured images
    whether the heat-map peak (on the original pixels) fell inside a fracture box."""

    items: list[Item]
    y: np.ndarray
    prob: np.ndarray
    hits: dict[str, bool]
    card: ModelCard
    """The (first) model's card: its threshold is the run's."""
    cam_method: str
    model_name: str
    """``name`` of the card, or of each ensemble member joined by ``+``; likewise ``architecture`` and ``version``."""
    architecture: str
    version: str


def engine_predictions(engine: InferenceEngine, data: Path, items: list[Item], with_cam: bool, progress: str | None = None) -> Iterator[tuple[Item, Prepared, Prediction]]:
    """``(item, prepared, prediction)`` per item, in order, through exactly the daemon's path:
    ``preprocess.read_gray`` -> ``preprocess.prepare`` -> ``InferenceEngine.predict`` (its explainer:
    ``prediction.cam`` is the heat map on the network grid, as the daemon's writers get it).

    Used by ``evaluate`` and ``cam-review``, so the heat map they score is the heat map that is shipped."""
    n = engine.batch_size
    starts: Iterable[int] = range(0, len(items), n)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    for s in starts:
        chunk = items[s : s + n]
        prepared = [prepare(read_gray(Path(data) / it.file), engine.spec) for it in chunk]
        yield from zip(chunk, prepared, engine.predict(prepared, with_cam=with_cam), strict=True)


def engine_run(model_dir: Path | list[Path], data: Path, items: list[Item], boxes: dict[str, list[Box]] | None, device: str = "auto", batch_size: int = 8, threads: int = 0, progress: bool = True) -> EngineRun:
    """Run ``items`` through :func:`engine_predictions`; for boxed fractured images, whether the heat
    map's peak on the original pixels (``cam_to_original``) lies in a box. Heat maps are computed only
    when ``boxes`` are given. Several model folders: their ensemble (``InferenceEngine``'s rule)."""
    from pacs_ai.infer.engine import InferenceEngine

    engine = InferenceEngine(model_dir, device=device, batch_size=batch_size, threads=threads or 0)
    probs: list[float] = []
    hits: dict[str, bool] = {}
    try:
        for it, prep, pred in engine_predictions(engine, data, items, boxes is not None, "engine" if progress else None):
            probs.append(pred.probability)
            if boxes is not None and it.label == 1 and boxes.get(it.file):
                hits[it.file] = peak_hit(cam_to_original(pred.cam, prep.geometry), boxes[it.file])
        card = engine.cards[0]
        names = (engine.model_name, engine.architecture, engine.model_version)
        method = engine.describe()["cam_method"]
    finally:
        engine.close()
    return EngineRun(items, np.array([it.label for it in items]), np.asarray(probs, dtype=np.float64), hits, card, method, *names)


def read_regions(data: Path) -> dict[str, dict[str, bool]]:
    """``file -> {region: flag}`` from ``data/manifest.csv`` (columns hand, leg, hip, shoulder); empty without."""
    path = Path(data) / "manifest.csv"
    out: dict[str, dict[str, bool]] = {}
    if not path.is_file():
        return out
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            flags = {r: row.get(r, "").strip() in ("1", "true", "True") for r in REGIONS if r in row}
            if flags:
                out[row["file"]] = flags
    return out


def full_metrics(run: EngineRun, threshold: float, regions: dict[str, dict[str, bool]], n_boot: int = 1000) -> dict[str, Any]:
    """``summarize`` plus operating points, pointing game, AUROC per region and calibration, with 95% intervals."""
    y, prob = run.y, run.prob
    m = summarize(y, prob, threshold, n_boot=n_boot)
    m.update(operating_points(y, prob))
    m.setdefault("ci95", {}).update(bootstrap(y, prob, operating_points, n_boot=n_boot, seed=1))
    if run.hits:
        m.update(pointing_game(list(run.hits.values())))
        m["heat_map"] = run.cam_method
    by_region: dict[str, Any] = {}
    for region in REGIONS:
        sel = np.array([regions.get(it.file, {}).get(region, False) for it in run.items])
        if not sel.any():
            continue
        yy, pp = y[sel], prob[sel]
        entry: dict[str, Any] = {"n": int(sel.sum()), "n_fractured": int(yy.sum())}
        if 0 < yy.sum() < len(yy):
            entry["auc"] = binary_metrics(yy, pp, threshold)["auc"]
            entry["auc_ci95"] = bootstrap(yy, pp, lambda a, b: {"auc": binary_metrics(a, b, 0.5)["auc"]}, n_boot=n_boot, seed=2).get("auc")
        else:
            entry["auc"] = None
        by_region[region] = entry
    if by_region:
        m["auc_by_region"] = by_region
    rel = reliability(y, prob)
    m["ece"] = rel["ece"]
    m["reliability"] = rel
    return json_clean(m)


def evaluate_command(args: argparse.Namespace) -> int:
    items = select_items(args.data, args.split, args.subset)
    boxes_path = Path(args.data) / "boxes.csv"
    boxes = read_boxes(boxes_path) if boxes_path.is_file() else None
    run = engine_run(args.model, args.data, items, boxes, args.device, min(args.batch_size, 8), args.threads or 0)
    card = run.card
    metrics = full_metrics(run, card.threshold, read_regions(args.data), n_boot=args.n_boot)
    name = run.model_name
    metrics.update({"model": name, "architecture": run.architecture, "head": card.head, "version": run.version,
                    "temperature": card.temperature, "members": len(args.model)})
    out = args.out or (args.json.parent if args.json else None)
    if out is not None:
        roc_png({name: (run.y, run.prob)}, Path(out) / "roc.png", f"ROC: {name} on {len(run.y)} images")
        confusion_png({name: {**metrics["confusion_matrix"], "threshold": card.threshold}}, Path(out) / "confusion.png")
        reliability_png(metrics["reliability"], Path(out) / "reliability.png", f"{name} on {len(run.y)} images")
    text = json.dumps(metrics, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    ci = metrics.get("ci95", {})
    print(f"{name} ({metrics['architecture']}, {card.head}) on {metrics['n']} images ({metrics['n_fractured']} fractured), threshold {card.threshold:.4f}")
    for k in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "sensitivity_at_specificity_90", "specificity_at_sensitivity_90"):
        lo_hi = ci.get(k) or [None, None]
        v = metrics.get(k)
        print(f"  {k:30s} {v if v is None else round(v, 4)}  95% CI {[None if x is None else round(x, 4) for x in lo_hi]}")
    if "pointing_game" in metrics:
        lo, hi = metrics["pointing_game_ci95"]
        print(f"  {'pointing_game':30s} {metrics['pointing_game']:.4f}  ({metrics['hits']}/{metrics['n_boxed']}, 95% CI [{lo:.4f}, {hi:.4f}]; {metrics['heat_map']})")
    for region, e in metrics.get("auc_by_region", {}).items():
        print(f"  auc {region:26s} {e['auc'] if e['auc'] is None else round(e['auc'], 4)}  95% CI {e.get('auc_ci95')}  (n {e['n']}, {e['n_fractured']} fractured)")
    print(f"  {'ece':30s} {metrics['ece']:.4f}")
    cm = metrics["confusion_matrix"]
    print(f"  confusion    tn {cm['tn']}  fp {cm['fp']}  fn {cm['fn']}  tp {cm['tp']}")
    return 0


def calibrate_command(args: argparse.Namespace) -> int:
    items = select_items(args.data, args.split, args.subset)
    model, card = load_model_folder(args.model, map_location=select_device(args.device, key="--device"))
    model.to(memory_format=torch.channels_last)
    card.temperature = 1.0
    pred = predict_model(model, card, args.data, items, args.cache_dir, args.batch_size)
    cal = calibration(pred.logits, pred.y, args.target_sensitivity, n_boot=args.n_boot)
    card.temperature = cal["temperature"]
    card.threshold = cal["threshold"]
    card.metrics = {
        **card.metrics,
        "validation": cal["validation"],
        "calibration": {
            "method": "temperature scaling on validation NLL; threshold for target sensitivity on validation",
            "target_sensitivity": args.target_sensitivity,
            "nll_before": cal["nll_before"],
            "nll_after": cal["nll_after"],
            "n": len(items),
        },
    }
    save_card(args.model, card)
    v = cal["validation"]
    print(f"temperature {card.temperature:.4f} (NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}); threshold {card.threshold:.4f} "
          f"for sensitivity >= {args.target_sensitivity}: sensitivity {v['sensitivity']:.3f}, specificity {v['specificity']:.3f}; wrote {args.model}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, default_description, load_split, training_info

    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**ck["config"])
    model = build_model(cfg.arch, 2)
    model.load_state_dict(ck["model"])
    model.eval().to(memory_format=torch.channels_last)
    spec = cfg.spec()
    split = load_split(cfg)
    val = split["val"]
    images = load_images(Path(cfg.data), val, spec, args.cache_dir or (Path(cfg.cache_dir) if cfg.cache_dir else None))
    logits = predict_letterboxed(model, images, spec, progress="validation")
    y = np.array([it.label for it in val])
    history = ck.get("history", [])
    n_tr = len(split.get("train", []))
    info = training_info(cfg, cfg.weights, n_tr, len(val), sum(i.label for i in split.get("train", [])), int(y.sum()), ck["epoch"] + 1, history, sum(h.get("seconds", 0) for h in history))
    card = export_model(
        args.out, model, cfg.arch, spec, logits, y, name=args.name or cfg.export_name, version=args.version or cfg.export_version,
        training=info, target_sensitivity=args.target_sensitivity, half=args.half, description=default_description(cfg, cfg.weights),
    )
    v = card.metrics["validation"]
    print(f"exported {args.checkpoint} -> {args.out}: AUROC {v['auc']:.4f} 95% CI {v['ci95']['auc']}, temperature {card.temperature:.3f}, threshold {card.threshold:.4f}")
    return 0
