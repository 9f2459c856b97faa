"""Running a model over images: logits for cached letterboxed arrays or for files (DICOM / JPEG / PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pacs_ai.infer.preprocess import InputSpec, letterbox, normalise, read_gray


@torch.inference_mode()
def predict_letterboxed(
    model: nn.Module,
    images: np.ndarray,
    spec: InputSpec,
    batch_size: int = 32,
    device: torch.device | None = None,
    progress: str | None = None,
) -> np.ndarray:
    """(N, C) float32 logits for letterboxed uint8 images (N, S, S) (see ``preprocess.letterbox``)."""
    device = device or next(model.parameters()).device
    model.eval()
    out: list[np.ndarray] = []
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    for i in starts:
        x = normalise(np.ascontiguousarray(images[i : i + batch_size]), spec).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(x)
        out.append(logits.float().cpu().numpy())
    if not out:
        return np.zeros((0, 2), dtype=np.float32)
    return np.concatenate(out)


def letterbox_files(paths: Sequence[Path], spec: InputSpec, progress: bool = True) -> np.ndarray:
    """Read and letterbox files (DICOM or images) -> uint8 (N, S, S); uses the serving preprocessing."""
    it = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="read", unit="img", leave=False)
    return np.stack([letterbox(read_gray(Path(p)), spec)[0] for p in it]) if len(paths) else np.zeros((0, spec.size, spec.size), np.uint8)
