"""Heat-map overlay rendering: the picture that goes into the Secondary Capture.

``render_result_image`` turns the original grey image (``Prepared.display``, bone bright, original
resolution) and the Grad-CAM heat map on the same grid into an 8-bit RGB picture:

- the grey radiograph, downscaled so its long side is at most ``max_side`` pixels;
- the heat map blended in colour (turbo colour map) with an opacity that grows with the heat, so cold
  areas keep the plain grey image and only the hot areas are tinted;
- the hottest region's bounding box (``hottest_region``) drawn as a thin rectangle when one is given;
- a burned-in caption in a dark box (finding, probability, threshold, model, the "not for diagnostic use"
  warning) at the bottom centre and a small colour-scale legend with low/high labels at the top centre,
  both scaled with the image size and clear of the corners, where viewers put their overlay text.

Everything is plain numpy + OpenCV; a 2140x1760 image renders in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "DISCLAIMER",
    "SC_MAX_SIDE",
    "Caption",
    "blend_heatmap",
    "caption_box",
    "hottest_region",
    "normalise_heat",
    "picture_size",
    "render_result_image",
]

DISCLAIMER = "AI RESULT - NOT FOR DIAGNOSTIC USE"
COLORMAP = cv2.COLORMAP_TURBO
MAX_SIDE = 2048
"""The largest picture ``render_result_image`` makes by default (long side, pixels)."""
SC_MAX_SIDE = 1024
"""Long side of the Secondary Capture picture the daemon writes (``pacs_ai.write.results``), pixels.

1024 px shows the whole radiograph with its heat map as a viewer's full-screen image does (a 2140x1760
CR hip becomes 1024x842: 2.6 MB of RGB instead of 10.3 MB at 2048 px), while the original stays in the
PACS at full resolution beside it. Smaller pictures cost less at every step after the model: the JPEG 2000
decode (a reduced resolution level, ``pacs_ai.infer.j2k``), rendering, encoding, writing and fsync, the
C-STORE and the PACS's own storing (issue 12)."""
ALPHA_MAX = 0.55
"""Opacity of the colour at the hottest point."""
ALPHA_FLOOR = 0.15
"""Heat (relative to the maximum) below which the image stays plain grey."""

_FONT = cv2.FONT_HERSHEY_DUPLEX
_WHITE = (255, 255, 255)
_YELLOW = (255, 214, 0)
_RED = (255, 72, 56)
_GREEN = (96, 224, 96)
_ROI = (0, 255, 255)


@dataclass(frozen=True)
class Caption:
    """What the burned-in caption says."""

    fractured: bool
    probability: float
    threshold: float
    model: str
    """Model name and version as shown, e.g. ``resnet50 fracture 1.0.0``."""

    @property
    def finding(self) -> str:
        return "FRACTURE SUSPECTED" if self.fractured else "NO FRACTURE DETECTED"

    def lines(self) -> list[tuple[str, tuple[int, int, int], float]]:
        """(text, RGB colour, relative size) per line, top to bottom."""
        return [
            (self.finding, _RED if self.fractured else _GREEN, 1.35),
            (f"P(fracture) {100.0 * self.probability:.1f}%  (threshold {100.0 * self.threshold:.1f}%)", _WHITE, 1.0),
            (f"Model: {self.model}", _WHITE, 0.85),
            (DISCLAIMER, _YELLOW, 1.0),
        ]


def normalise_heat(heat: np.ndarray) -> np.ndarray:
    """float32 copy of ``heat`` scaled to [0, 1] by its maximum (NaN/negative become 0; all-zero stays 0)."""
    h = np.array(heat, dtype=np.float32, copy=True)
    if h.size == 0:
        return h
    if not np.isfinite(h).all():
        h = np.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)
    np.maximum(h, 0.0, out=h)
    top = float(h.max())
    if top <= 0.0:
        return np.zeros(h.shape, dtype=np.float32)
    h *= np.float32(1.0 / top)
    return h


