"""Tiny random-weight model folders for tests (no downloads, no training).

``make_model_folder(folder, arch)`` writes a valid model folder (``model.json`` + ``model.safetensors``)
for any supported architecture at a small input size (64 px by default). The head is rescaled so that
the fracture logit margin is of order one on image-like inputs: probabilities then move with the input
instead of saturating at 0 or 1, which keeps equality tests (same probability for the same pixels)
meaningful.

``model_folder(arch, ...)`` returns a cached folder (built once per test process under a private temp
folder, removed at exit): use it when a test only reads the folder. VGG-16 keeps its full 25088x4096
classifier whatever the input size (about 270 MB on disk in float16, a few seconds to build and load),
so tests should use it sparingly.

Usage::

    from support.model_factory import model_folder
    folder = model_folder("densenet121")             # 64 px, seed 0
    engine = InferenceEngine([folder], device="cpu")
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pacs_ai.infer.architectures import build_model
from pacs_ai.infer.model_card import ModelCard, save_model_folder
from pacs_ai.infer.preprocess import InputSpec, normalise

__all__ = [
    "TEST_SIZE",
    "calibration_batch",
    "head_linear",
    "make_map_model",
    "make_map_model_folder",
    "make_model",
    "make_model_folder",
    "model_folder",
]

TEST_SIZE = 64


def head_linear(model: nn.Module, arch: str) -> nn.Linear:
    """The final ``nn.Linear`` (the two-class head) of a model built by ``build_model``."""
    head = {"resnet50": lambda: model.fc, "densenet121": lambda: model.classifier, "vgg16": lambda: model.classifier[6]}[arch]()  # type: ignore[index]
    assert isinstance(head, nn.Linear)
    return head


def calibration_batch(spec: InputSpec, n: int = 8, seed: int = 1234) -> torch.Tensor:
    """``n`` image-like network inputs: smooth random grey images (blobs and ramps), normalised with ``spec``."""
    import cv2

    rng = np.random.default_rng(seed)
    s = spec.size
    imgs = []
    for i in range(n):
        coarse = rng.random((4 + i, 4 + i)).astype(np.float32)
        img = cv2.resize(coarse, (s, s), interpolation=cv2.INTER_CUBIC)
        ramp = np.linspace(0.0, 1.0, s, dtype=np.float32)[None, :] * rng.random()
        img = np.clip(0.6 * img + 0.4 * ramp, 0.0, 1.0)
        imgs.append((img * 255.0).astype(np.uint8))
    return normalise(np.stack(imgs), spec)


def make_model(arch: str, spec: InputSpec, *, seed: int = 0, num_classes: int = 2) -> nn.Module:
    """A random-weight ``arch`` whose head gives a margin (last logit - first) of mean 0, std 1 on image-like inputs."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes).eval()
    head = head_linear(model, arch)
    feats: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, inp: feats.append(inp[0].detach()))
    try:
        with torch.no_grad():
            model(calibration_batch(spec))
    finally:
        handle.remove()
    f = feats[0].double()
    with torch.no_grad():
        w = head.weight.double()
        margin = f @ (w[-1] - w[0])
        std = float(margin.std())
        k = 1.0 / std if std > 1e-12 else 1.0
        head.weight.mul_(k)
        head.bias.zero_()
        head.bias[-1] = -k * float(margin.mean())
    return model


def make_map_model(arch: str, spec: InputSpec, *, seed: int = 0) -> nn.Module:
    """A random-weight fracture-map ``arch`` whose cell logits have mean -1, std 1 on image-like inputs."""
    torch.manual_seed(seed)
    model = build_model(arch, 2, head="fracture_map").eval()
    with torch.no_grad():
        feats = model.features(calibration_batch(spec)).double()  # type: ignore[operator]
        w = model.map_head.weight.double()[0, :, 0, 0]  # type: ignore[union-attr]
        cells = torch.einsum("nchw,c->nhw", feats, w)
        std = float(cells.std())
        k = 1.0 / std if std > 1e-12 else 1.0
        model.map_head.weight.mul_(k)  # type: ignore[union-attr]
        model.map_head.bias.fill_(-1.0 - k * float(cells.mean()))  # type: ignore[union-attr]
    return model


def make_map_model_folder(
    folder: str | Path,
    arch: str = "densenet121",
    *,
    size: int = TEST_SIZE,
    seed: int = 0,
    threshold: float = 0.5,
    temperature: float = 1.0,
    half: bool = True,
    name: str | None = None,
) -> Path:
    """Write a random-weight fracture-map model folder (card ``head: fracture_map``); returns the folder."""
    spec = InputSpec(size=size)
    card = ModelCard(
        name=name or f"test-map-{arch}", architecture=arch, head="fracture_map", version="2.0.0-test", input=spec,
        threshold=threshold, temperature=temperature, description="random weights, for tests only",
    )
    return save_model_folder(folder, make_map_model(arch, spec, seed=seed), card, half=half)


def make_model_folder(
    folder: str | Path,
    arch: str = "resnet50",
    *,
    size: int = TEST_SIZE,
    seed: int = 0,
    name: str | None = None,
    version: str = "0.0.1-test",
    threshold: float = 0.5,
    temperature: float = 1.0,
    clahe: bool = True,
    class_names: tuple[str, ...] = ("not_fractured", "fractured"),
    half: bool = True,
    **card_fields: Any,
) -> Path:
    """Write a random-weight model folder for ``arch`` at ``size`` px into ``folder``; returns the folder."""
    spec = InputSpec(size=size, clahe=clahe)
    model = make_model(arch, spec, seed=seed, num_classes=len(class_names))
    card = ModelCard(
        name=name or f"test-{arch}",
        architecture=arch,
        version=version,
        input=spec,
        class_names=class_names,
        threshold=threshold,
        temperature=temperature,
        description="random weights, for tests only",
        **card_fields,
    )
    return save_model_folder(folder, model, card, half=half)


_CACHE: dict[tuple[Any, ...], Path] = {}
_CACHE_LOCK = threading.Lock()
_ROOT: Path | None = None


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="pacs-ai-test-models-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def model_folder(arch: str = "resnet50", **kwargs: Any) -> Path:
    """A cached :func:`make_model_folder` result (same arguments -> same folder). Treat it as read-only."""
    key = (arch, *sorted((k, repr(v)) for k, v in kwargs.items()))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = make_model_folder(_root() / f"m{len(_CACHE)}-{arch}", arch, **kwargs)
        return _CACHE[key]
