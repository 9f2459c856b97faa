"""The inference engine: load the model folder(s) once, classify batches, explain each result.

``InferenceEngine(model_paths, device="auto", batch_size=8, threads=0)`` loads every model folder once
(an ensemble when there are several; all members must share one preprocessing ``InputSpec``) and keeps
one explainer per model: :class:`~pacs_ai.explain.fracture_map.MapExplainer` for a fracture-map model
(card ``head: fracture_map``: the heat map is the model's own per-region fracture probability) and
:class:`~pacs_ai.explain.gradcam.CamExplainer` for a classifier (format-1 cards: Grad-CAM).
``predict(prepared_images)`` returns one :class:`Prediction` per image:

- probability: the temperature-scaled softmax probability of the positive class (the card's
  ``fractured`` class; for a fracture-map model ``sigmoid(z / T)`` of the pooled map logit ``z``), the
  mean over the members of an ensemble;
- fractured: ``probability >= threshold``; the threshold is the first (primary) model's;
- cam: the heat map on the network input grid, computed from the same forward pass as the
  probability (the model runs once per image), averaged over the members. ``heat_scale`` says what
  its values are: ``"probability"`` (every member a fracture-map model: per-region fracture probability,
  absolute) or ``"relative"`` (Grad-CAM, or a mixed ensemble: scaled to a peak of 1);
- timings: seconds per image for preprocess (taken from ``Prepared.extra["preprocess_s"]`` when the
  caller measured it), forward and cam (batch time divided by the batch size).

Devices: on the CPU, channels-last float32 with ``torch.set_num_threads``; on CUDA, autocast (bfloat16
or float16). Without a CAM the forward runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pacs_ai.errors import ModelError
from pacs_ai.explain.fracture_map import MapExplainer
from pacs_ai.explain.gradcam import CamExplainer, freeze
from pacs_ai.infer.device import autocast_dtype, configure_threads, idle_cores, select_device
from pacs_ai.infer.model_card import ModelCard, load_model_folder
from pacs_ai.infer.preprocess import InputSpec, Prepared

__all__ = ["FRACTURED", "NOT_FRACTURED", "InferenceEngine", "Prediction"]

log = logging.getLogger(__name__)

FRACTURED = "fractured"
NOT_FRACTURED = "not_fractured"


@dataclass(frozen=True)
class Prediction:
    """The engine's answer for one image."""

    probability: float
    """Calibrated P(fracture): temperature-scaled softmax; for an ensemble the mean of the members'."""
    fractured: bool
    """``probability >= threshold``."""
    threshold: float
    label: str
    """``"fractured"`` or ``"not_fractured"``."""
    cam: np.ndarray = field(repr=False, compare=False)
    """Heat map on the network input grid (S, S), float32 in [0, 1]; all zero when none was computed."""
    model_name: str
    model_version: str
    architecture: str
    timings: dict[str, float] = field(compare=False)
    """Seconds per image: preprocess, forward, cam."""
    heat_scale: str = "relative"
    """What ``cam`` values mean: ``"probability"`` (per-region P(fracture) from a fracture-map model) or
    ``"relative"`` (Grad-CAM scaled to a peak of 1; intensities do not compare across images)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the heat map)."""
        return {
            "probability": self.probability,
            "fractured": self.fractured,
            "label": self.label,
            "threshold": self.threshold,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "architecture": self.architecture,
            "timings": dict(self.timings),
            "heat_scale": self.heat_scale,
        }


@dataclass
class _Member:
    path: Path
    model: nn.Module
    card: ModelCard
    explainer: CamExplainer | MapExplainer