def hottest_region(heat: np.ndarray, rel_threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` of the hottest blob of ``heat`` (pixel-edge coordinates, end exclusive).

    The blob is the connected component (8-connectivity) of ``heat >= rel_threshold * max`` that contains
    the maximum. Returns None for an empty or all-zero map.
    """
    h = normalise_heat(heat)
    if h.ndim != 2 or h.size == 0 or float(h.max()) <= 0.0:
        return None
    mask = (h >= np.float32(rel_threshold)).astype(np.uint8)
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    y, x = np.unravel_index(int(np.argmax(h)), h.shape)
    ys, xs = np.nonzero(labels == labels[y, x])
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


_BLEND_LUTS: dict[float, tuple[np.ndarray, np.ndarray]] = {}


def _blend_luts(alpha_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(colour map as an RGB LUT (256, 1, 3), opacity LUT (256,) uint8 in 1/255 steps) for heat levels."""
    luts = _BLEND_LUTS.get(alpha_max)
    if luts is None:
        levels = np.arange(256, dtype=np.uint8)
        colour = cv2.applyColorMap(levels[:, None], COLORMAP)[:, 0, ::-1].reshape(256, 1, 3).copy()  # RGB
        # alpha = alpha_max * clip((h - floor) / (1 - floor), 0, 1): zero on cold areas, which stay exactly grey.
        h = levels.astype(np.float32) / np.float32(255.0)
        alpha = np.clip((h - np.float32(ALPHA_FLOOR)) * np.float32(alpha_max / (1.0 - ALPHA_FLOOR)), 0.0, alpha_max)
        luts = _BLEND_LUTS[alpha_max] = (colour, np.round(alpha * 255.0).astype(np.uint8))
    return luts


def blend_heatmap(grey: np.ndarray, heat: np.ndarray, *, alpha_max: float = ALPHA_MAX) -> np.ndarray:
    """Grey uint8 (H, W) + heat in [0, 1] (H, W) -> RGB uint8 (H, W, 3), colour opacity scaled by heat.

    The heat is quantised to 256 levels (as the colour map is); colour and opacity come from lookup
    tables, and only the bounding box of the pixels with a non-zero opacity is blended (8-bit
    arithmetic), so a 2048 px picture with a compact hot area costs a few milliseconds.
    """
    if grey.shape != heat.shape:
        raise ValueError(f"image {grey.shape} and heat map {heat.shape} differ in shape")
    colour_lut, alpha_lut = _blend_luts(float(alpha_max))
    h8 = cv2.convertScaleAbs(np.asarray(heat, dtype=np.float32), alpha=255.0)  # rounded, saturated to 0..255
    a8 = cv2.LUT(h8, alpha_lut)
    out = cv2.cvtColor(np.ascontiguousarray(grey, dtype=np.uint8), cv2.COLOR_GRAY2RGB)
    hot = cv2.findNonZero(a8)
    if hot is None:
        return out
    x, y, w, h = cv2.boundingRect(hot)
    h8, a8 = h8[y : y + h, x : x + w], a8[y : y + h, x : x + w]
    colour = cv2.LUT(cv2.merge([h8, h8, h8]), colour_lut)
    a3 = cv2.merge([a8, a8, a8])
    region = out[y : y + h, x : x + w]
    out[y : y + h, x : x + w] = cv2.add(
        cv2.multiply(colour, a3, scale=1.0 / 255.0), cv2.multiply(region, cv2.bitwise_not(a3), scale=1.0 / 255.0)
    )
    return out


def _shade(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, darkness: float = 0.78) -> None:
    """Darken a rectangle of ``img`` in place (a translucent dark box behind text)."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 > x0 and y1 > y0:
        region = img[y0:y1, x0:x1].astype(np.float32) * np.float32(1.0 - darkness)
        img[y0:y1, x0:x1] = region.astype(np.uint8)


CAPTION_MAX_WIDTH = 0.6
"""The caption sits at the bottom centre and is at most this fraction of the width; the legend sits at the
top centre. Viewers draw their overlay text in the four corners of the viewport (OHIF, the Orthanc Web
Viewer), which lie on the image's corners whenever the image fills the viewport's width; the top ones
are the long ones (OHIF: study date and series description, about a quarter of the width), so the
caption goes to the bottom, between the short window/level and instance-number overlays."""
CAPTION_BOTTOM_GAP = 0.04
"""Space below the caption, as a fraction of the height: the Orthanc Web Viewer writes "Not for diagnostic
purpose" at the bottom centre of the viewport (about 2.5 % of its height)."""


def _font_scale(lines: Sequence[tuple[str, tuple[int, int, int], float]], width: int, height: int) -> float:
    """A font scale that makes text readable at a glance yet keeps the caption within CAPTION_MAX_WIDTH."""
    wanted = max(0.5, min(width, height) / 1100.0)
    widest = max(cv2.getTextSize(text, _FONT, rel, 1)[0][0] for text, _, rel in lines)
    return max(0.3, min(wanted, 0.9 * CAPTION_MAX_WIDTH * width / max(1, widest)))


def caption_box(shape: Sequence[int], caption: Caption) -> tuple[int, int, int, int]:
    """Where the caption is drawn on an image of ``shape`` (h, w, ...): ``(x0, y0, x1, y1)``, end exclusive."""
    h, w = int(shape[0]), int(shape[1])
    lines = caption.lines()
    scale = _font_scale(lines, w, h)
    thickness = max(1, round(scale * 1.6))
    pad = max(4, round(12 * scale))
    sizes = [cv2.getTextSize(t, _FONT, scale * rel, thickness) for t, _, rel in lines]
    box_w = max(s[0][0] for s in sizes) + 2 * pad
    box_h = sum(s[0][1] + s[1] + pad for s in sizes) + pad
    margin = max(2, round(8 * scale))
    x0 = max(0, (w - box_w) // 2)
    y1 = h - max(margin, round(CAPTION_BOTTOM_GAP * h))
    return x0, max(0, y1 - box_h), min(w, x0 + box_w), y1


def _draw_caption(img: np.ndarray, caption: Caption) -> None:
    h, w = img.shape[:2]
    lines = caption.lines()
    scale = _font_scale(lines, w, h)
    thickness = max(1, round(scale * 1.6))
    pad = max(4, round(12 * scale))
    sizes = [cv2.getTextSize(t, _FONT, scale * rel, thickness) for t, _, rel in lines]
    x0, y0, x1, y1 = caption_box(img.shape, caption)
    _shade(img, x0, y0, x1, y1)
    y = y0 + pad
    for (text, colour, rel), ((_, th), base) in zip(lines, sizes, strict=True):
        y += th
        cv2.putText(img, text, (x0 + pad, y), _FONT, scale * rel, colour, thickness, cv2.LINE_AA)
        y += base + pad


LEGENDS: dict[str, tuple[str, str, str]] = {
    "relative": ("Grad-CAM (relative)", "low", "high"),
    "probability": ("P(fracture) per region", "0%", "100%"),
}
"""Legend (title, left label, right label) per heat scale: what the colours mean. ``relative``: where a
classifier looked (Grad-CAM, scaled to its own peak, so a colour does not compare across images);
``probability``: a fracture-map model's own per-region fracture probability (absolute)."""

LEGEND_MAX_WIDTH = 0.55
"""The legend's box is at most this fraction of the picture's width (its font shrinks to fit)."""


def _draw_legend(img: np.ndarray, heat_scale: str = "relative") -> None:
    """A horizontal colour bar (the part of the colour map that is actually shown) with its meaning."""
    title, low, high = LEGENDS[heat_scale]
    h, w = img.shape[:2]
    scale = max(0.4, min(w, h) / 1400.0)
    bar_w = max(40, w // 5)
    widest = max(cv2.getTextSize(title, _FONT, 1.0, 1)[0][0], cv2.getTextSize(low + high, _FONT, 1.0, 1)[0][0] + bar_w / scale)
    scale = max(0.3, min(scale, 0.9 * LEGEND_MAX_WIDTH * w / max(1.0, widest)))
    thickness = max(1, round(scale * 1.5))
    bar_h = max(6, round(h / 70))
    pad = max(3, round(10 * scale))
    (lw, lh), lb = cv2.getTextSize(low, _FONT, scale, thickness)
    (hw, _), _ = cv2.getTextSize(high, _FONT, scale, thickness)
    (tw, th), tb = cv2.getTextSize(title, _FONT, scale, thickness)
    box_w = lw + hw + bar_w + 4 * pad
    box_w = max(box_w, tw + 2 * pad)
    box_h = th + tb + max(bar_h, lh + lb) + 3 * pad
    margin = max(2, round(8 * scale))
    x0, y0 = (w - box_w) // 2, margin  # top centre: the corners belong to viewer overlays
    if x0 < 0 or y0 < 0:
        return
    _shade(img, x0, y0, x0 + box_w, y0 + box_h)
    cv2.putText(img, title, (x0 + pad, y0 + pad + th), _FONT, scale, _WHITE, thickness, cv2.LINE_AA)
    row_top = y0 + 2 * pad + th + tb
    row_h = max(bar_h, lh + lb)
    bx = x0 + 2 * pad + lw
    ramp = np.linspace(0.0, 1.0, bar_w, dtype=np.float32)[None, :].repeat(bar_h, axis=0)
    grey = np.full(ramp.shape, 128, dtype=np.uint8)
    by = row_top + (row_h - bar_h) // 2
    img[by : by + bar_h, bx : bx + bar_w] = blend_heatmap(grey, ramp, alpha_max=1.0)
    text_y = row_top + (row_h + lh) // 2
    cv2.putText(img, low, (x0 + pad, text_y), _FONT, scale, _WHITE, thickness, cv2.LINE_AA)
    cv2.putText(img, high, (bx + bar_w + pad, text_y), _FONT, scale, _WHITE, thickness, cv2.LINE_AA)


def picture_size(height: int, width: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(height, width) of the picture ``render_result_image`` makes of a ``height`` x ``width`` image."""
    factor = min(1.0, max_side / max(height, width))
    return max(1, round(height * factor)), max(1, round(width * factor))


def render_result_image(
    display: np.ndarray,
    heat: np.ndarray | None,
    caption: Caption,
    *,
    roi: Sequence[int] | None = None,
    max_side: int = MAX_SIDE,
    heat_scale: str = "relative",
    source_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Render the Secondary Capture picture; returns RGB uint8 (h, w, 3) with ``max(h, w) <= max_side``.

    ``display`` is the uint8 grey image at the original resolution, ``heat`` a heat map on the same grid
    or, cheaper, already on the picture's grid (``picture_size``) (``heat_scale="relative"``: any
    non-negative scale, normalised by its maximum, e.g. Grad-CAM; ``"probability"``: per-region fracture
    probability in [0, 1], shown as is so a cold map stays grey; None or all-zero gives no tint), ``roi``
    an ``(x0, y0, x1, y1)`` box in original pixel coordinates to outline. The legend says what the
    colours are (``LEGENDS``). ``source_size`` (rows, columns): the original image's size when
    ``display`` is already a downscaled copy of it (``prepare(..., display_max_side=...)``); ``roi`` is
    scaled from it.
    """
    if heat_scale not in LEGENDS:
        raise ValueError(f"heat_scale must be one of {', '.join(LEGENDS)}, got {heat_scale!r}")
    grey = np.asarray(display)
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {grey.shape}")
    if grey.dtype != np.uint8:
        grey = np.clip(grey.astype(np.float32), 0, 255).astype(np.uint8)
    oh, ow = grey.shape
    nh, nw = picture_size(oh, ow, max_side)
    # roi (original pixels) -> picture pixels
    factor = min(1.0, max_side / max(oh, ow)) if source_size is None else max(nh, nw) / max(source_size)
    h: np.ndarray
    if heat is None:
        h = np.zeros((nh, nw), np.float32)
    elif heat_scale == "probability":
        h = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    else:
        h = normalise_heat(heat)
    if h.shape != (nh, nw):  # a map on the original grid (or another one): to the picture's grid
        if h.shape != (oh, ow):
            h = cv2.resize(h, (ow, oh), interpolation=cv2.INTER_LINEAR)
        if (nh, nw) != (oh, ow):
            h = cv2.resize(h, (nw, nh), interpolation=cv2.INTER_AREA)
    if (nh, nw) != (oh, ow):
        grey = cv2.resize(grey, (nw, nh), interpolation=cv2.INTER_AREA)
    img = blend_heatmap(grey, h)
    if roi is not None:
        x0, y0, x1, y1 = (float(v) * factor for v in roi)
        t = max(1, round(min(nh, nw) / 500))
        cv2.rectangle(
            img, (round(x0), round(y0)), (max(round(x0), round(x1) - 1), max(round(y0), round(y1) - 1)), _ROI, t,
            cv2.LINE_AA,
        )
    _draw_caption(img, caption)
    _draw_legend(img, heat_scale)
    return np.ascontiguousarray(img)
