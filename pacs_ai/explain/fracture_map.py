"""Heat maps from a fracture-map model's own per-cell logits (no gradients, no hooks).

A :class:`~pacs_ai.infer.architectures.FractureMapNet` gives, in one forward, the image logits and a
grid of per-cell fracture logits (N, 1, h, w) on its last feature map. The heat map is the per-cell
fracture probability ``sigmoid(cell_logit / temperature)`` (the card's temperature, fitted on the image
logits), upsampled bilinearly to the network input grid (S, S). Its values are absolute (0..1, comparable
across images): a normal image gives a cold map, not a min-max stretched one.

Used by the inference engine (daemon, ``pacs-ai classify``) and by the training package (validation,
``evaluate``), so the heat map that is scored is the heat map that is shipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MapExplainer", "MapResult", "cells_to_heat"]


def cells_to_heat(cell_logits: torch.Tensor, size: int, temperature: float = 1.0) -> torch.Tensor:
    """(N, 1, h, w) or (N, h, w) cell logits -> (N, size, size) float32 probabilities in [0, 1].

    ``sigmoid(logit / temperature)`` per cell, then bilinear upsampling (``align_corners=False``, so
    cell centres land at the centres of the input patches they summarise).
    """
    c = cell_logits.float()
    if c.ndim == 3:
        c = c.unsqueeze(1)
    if c.ndim != 4 or c.shape[1] != 1:
        raise ValueError(f"expected (N, 1, h, w) cell logits, got shape {tuple(cell_logits.shape)}")
    p = torch.sigmoid(c / float(temperature))
    return F.interpolate(p, size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp_(0.0, 1.0)


@dataclass
class MapResult:
    """Output of one :class:`MapExplainer` call on a batch of N images (same fields as ``CamResult``)."""

    logits: torch.Tensor
    """(N, 2) float32 on the CPU: ``[0, z]`` with ``z`` the pooled image logit."""
    cams: np.ndarray
    """(N, S, S) float32 in [0, 1]: per-region fracture probability on the network input grid."""
    forward_s: float
    cam_s: float


class MapExplainer:
    """The fracture-map explainer of one loaded model: one forward gives the logits and the heat map.

    ``method`` is ``"fracture map"``; ``release``/``close`` exist for interface parity with
    :class:`~pacs_ai.explain.gradcam.CamExplainer` and hold nothing.
    """

    method = "fracture map"

    def __init__(self, model: nn.Module, temperature: float = 1.0, *, autocast_dtype: torch.dtype | None = None) -> None:
        forward_map = getattr(model, "forward_map", None)
        if not callable(forward_map):
            raise ValueError("MapExplainer needs a fracture-map model (forward_map)")
        self.model = model
        # (N, 3, S, S) -> ((N, 2) logits, (N, 1, h, w) cell logits): FractureMapNet.forward_map
        self._forward_map: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = forward_map
        self.temperature = float(temperature)
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype if self.device.type == "cuda" else None

    def __call__(self, x: torch.Tensor) -> MapResult:
        """``x`` (N, 3, S, S) on the model's device -> logits and (N, S, S) heat maps."""
        if x.ndim != 4:
            raise ValueError(f"expected an (N, 3, S, S) batch, got shape {tuple(x.shape)}")
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(device_type="cuda", dtype=self.autocast_dtype):
                    logits, cells = self._forward_map(x)
            else:
                logits, cells = self._forward_map(x)
            logits = logits.float().cpu()
            t1 = time.perf_counter()
            heat = cells_to_heat(cells, int(x.shape[-1]), self.temperature).cpu().numpy()
        t2 = time.perf_counter()
        heat = np.nan_to_num(heat.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
        return MapResult(logits=logits, cams=heat, forward_s=t1 - t0, cam_s=t2 - t1)

    def release(self) -> None:
        """Nothing is kept between calls."""

    def close(self) -> None:
        """Nothing to remove."""

    def __enter__(self) -> MapExplainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
