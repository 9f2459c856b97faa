"""``evaluate``, ``calibrate`` and ``export`` commands: a model folder (or checkpoint) against labelled images."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pacs_ai.infer.architectures import build_model
from pacs_ai.infer.model_card import ModelCard, load_model_folder, save_card
from training.data import Item, list_dataset, load_images, read_split
from training.export import calibration, export_model
from training.metrics import softmax_positive, summarize
from training.plots import confusion_png, roc_png
from training.predict import pick_device, predict_letterboxed


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
    model, card = load_model_folder(model_dir, map_location=pick_device(device))
    model.to(memory_format=torch.channels_last)
    pred = predict_model(model, card, data, items, cache_dir, batch_size)
    metrics = summarize(pred.y, pred.prob, card.threshold, n_boot=n_boot)
    metrics.update({"model": card.name, "architecture": card.architecture, "version": card.version, "temperature": card.temperature})
    return metrics, pred, card


def evaluate_command(args: argparse.Namespace) -> int:
    items = select_items(args.data, args.split, args.subset)
    metrics, pred, card = evaluate_folder(args.model, args.data, items, args.cache_dir, args.device, args.n_boot, args.batch_size)
    out = args.out or (args.json.parent if args.json else None)
    if out is not None:
        roc_png({card.name: (pred.y, pred.prob)}, Path(out) / "roc.png", f"ROC: {card.name} on {len(pred.y)} images")
        confusion_png({card.name: {**metrics["confusion_matrix"], "threshold": card.threshold}}, Path(out) / "confusion.png")
    text = json.dumps(metrics, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    ci = metrics.get("ci95", {})
    print(f"{card.name} ({card.architecture}) on {metrics['n']} images ({metrics['n_fractured']} fractured), threshold {card.threshold:.4f}")
    for k in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1"):
        lo_hi = ci.get(k) or [None, None]
        v = metrics[k]
        print(f"  {k:12s} {v if v is None else round(v, 4)}  95% CI {lo_hi}")
    cm = metrics["confusion_matrix"]
    print(f"  confusion    tn {cm['tn']}  fp {cm['fp']}  fn {cm['fn']}  tp {cm['tp']}")
    return 0


def calibrate_command(args: argparse.Namespace) -> int:
    items = select_items(args.data, args.split, args.subset)
    model, card = load_model_folder(args.model, map_location=pick_device(args.device))
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
