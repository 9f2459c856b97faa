"""``cam-review``: heat-map overlays for fractured images and the pointing game against fracture boxes.

The heat maps are the daemon's: each image goes through :func:`training.evaluate.engine_predictions`
(``preprocess.read_gray`` -> ``prepare`` -> ``InferenceEngine.predict`` with the model's explainer:
Grad-CAM, HiResCAM for vgg16, or a fracture-map model's own map), then ``preprocess.cam_to_original``
onto the original pixels. There is no second CAM in the training package; ``evaluate``'s pointing game
uses the same path.

Pointing game: an image is a hit when the maximum of its heat map on the original pixels falls inside one
of its fracture boxes (:func:`training.pointing.peak_hit`; an all-zero map is a miss). The score is the
share of hits, with a Wilson 95% interval. The gallery tiles use the Secondary Capture's colour blend
(``pacs_ai.write.overlay.blend_heatmap``) with the boxes in green and the peak as a white cross.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pacs_ai.infer.preprocess import cam_to_original
from pacs_ai.write.overlay import blend_heatmap, normalise_heat
from training.data import Item
from training.evaluate import engine_predictions, select_items
from training.pointing import Box, peak_hit, read_boxes, wilson

if TYPE_CHECKING:
    from pacs_ai.infer.engine import InferenceEngine

__all__ = ["ReviewedImage", "cam_review_command", "review_images", "review_overlay", "save_gallery"]


@dataclass(frozen=True)
class ReviewedImage:
    """The engine's heat map for one boxed fractured image and where its peak fell."""

    file: str
    probability: float
    cam: np.ndarray
    """(S, S) float32 heat map on the network input grid, exactly ``Prediction.cam``."""
    heat: np.ndarray
    """(H, W) float32 heat map on the original pixels (``cam_to_original``)."""
    display: np.ndarray
    """(H, W) uint8 grey image (``Prepared.display``)."""
    peak_yx: tuple[int, int]
    hit: bool


def review_images(engine: InferenceEngine, data: Path, items: list[Item], boxes: dict[str, list[Box]], progress: bool = True) -> Iterator[ReviewedImage]:
    """Heat map, peak and hit of every item through the daemon's engine (an ``InferenceEngine``)."""
    for it, prep, pred in engine_predictions(engine, data, items, True, "cam-review" if progress else None):
        heat = cam_to_original(pred.cam, prep.geometry)
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        yield ReviewedImage(it.file, float(pred.probability), pred.cam, heat, prep.display, (int(y), int(x)), peak_hit(heat, boxes[it.file]))


def review_overlay(display: np.ndarray, heat: np.ndarray, boxes: Sequence[Box], peak: tuple[int, int], heat_scale: str = "relative") -> np.ndarray:
    """RGB uint8 (H, W, 3): the served colour blend of ``heat`` over the grey image, fractional ``boxes``
    in green, the peak (y, x) as a white cross. ``heat_scale`` as ``Prediction.heat_scale``."""
    h, w = display.shape
    scaled = np.clip(heat, 0.0, 1.0) if heat_scale == "probability" else normalise_heat(heat)
    img = np.ascontiguousarray(blend_heatmap(display, scaled))
    t = max(2, round(max(h, w) / 300))
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(img, (int(x0 * w), int(y0 * h)), (int(x1 * w), int(y1 * h)), (0, 255, 0), t)
    cv2.drawMarker(img, (peak[1], peak[0]), (255, 255, 255), cv2.MARKER_CROSS, 8 * t, t)
    return img


def cam_review_command(args: argparse.Namespace) -> int:
    from pacs_ai.infer.engine import InferenceEngine

    boxes_path = args.boxes or (args.data / "boxes.csv")
    boxes = read_boxes(boxes_path)
    items = [it for it in select_items(args.data, args.split, args.subset) if it.label == 1 and it.file in boxes]
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise ValueError(f"no fractured images with boxes in {boxes_path} among the selected images")
    engine = InferenceEngine(args.model, device=args.device, batch_size=min(args.batch_size, 8), threads=args.threads or 0)
    results: list[dict[str, object]] = []
    gallery: list[tuple[np.ndarray, str]] = []
    maps: dict[str, np.ndarray] = {}
    try:
        card = engine.cards[0]
        method = engine.describe()["cam_method"]
        for r in review_images(engine, args.data, items, boxes):
            results.append({"file": r.file, "probability": r.probability, "hit": r.hit, "peak_yx": list(r.peak_yx)})
            if args.maps:
                maps[r.file] = r.cam
            if len(gallery) < args.gallery:
                tile = review_overlay(r.display, r.heat, boxes[r.file], r.peak_yx, engine.heat_scale)
                gallery.append((tile, f"{Path(r.file).name} p={r.probability:.2f} {'hit' if r.hit else 'miss'}"))
    finally:
        engine.close()
    hits = sum(bool(r["hit"]) for r in results)
    summary = {
        "model": card.name,
        "architecture": card.architecture,
        "head": card.head,
        "method": method,
        "n": len(results),
        "hits": hits,
        "pointing_game": hits / len(results),
        "pointing_game_ci95": wilson(hits, len(results)),
        "images": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cam_review.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.maps:
        np.savez_compressed(out / "maps.npz", files=np.array(list(maps)), cams=np.stack(list(maps.values())))
    save_gallery(gallery, out / "gallery.png", f"{card.name}: {method}; pointing game {hits}/{len(results)}")
    lo, hi = summary["pointing_game_ci95"]
    print(f"pointing game: {hits}/{len(results)} = {hits / len(results):.3f} (95% CI {lo:.3f}-{hi:.3f}; {method}); wrote {out}")
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
    for ax, (img, label) in zip(axes.ravel(), tiles, strict=False):
        ax.imshow(img)
        ax.set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
