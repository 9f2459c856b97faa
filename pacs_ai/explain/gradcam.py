"""Grad-CAM heat maps with pytorch-grad-cam, at about the cost of the forward pass they explain.

One :class:`CamExplainer` per loaded model, created once and reused for every batch:

- the method follows the architecture: ``HiResCAM`` for ``vgg16`` (its dense head makes plain Grad-CAM
  unfaithful), ``GradCAM`` for ``resnet50`` and ``densenet121``; the target is the layer named by
  :func:`cam_target_layers`, and the target class is the card's positive
  class (``ClassifierOutputTarget``);
- **cheap gradients**: the model's parameters are frozen (``requires_grad_(False)``) and a forward hook
  on the target layer, registered before the library's own hooks, hands the rest of the network a fresh
  leaf tensor that requires grad. Autograd therefore records nothing before the target layer and the
  backward pass runs only through the head (pooling + classifier), not through the whole backbone and
  not into the weights. pytorch-grad-cam's default path (full backward with parameter gradients) costs
  about 3.5x the forward on this machine; this path costs about 1.0-1.1x (see ``benchmarks/``);
- **one forward**: the logits returned with the maps come from the very forward the CAM is computed on;
  the caller derives probabilities from them, the model is not run twice;
- **DenseNet**: torchvision's DenseNet applies ``F.relu(..., inplace=True)`` to the output of
  ``features`` (``norm5``, the layer ``cam_target_layers`` names). A hook on ``norm5`` would see that
  tensor overwritten in place (on the CPU the library's saved "activation" silently becomes the
  post-ReLU tensor, on CUDA it is a pre-ReLU copy) and its gradient masked by the ReLU. The explainer
  therefore runs DenseNet through :class:`_DenseNetCamView`, which computes exactly torchvision's
  forward with a non-in-place ``nn.ReLU`` module after ``norm5`` and hooks that module: the map is the
  textbook Grad-CAM of the feature map the classifier actually pools, identical on CPU and GPU (for a
  global-average-pool + linear head it equals the classic CAM, which the tests check);
- **bounded memory**: activations, gradients and the retained graph of the last call are dropped after
  every call, so thousands of images do not grow memory; the library's hooks stay registered for the
  explainer's lifetime (re-creating CAM objects is what leaks);
- maps are min-max scaled per image by the library (so intensities do not compare across images) and
  can be all zero (when every weighted activation is negative): that is returned as a zero map, never
  NaN.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pacs_ai.errors import ModelError

__all__ = ["CAM_METHODS", "CamExplainer", "CamResult", "cam_target_layers", "freeze"]

CAM_METHODS: dict[str, str] = {"resnet50": "GradCAM", "densenet121": "GradCAM", "vgg16": "HiResCAM"}
"""pytorch-grad-cam class used per architecture."""


def cam_target_layers(model: nn.Module, arch: str) -> list[nn.Module]:
    """Layer(s) whose activations Grad-CAM uses.

    - resnet50: ``model.layer4[-1]`` (last bottleneck).
    - densenet121: ``model.features[-1]`` (``norm5``). DenseNet's forward applies ``F.relu(inplace=True)``
      to this output, so a forward hook that keeps the activation must clone it; :class:`CamExplainer`
      hooks a non-in-place ReLU right after it instead (``_DenseNetCamView``).
    - vgg16: the last ReLU of ``features`` before the final max-pool (end of the last conv block);
      use HiResCAM with it (VGG's dense head makes plain Grad-CAM unfaithful). The hooked ReLU's output
      is not modified in place afterwards.
    """
    if arch not in CAM_METHODS:
        raise ModelError(f"unknown architecture {arch!r}; expected one of {', '.join(CAM_METHODS)}")
    if arch == "resnet50":
        return [list(model.get_submodule("layer4").children())[-1]]
    if arch == "densenet121":
        return [list(model.get_submodule("features").children())[-1]]
    feats = list(model.get_submodule("features").children())
    last_pool = max(i for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d))
    for m in reversed(feats[:last_pool]):
        if isinstance(m, (nn.ReLU, nn.Conv2d)):
            return [m]
    raise ModelError("vgg16 features have no conv layer before the last max-pool")


def freeze(model: nn.Module) -> nn.Module:
    """Switch off gradients for every parameter (no parameter gradients are ever needed at inference)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class _DenseNetCamView(nn.Module):
    """torchvision ``DenseNet.forward`` with the final ReLU as a separate, non-in-place module.

    Shares the wrapped model's modules (no copy, same weights, same state); only used for CAMs.
    """

    def __init__(self, densenet: nn.Module) -> None:
        super().__init__()
        self.features = densenet.get_submodule("features")
        self.relu = nn.ReLU(inplace=False)
        self.classifier = densenet.get_submodule("classifier")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.relu(self.features(x)), (1, 1))
        logits: torch.Tensor = self.classifier(torch.flatten(out, 1))
        return logits


