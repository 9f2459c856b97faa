"""A synthetic fracture data set: "a bright line inside a box means fracture".

``write_synthetic_set(root, n_fractured, n_normal, seed)`` writes PNG radiograph stand-ins in the
training package's layout (``fractured/``, ``not_fractured/``, ``manifest.csv`` with groups, sizes and
region flags, ``boxes.csv`` as fractions of width and height). Every image has a smooth textured
background and a broad bright "bone" band; a fractured image also has a thin bright line segment, and
its box is the segment's bounding box with a small margin. The boxes are known exactly, so a model
that learned the task points inside them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

REGIONS = ("hand", "leg", "hip", "shoulder")


def synthetic_image(rng: np.random.Generator, fractured: bool) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """uint8 (h, w) image and the fracture box (x0, y0, x1, y1) in pixels (end exclusive) or None."""
    h, w = int(rng.integers(200, 260)), int(rng.integers(180, 240))
    coarse = rng.random((6, 6)).astype(np.float32)
    img = 60 + 50 * cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    x = int(rng.integers(w // 4, w // 2))
    img[:, x : x + w // 4] += 40  # a "bone" band, in both classes
    img += rng.normal(0, 6, (h, w)).astype(np.float32)
    box = None
    if fractured:
        length = int(rng.integers(26, 36))
        angle = rng.uniform(0, np.pi)
        cx, cy = int(rng.integers(30, w - 30)), int(rng.integers(30, h - 30))
        dx, dy = int(round(np.cos(angle) * length / 2)), int(round(np.sin(angle) * length / 2))
        p0, p1 = (cx - dx, cy - dy), (cx + dx, cy + dy)
        cv2.line(img, p0, p1, 250.0, 3)
        m = 8
        box = (max(0, min(p0[0], p1[0]) - m), max(0, min(p0[1], p1[1]) - m), min(w, max(p0[0], p1[0]) + m + 1), min(h, max(p0[1], p1[1]) + m + 1))
    return np.clip(img, 0, 255).astype(np.uint8), box


def write_synthetic_set(root: Path, n_fractured: int, n_normal: int, seed: int = 0) -> Path:
    """Write the set under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows, boxes = [], []
    for label, n in (("fractured", n_fractured), ("not_fractured", n_normal)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, box = synthetic_image(rng, label == "fractured")
            name = f"{label}/s{seed}-{i:04d}.png"
            cv2.imwrite(str(root / name), img)
            h, w = img.shape
            region = REGIONS[i % len(REGIONS)]
            rows.append([name, label, f"{label}-{seed}-{i}", w, h, *[int(r == region) for r in REGIONS]])
            if box is not None:
                x0, y0, x1, y1 = box
                boxes.append([name, x0 / w, y0 / h, x1 / w, y1 / h])
    with (root / "manifest.csv").open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["file", "label", "group", "width", "height", *REGIONS])
        wr.writerows(rows)
    with (root / "boxes.csv").open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["file", "x0", "y0", "x1", "y1"])
        wr.writerows(boxes)
    return root