class InferenceEngine:
    """Loads the model folder(s) once; thread-safe (one batch at a time)."""

    def __init__(
        self,
        model_paths: Sequence[Path] | Path | str,
        device: str = "auto",
        batch_size: int = 8,
        threads: int = 0,
        single_image_threads: int = 0,
    ) -> None:
        """``threads``: torch's CPU threads (``pacs_ai.infer.device.thread_count``); ``single_image_threads``:
        the most CPU threads for a batch of one image (0: ``threads``). A worker beside the listener keeps
        a core free for receiving during bursts, but a lone image usually arrives when the listener is
        idle: ResNet-50 at 512 px takes 0.34 s on one core and 0.20 s on two of the project's CPU. Only
        cores idle at that moment are added (``idle_cores``): with another process busy on the second
        core the two-thread forward took 1.84 s, its second thread starved (torch's OpenMP threads wait
        for each other at every operator)."""
        paths = [Path(model_paths)] if isinstance(model_paths, (str, Path)) else [Path(p) for p in model_paths]
        if not paths:
            raise ModelError("no model folder given")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = select_device(device)
        self.threads = configure_threads(threads) if self.device.type == "cpu" else torch.get_num_threads()
        self.single_image_threads = int(single_image_threads) if int(single_image_threads) > 0 else self.threads
        self._amp = autocast_dtype(self.device)
        self._lock = threading.Lock()
        self._members: list[_Member] = []
        for path in paths:
            model, card = load_model_folder(path, map_location=self.device)
            if self._members and card.input != self._members[0].card.input:
                first = self._members[0]
                raise ModelError(
                    f"{path}: ensemble members must share one input specification: "
                    f"{card.input.to_dict()} differs from {first.path}'s {first.card.input.to_dict()}"
                )
            model = freeze(model.eval()).to(memory_format=torch.channels_last)
            explainer: CamExplainer | MapExplainer
            if card.head == "fracture_map":
                explainer = MapExplainer(model, card.temperature, autocast_dtype=self._amp)
            else:
                explainer = CamExplainer(model, card.architecture, card.positive_index, autocast_dtype=self._amp)
            self._members.append(_Member(path, model, card, explainer))
        primary = self._members[0].card
        thresholds = {m.card.threshold for m in self._members}
        if len(thresholds) > 1:
            log.warning(
                "ensemble members have different thresholds %s; using the first model's (%s)",
                sorted(thresholds),
                primary.threshold,
            )
        self.threshold = primary.threshold
        self.model_name = "+".join(m.card.name for m in self._members)
        self.model_version = "+".join(m.card.version for m in self._members)
        self.architecture = "+".join(m.card.architecture for m in self._members)
        self.heat_scale = "probability" if all(m.card.head == "fracture_map" for m in self._members) else "relative"

    # -- properties ---------------------------------------------------------------------------------

    @property
    def spec(self) -> InputSpec:
        """The preprocessing every member expects (checked equal at load time)."""
        return self._members[0].card.input

    @property
    def cards(self) -> list[ModelCard]:
        return [m.card for m in self._members]

    def describe(self) -> dict[str, Any]:
        """Flat summary for status pages and metrics labels."""
        return {
            "name": self.model_name,
            "version": self.model_version,
            "architecture": self.architecture,
            "device": str(self.device),
            "threshold": self.threshold,
            "members": len(self._members),
            "input_size": self.spec.size,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "single_image_threads": self.single_image_threads,
            "precision": str(self._amp).removeprefix("torch.") if self._amp else "float32",
            "cam_method": "+".join(m.explainer.method for m in self._members),
            "heat_scale": self.heat_scale,
        }

    # -- inference ----------------------------------------------------------------------------------

    def predict(self, batch: Sequence[Prepared], with_cam: bool = True) -> list[Prediction]:
        """Classify (and explain) ``batch``, processed in chunks of ``batch_size``; order is kept."""
        items = list(batch)
        size = self.spec.size
        for i, p in enumerate(items):
            if tuple(p.tensor.shape) != (3, size, size):
                raise ValueError(f"image {i}: network input has shape {tuple(p.tensor.shape)}, expected (3, {size}, {size})")
        out: list[Prediction] = []
        with self._lock:
            if self.device.type == "cpu":  # process-wide: set for every batch (a shadow engine may differ)
                configure_threads(self._threads_for(len(items)))
            for start in range(0, len(items), self.batch_size):
                out.extend(self._predict_chunk(items[start : start + self.batch_size], with_cam))
        return out

    def _threads_for(self, images: int) -> int:
        """``threads``, or for a single image up to ``single_image_threads`` as far as cores are idle now."""
        if images != 1 or self.single_image_threads <= self.threads:
            return self.threads
        idle = idle_cores()
        return self.threads if idle is None else min(self.single_image_threads, self.threads + idle)

    def _forward_only(self, member: _Member, x: torch.Tensor) -> torch.Tensor:
        try:
            with torch.inference_mode():
                logits: torch.Tensor
                if self._amp is not None:
                    with torch.autocast(device_type=self.device.type, dtype=self._amp):
                        logits = member.model(x)
                else:
                    logits = member.model(x)
                return logits.float().cpu()
        finally:
            member.explainer.release()  # the CAM library's hooks saw this forward too

    def _predict_chunk(self, chunk: list[Prepared], with_cam: bool) -> list[Prediction]:
        n = len(chunk)
        size = self.spec.size
        x = torch.stack([p.tensor for p in chunk]).to(self.device, dtype=torch.float32)
        x = x.contiguous(memory_format=torch.channels_last)
        probs = np.zeros(n, dtype=np.float64)
        cams = np.zeros((n, size, size), dtype=np.float32)
        forward_s = cam_s = 0.0
        for member in self._members:
            if with_cam:
                res = member.explainer(x)
                logits = res.logits
                if res.cams.shape != cams.shape:  # pragma: no cover - the library resizes to the input
                    raise ModelError(f"CAM shape {res.cams.shape} differs from {cams.shape}")
                cams += res.cams
                forward_s += res.forward_s
                cam_s += res.cam_s
            else:
                t0 = time.perf_counter()
                logits = self._forward_only(member, x)
                forward_s += time.perf_counter() - t0
            card = member.card
            p = torch.softmax(logits.double() / card.temperature, dim=1)[:, card.positive_index]
            probs += p.numpy()
        probs /= len(self._members)
        if not np.all(np.isfinite(probs)):
            bad = [i for i in range(n) if not np.isfinite(probs[i])]
            raise ModelError(f"the model produced a non-finite output for image(s) {bad} of the batch")
        if with_cam and len(self._members) > 1 and self.heat_scale == "probability":
            cams /= len(self._members)
        elif with_cam and len(self._members) > 1:
            peak = cams.reshape(n, -1).max(axis=1)
            cams *= np.where(peak > 0, 1.0 / np.maximum(peak, 1e-30), 0.0).astype(np.float32)[:, None, None]
            np.clip(cams, 0.0, 1.0, out=cams)
        out = []
        for i, prepared in enumerate(chunk):
            prob = float(probs[i])
            fractured = prob >= self.threshold
            timings = {
                "preprocess": float(prepared.extra.get("preprocess_s", 0.0)),
                "forward": forward_s / n,
                "cam": cam_s / n,
            }
            out.append(
                Prediction(
                    probability=prob,
                    fractured=fractured,
                    threshold=self.threshold,
                    label=FRACTURED if fractured else NOT_FRACTURED,
                    cam=cams[i].copy(),
                    model_name=self.model_name,
                    model_version=self.model_version,
                    architecture=self.architecture,
                    timings=timings,
                    heat_scale=self.heat_scale,
                )
            )
        return out

    def close(self) -> None:
        """Remove the CAM hooks (the engine cannot explain afterwards)."""
        for m in self._members:
            m.explainer.close()