@dataclass
class CamResult:
    """Output of one :class:`CamExplainer` call on a batch of N images."""

    logits: torch.Tensor
    """(N, num_classes) float32 on the CPU, from the same forward as the maps."""
    cams: np.ndarray
    """(N, S, S) float32 in [0, 1] on the network input grid."""
    forward_s: float
    """Seconds spent in the forward pass (whole batch)."""
    cam_s: float
    """Seconds spent on the rest: backward through the head and the map computation (whole batch)."""


class CamExplainer:
    """Grad-CAM (or HiResCAM) of one model; create once per loaded model and reuse.

    ``model`` must be in eval mode on its device (as ``load_model_folder`` returns it); its parameters
    are frozen by the constructor. ``target_index`` is the class whose evidence is mapped (the card's
    positive class). ``autocast_dtype`` (CUDA only) runs the forward under ``torch.autocast``.
    """

    def __init__(
        self,
        model: nn.Module,
        architecture: str,
        target_index: int,
        *,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        from pytorch_grad_cam import GradCAM, HiResCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if architecture not in CAM_METHODS:
            raise ValueError(f"no CAM method for architecture {architecture!r}")
        self.architecture = architecture
        self.method = CAM_METHODS[architecture]
        self.target_index = int(target_index)
        self.model = freeze(model)
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype if self.device.type == "cuda" else None
        layers = cam_target_layers(model, architecture)
        if architecture == "densenet121":
            if len(layers) != 1 or layers[0] is not model.get_submodule("features.norm5"):
                raise ValueError("densenet121: expected the CAM target layer to be features[-1] (norm5)")
            self.net: nn.Module = _DenseNetCamView(model).eval()
            layers = [self.net.relu]  # the ReLU the classifier sees, right after norm5
        else:
            self.net = model
        self.target_layers = layers
        self._target = ClassifierOutputTarget(self.target_index)
        self._active = False
        self._t_forward: list[float] = [0.0, 0.0]
        # Order matters: the gradient gate must run before the library's hooks on the same layer, so
        # that the library sees (and hooks the gradient of) the leaf the gate returns.
        self._handles = [layer.register_forward_hook(self._gate) for layer in layers]
        self._handles.append(self.net.register_forward_pre_hook(self._forward_started))
        self._handles.append(self.net.register_forward_hook(self._forward_ended))
        cls = HiResCAM if self.method == "HiResCAM" else GradCAM
        self._cam = cls(model=self.net, target_layers=layers)

    # -- hooks ------------------------------------------------------------------------------------------

    def _gate(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        """Make the target activation the start of the autograd graph (float32, requires grad)."""
        if not self._active or not torch.is_grad_enabled():
            return None
        return output.detach().float().requires_grad_(True)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward_started(self, module: nn.Module, inputs: Any) -> None:
        if self._active:
            self._t_forward[0] = time.perf_counter()

    def _forward_ended(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._active:
            self._sync()
            self._t_forward[1] = time.perf_counter()

    # -- use --------------------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor) -> CamResult:
        """Run the forward with hooks, the backward through the head and the maps for batch ``x``.

        ``x`` is (N, 3, S, S) on the explainer's device (any memory format).
        """
        if x.ndim != 4:
            raise ValueError(f"expected an (N, 3, S, S) batch, got shape {tuple(x.shape)}")
        cam = self._cam
        targets = [self._target] * x.shape[0]
        self._active = True
        t0 = time.perf_counter()
        try:
            with torch.enable_grad():
                if self.autocast_dtype is not None:
                    with torch.autocast(device_type="cuda", dtype=self.autocast_dtype):
                        maps = cam(input_tensor=x, targets=targets)
                else:
                    maps = cam(input_tensor=x, targets=targets)
            logits = cam.outputs.detach().float().cpu()
        finally:
            self._active = False
            self.release()
        total = time.perf_counter() - t0
        started, ended = self._t_forward
        forward_s = max(0.0, min(total, ended - started))
        maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        # The library divides by (max + 1e-7): bring the peak to exactly 1 unless the map is all zero.
        peak = maps.reshape(maps.shape[0], -1).max(axis=1)
        scale = np.where(peak > 0, 1.0 / np.maximum(peak, 1e-30), 0.0).astype(np.float32)
        maps = np.clip(maps * scale[:, None, None], 0.0, 1.0)
        return CamResult(logits=logits, cams=maps, forward_s=forward_s, cam_s=max(0.0, total - forward_s))

    def release(self) -> None:
        """Drop the tensors kept from the last call (activations, gradients, logits and their graph)."""
        aag = self._cam.activations_and_grads
        aag.activations = []
        aag.gradients = []
        self._cam.outputs = None

    def close(self) -> None:
        """Remove every hook (the explainer cannot be used afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cam.activations_and_grads.release()

    def __enter__(self) -> CamExplainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

