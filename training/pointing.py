"""Fracture boxes and the pointing game.

``boxes.csv`` (columns ``file,x0,y0,x1,y1``) gives each fracture box as fractions of the original
image's width and height. The pointing game (Zhang et al., "Top-down neural attention by excitation
backprop", 2016) scores a heat map as a hit when its maximum lies inside one of the image's boxes; the
score is the share of hits over the fractured images that have boxes, with a Wilson 95% interval.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pacs_ai.infer.preprocess import Geometry

Box = tuple[float, float, float, float]

__all__ = ["Box", "boxes_on_grid", "peak_hit", "point_in_boxes", "pointing_game", "read_boxes", "wilson"]


def read_boxes(path: Path) -> dict[str, list[Box]]:
    """``file -> [(x0, y0, x1, y1), ...]`` as fractions of width and height."""
    out: dict[str, list[Box]] = defaultdict(list)
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            out[row["file"]].append((float(row["x0"]), float(row["y0"]), float(row["x1"]), float(row["y1"])))
    return dict(out)


def point_in_boxes(y: int, x: int, h: int, w: int, boxes: Sequence[Box]) -> bool:
    """Whether pixel (y, x) of an (h, w) image (its centre, in fractions) lies in any fractional box."""
    fx, fy = (x + 0.5) / w, (y + 0.5) / h
    return any(x0 <= fx <= x1 and y0 <= fy <= y1 for x0, y0, x1, y1 in boxes)


def boxes_on_grid(boxes: Sequence[Box], geometry: Geometry) -> list[tuple[float, float, float, float]]:
    """Fractional boxes of the original image -> pixel boxes (x0, y0, x1, y1) on the letterboxed square."""
    g = geometry
    return [
        (g.pad_left + x0 * g.new_w, g.pad_top + y0 * g.new_h, g.pad_left + x1 * g.new_w, g.pad_top + y1 * g.new_h)
        for x0, y0, x1, y1 in boxes
    ]


def peak_hit(heat: np.ndarray, boxes: Sequence[Box], geometry: Geometry | None = None) -> bool:
    """Whether the maximum of ``heat`` lies inside a box; an all-zero (or constant) map is a miss.

    Without ``geometry`` the heat map covers the original image and the boxes are fractions of it. With
    ``geometry`` the heat map is on the letterboxed network grid (S, S) and the boxes are mapped there.
    """
    h = np.asarray(heat, dtype=np.float32)
    if h.ndim != 2 or h.size == 0 or not np.isfinite(h).any() or float(np.nanmax(h)) <= float(np.nanmin(h)):
        return False
    y, x = np.unravel_index(int(np.nanargmax(h)), h.shape)
    if geometry is None:
        return point_in_boxes(int(y), int(x), h.shape[0], h.shape[1], boxes)
    cx, cy = x + 0.5, y + 0.5
    return any(x0 <= cx <= x1 and y0 <= cy <= y1 for x0, y0, x1, y1 in boxes_on_grid(boxes, geometry))


def wilson(k: int, n: int, z: float = 1.96) -> list[float | None]:
    """Wilson score interval for a proportion ``k / n``; ``[None, None]`` when ``n == 0``."""
    if n == 0:
        return [None, None]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - half), min(1.0, c + half)]


def pointing_game(hits: Sequence[bool]) -> dict[str, object]:
    """``{"pointing_game": share, "pointing_game_ci95": [lo, hi], "n_boxed": n, "hits": k}`` (None when n = 0)."""
    n = len(hits)
    k = int(sum(bool(h) for h in hits))
    return {"pointing_game": (k / n) if n else None, "pointing_game_ci95": wilson(k, n), "n_boxed": n, "hits": k}
