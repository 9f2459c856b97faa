"""Training augmentation on letterboxed uint8 images (the output of ``preprocess.letterbox``).

Small rotation, zoom, shift, horizontal flip and brightness/contrast, applied with one affine warp so
the image is resampled once. The result stays uint8, same shape, finite and in [0, 255]; padding stays
black like the letterbox padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (all symmetric around identity)."""

    rotate_deg: float = 10.0
    zoom: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.05
    hflip: bool = True
    brightness: float = 0.1
    contrast: float = 0.15


def random_affine(s: int, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """A random 2x3 affine matrix for an (s, s) image: rotation, zoom, shift, horizontal flip."""
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
    scale = rng.uniform(*cfg.zoom)
    m = cv2.getRotationMatrix2D((s / 2.0, s / 2.0), angle, scale)
    m[:, 2] += rng.uniform(-cfg.shift, cfg.shift, size=2) * s
    if cfg.hflip and rng.random() < 0.5:
        # x' = s - 1 - x applied after the affine
        m[0, :] = -m[0, :]
        m[0, 2] += s - 1
    return m


def _photometric(out: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    c = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
    b = rng.uniform(-cfg.brightness, cfg.brightness) * 255.0
    if c != 1.0 or b != 0.0:
        mask = out > 0  # keep the padding black
        adj = np.clip(out.astype(np.float32) * c + b, 0, 255).astype(np.uint8)
        out = np.where(mask, adj, out)
    return out


def augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """One random augmentation of a square uint8 image (S, S) -> uint8 (S, S)."""
    s = img.shape[0]
    m = random_affine(s, rng, cfg)
    out = cv2.warpAffine(img, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return _photometric(out, rng, cfg)


def augment_with_mask(
    img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a square uint8 image (S, S) and move a float32 mask (S, S) (e.g. fracture boxes) with it.

    The same affine warps both (the mask bilinearly, so its values stay in [0, 1]); brightness and
    contrast change only the image.
    """
    s = img.shape[0]
    m = random_affine(s, rng, cfg)
    out = cv2.warpAffine(img, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    moved = cv2.warpAffine(mask.astype(np.float32), m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return _photometric(out, rng, cfg), moved


def augment_batch(imgs: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Augment each image of (N, S, S) uint8 independently."""
    return np.stack([augment(im, rng, cfg) for im in imgs]) if len(imgs) else imgs.copy()
