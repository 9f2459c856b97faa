"""``cam-review``: Grad-CAM overlays for fractured images and the pointing game against fracture boxes.

Pointing game: an image is a hit when the maximum of its heat map (mapped back onto the original pixels
with ``preprocess.cam_to_original``) falls inside one of its fracture boxes. The score is the share of
hits, with a Wilson 95% interval. Uses pytorch-grad-cam on ``architectures.cam_target_layers``
(HiResCAM for vgg16, Grad-CAM otherwise), one CAM object per model, used as a context manager.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pacs_ai.infer.architectures import cam_target_layers
from pacs_ai.infer.model_card import load_model_folder
from pacs_ai.infer.preprocess import cam_to_original, prepare
from training.data import read_gray
from training.evaluate import select_items
from training.metrics import softmax_positive
from training.pointing import Box, point_in_boxes, read_boxes, wilson
from training.predict import pick_device

def overlay(display: np.ndarray, cam: np.ndarray, boxes: list[Box], peak: tuple[int, int]) -> np.ndarray:
    """RGB uint8: heat map blended over the grey image, boxes in green, the maximum as a white cross."""
    h, w = display.shape
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(display, cv2.COLOR_GRAY2BGR)
    img = cv2.addWeighted(base, 0.6, heat, 0.4, 0)
    t = max(2, round(max(h, w) / 300))
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(img, (int(x0 * w), int(y0 * h)), (int(x1 * w), int(y1 * h)), (0, 255, 0), t)
    cv2.drawMarker(img, (peak[1], peak[0]), (255, 255, 255), cv2.MARKER_CROSS, 8 * t, t)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def cam_review_command(args: argparse.Namespace) -> int:
    from pytorch_grad_cam import GradCAM, HiResCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    boxes_path = args.boxes or (args.data / "boxes.csv")
    boxes = read_boxes(boxes_path)
    items = [it for it in select_items(args.data, args.split, args.subset) if it.label == 1 and it.file in boxes]
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise ValueError(f"no fractured images with boxes in {boxes_path} among the selected images")
    device = pick_device(args.device)
    model, card = load_model_folder(args.model, map_location=device)
    cam_cls = HiResCAM if card.architecture == "vgg16" else GradCAM
    target = [ClassifierOutputTarget(card.positive_index)]
    results: list[dict[str, Any]] = []
    gallery: list[tuple[np.ndarray, str]] = []
    from tqdm import tqdm

    with cam_cls(model=model, target_layers=cam_target_layers(model, card.architecture)) as cam:
        for it in tqdm(items, desc=f"grad-cam ({cam_cls.__name__})", unit="img"):
            prep = prepare(read_gray(args.data / it.file), card.input)
            x = prep.tensor.unsqueeze(0).to(device)
            grayscale = cam(input_tensor=x, targets=target)[0]
            logits = cam.outputs.detach().float().cpu().numpy()
            prob = float(softmax_positive(logits, card.temperature, card.positive_index)[0])
            full = cam_to_original(grayscale, prep.geometry)
            peak = np.unravel_index(int(np.argmax(full)), full.shape)
            h, w = full.shape
            hit = bool(full.max() > 0) and point_in_boxes(int(peak[0]), int(peak[1]), h, w, boxes[it.file])
            results.append({"file": it.file, "probability": prob, "hit": hit, "peak_yx": [int(peak[0]), int(peak[1])]})
            if len(gallery) < args.gallery:
                gallery.append((overlay(prep.display, full, boxes[it.file], (int(peak[0]), int(peak[1]))), f"{Path(it.file).name} p={prob:.2f} {'hit' if hit else 'miss'}"))
    hits = sum(r["hit"] for r in results)
    summary = {
        "model": card.name,
        "architecture": card.architecture,
        "method": cam_cls.__name__,
        "n": len(results),
        "pointing_game": hits / len(results),
        "pointing_game_ci95": wilson(hits, len(results)),
        "images": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cam_review.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_gallery(gallery, out / "gallery.png", f"{card.name}: {cam_cls.__name__}; pointing game {hits}/{len(results)}")
    lo, hi = summary["pointing_game_ci95"]
    print(f"pointing game: {hits}/{len(results)} = {hits / len(results):.3f} (95% CI {lo:.3f}-{hi:.3f}); wrote {out}")
    return 0


def save_gallery(tiles: list[tuple[np.ndarray, str]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tiles)
    cols = min(4, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, label) in zip(axes.ravel(), tiles):
        ax.imshow(img)
        ax.set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


