"""Export: a trained model (+ validation logits) -> the model folder the daemon loads.

Calibration lives here too because every export writes a calibrated card: temperature fitted on the
validation NLL, threshold chosen on validation for a target sensitivity, validation metrics with
bootstrap 95% intervals.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pacs_ai import __version__
from pacs_ai.infer.model_card import ModelCard, save_model_folder
from pacs_ai.infer.preprocess import InputSpec
from training.data import CLASS_NAMES
from training.metrics import fit_temperature, nll, softmax_positive, summarize, threshold_for_sensitivity


def calibration(logits: np.ndarray, y: np.ndarray, target_sensitivity: float = 0.90, n_boot: int = 1000) -> dict[str, Any]:
    """Temperature, threshold and validation metrics (with 95% intervals) from validation logits."""
    t = fit_temperature(logits, y)
    prob = softmax_positive(logits, t)
    thr = threshold_for_sensitivity(y, prob, target_sensitivity)
    return {
        "temperature": t,
        "threshold": thr,
        "target_sensitivity": target_sensitivity,
        "nll_before": nll(logits, y, 1.0),
        "nll_after": nll(logits, y, t),
        "validation": summarize(y, prob, thr, n_boot=n_boot),
    }


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}; torch {torch.__version__}"


def export_model(
    out_dir: Path,
    model: nn.Module,
    arch: str,
    spec: InputSpec,
    val_logits: np.ndarray,
    val_y: np.ndarray,
    *,
    name: str,
    version: str,
    training: dict[str, Any],
    target_sensitivity: float = 0.90,
    half: bool = False,
    description: str = "",
    n_boot: int = 1000,
    head: str = "classifier",
    extra_metrics: dict[str, Any] | None = None,
) -> ModelCard:
    """Calibrate on the validation logits and write ``out_dir`` (model.json + model.safetensors).

    ``extra_metrics`` (e.g. the pointing game) are merged into ``metrics["validation"]``.
    """
    cal = calibration(val_logits, val_y, target_sensitivity, n_boot=n_boot)
    if extra_metrics:
        cal["validation"] = {**cal["validation"], **extra_metrics}
    card = ModelCard(
        name=name,
        architecture=arch,
        head=head,
        version=version,
        input=spec,
        class_names=CLASS_NAMES,
        threshold=cal["threshold"],
        temperature=cal["temperature"],
        training={**training, "pacs_ai_version": __version__},
        metrics={
            "validation": cal["validation"],
            "calibration": {
                "method": "temperature scaling on validation NLL; threshold for target sensitivity on validation",
                "target_sensitivity": target_sensitivity,
                "nll_before": cal["nll_before"],
                "nll_after": cal["nll_after"],
            },
            "note": "validation metrics are measured on the split used for model selection and calibration "
            "(optimistic); judge the model on an independent test set",
        },
        description=description,
    )
    save_model_folder(out_dir, model, card, half=half)
    return card
