"""The three supported backbones (torchvision), with a new classification head or a fracture-map head.

Two heads (the model card's ``head``):

- ``classifier`` (format 1): torchvision's own model with its last linear layer replaced by a
  ``num_classes`` layer; explained with Grad-CAM.
- ``fracture_map`` (format 2): :class:`FractureMapNet`, the backbone's convolutional trunk followed by a
  1x1 convolution that gives one fracture logit per cell of the last feature map (stride 32 for
  resnet50 and densenet121, 16 for vgg16), and an image logit from a log-sum-exp pooling of that map
  (multiple-instance learning: the image is fractured when some cell is). The map is the explanation.

``build_model`` never downloads anything (``weights=None``); ImageNet weights come from a local file via
``load_backbone_weights``. ``layer_groups`` orders the backbone from stem to head so training can freeze the early layers. (The layer Grad-CAM hooks is
named by ``pacs_ai.explain.gradcam.cam_target_layers``.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from pacs_ai.errors import ModelError

__all__ = [
    "ARCHITECTURES",
    "HEADS",
    "FractureMapNet",
    "build_fracture_map_model",
    "build_model",
    "count_parameters",
    "head_prefix",
    "layer_groups",
    "load_backbone_weights",
    "state_dict_mismatch",
]

ARCHITECTURES: tuple[str, ...] = ("resnet50", "vgg16", "densenet121")

HEADS: tuple[str, ...] = ("classifier", "fracture_map")

_HEAD_PREFIX = {"resnet50": "fc.", "vgg16": "classifier.6.", "densenet121": "classifier."}


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")


def _sequential(model: nn.Module, name: str) -> nn.Sequential:
    """``model.<name>``, an ``nn.Sequential`` in torchvision's resnet50/vgg16/densenet121 (ModelError if not)."""
    sub = model.get_submodule(name)
    if not isinstance(sub, nn.Sequential):
        raise ModelError(f"{type(model).__name__}.{name} is a {type(sub).__name__}, expected nn.Sequential")
    return sub


def head_prefix(arch: str) -> str:
    """State-dict key prefix of the classification head that ``build_model`` replaces."""
    _check_arch(arch)
    return _HEAD_PREFIX[arch]


def build_model(arch: str, num_classes: int = 2, head: str = "classifier") -> nn.Module:
    """Build ``arch`` with random weights: a ``num_classes`` linear head, or (``head="fracture_map"``)
    a :class:`FractureMapNet` (two-logit output ``[0, z]``, so ``num_classes`` must be 2)."""
    import torchvision.models as tvm

    _check_arch(arch)
    if head not in HEADS:
        raise ModelError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    if head == "fracture_map":
        if num_classes != 2:
            raise ModelError(f"a fracture_map model has 2 classes, got {num_classes}")
        return build_fracture_map_model(arch)
    if num_classes < 2:
        raise ModelError(f"num_classes must be at least 2, got {num_classes}")
    model: nn.Module
    if arch == "resnet50":
        resnet = tvm.resnet50(weights=None)
        resnet.fc = nn.Linear(resnet.fc.in_features, num_classes)
        model = resnet
    elif arch == "vgg16":
        vgg = tvm.vgg16(weights=None)
        last = vgg.classifier[6]
        assert isinstance(last, nn.Linear)
        vgg.classifier[6] = nn.Linear(last.in_features, num_classes)
        model = vgg
    else:
        densenet = tvm.densenet121(weights=None)
        densenet.classifier = nn.Linear(densenet.classifier.in_features, num_classes)
        model = densenet
    return model


class FractureMapNet(nn.Module):
    """Backbone trunk + 1x1 convolution -> per-cell fracture logits, log-sum-exp pooled to an image logit.

    ``forward(x)`` with x (N, 3, S, S) returns (N, 2) logits ``[0, z]`` where ``z`` is the pooled image
    logit, so ``softmax(logits / T)[:, 1] == sigmoid(z / T)`` and every two-class tool (temperature
    scaling, thresholds, metrics) applies unchanged. ``forward_map(x)`` returns ``(logits, cell_logits)``
    with cell_logits (N, 1, S / stride, S / stride). ``pool_r`` (a buffer, saved with the weights) is
    the log-sum-exp sharpness: ``z = log(mean(exp(r * s))) / r`` lies between the mean (r -> 0) and the
    maximum (r -> inf) of the cell logits ``s``.

    ``trunk`` is the torchvision model under its own parameter names (its classifier replaced by
    ``nn.Identity``), so ImageNet weights load with :func:`load_backbone_weights` applied to ``trunk``.
    """

    pool_r: torch.Tensor  # the buffer registered in __init__

    def __init__(self, arch: str, trunk: nn.Module, channels: int, stride: int, pool_r: float = 5.0) -> None:
        super().__init__()
        self.arch = arch
        self.trunk = trunk
        self.stride = stride
        self._vgg_end = 0
        if arch == "vgg16":
            feats = list(_sequential(trunk, "features"))
            self._vgg_end = max(i for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d))
        self.map_head = nn.Conv2d(channels, 1, kernel_size=1)
        nn.init.normal_(self.map_head.weight, std=0.01)
        if self.map_head.bias is not None:  # always: Conv2d's default bias=True
            nn.init.constant_(self.map_head.bias, -2.0)
        self.register_buffer("pool_r", torch.tensor(float(pool_r)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, C, S / stride, S / stride), after its ReLU."""
        t = self.trunk.get_submodule
        out: torch.Tensor
        if self.arch == "densenet121":
            return torch.relu(t("features")(x))
        if self.arch == "resnet50":
            x = t("maxpool")(t("relu")(t("bn1")(t("conv1")(x))))
            out = t("layer4")(t("layer3")(t("layer2")(t("layer1")(x))))
            return out
        out = _sequential(self.trunk, "features")[: self._vgg_end](x)
        return out  # the last ReLU before VGG's final max-pool: stride 16

    def pool(self, cell_logits: torch.Tensor) -> torch.Tensor:
        """(N, 1, h, w) cell logits -> (N,) image logits by log-sum-exp pooling."""
        r = self.pool_r.to(cell_logits.dtype)
        flat = cell_logits.flatten(1) * r
        return (torch.logsumexp(flat, dim=1) - math.log(flat.shape[1])) / r

    def forward_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) -> ((N, 2) logits ``[0, z]``, (N, 1, h, w) cell logits), one forward."""
        cells = self.map_head(self.features(x))
        z = self.pool(cells.float())
        logits = torch.stack([torch.zeros_like(z), z], dim=1)
        return logits, cells

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x)[0]


def build_fracture_map_model(arch: str, pool_r: float = 5.0) -> FractureMapNet:
    """A :class:`FractureMapNet` on a randomly initialised torchvision ``arch`` (classifier dropped)."""
    import torchvision.models as tvm

    _check_arch(arch)
    if arch == "resnet50":
        trunk = tvm.resnet50(weights=None)
        trunk.fc = nn.Identity()
        return FractureMapNet(arch, trunk, 2048, 32, pool_r)
    if arch == "densenet121":
        trunk = tvm.densenet121(weights=None)
        trunk.classifier = nn.Identity()
        return FractureMapNet(arch, trunk, 1024, 32, pool_r)
    trunk = tvm.vgg16(weights=None)
    trunk.classifier = nn.Identity()
    trunk.avgpool = nn.Identity()
    return FractureMapNet(arch, trunk, 512, 16, pool_r)


_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"backbone weights file not found: {path}")
    state: object  # a state dict, or a checkpoint that holds one under a key
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot read backbone weights {path}: {exc}") from exc
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def state_dict_mismatch(
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    *,
    may_miss: Callable[[str], bool] = lambda key: False,
    show: int = 5,
) -> str | None:
    """How ``state`` (read from a file) fails to fit a model whose state dict is ``own``: the keys it
    lacks (except those ``may_miss`` accepts), the keys the model does not have, and the tensors whose
    shapes differ, each counted with the first ``show`` named; None when it fits."""
    missing = sorted(k for k in own if k not in state and not may_miss(k))
    unexpected = sorted(k for k in state if k not in own)
    shapes = [
        f"{k} (model {tuple(v.shape)}, file {tuple(state[k].shape)})"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for found, what, sep in ((missing, "missing keys", ", "), (unexpected, "unexpected keys", ", "), (shapes, "shape mismatches", "; ")):
        if found:
            parts.append(f"{len(found)} {what}: {sep.join(found[:show])}{sep + '...' if len(found) > show else ''}")
    return "; ".join(parts) or None


def load_backbone_weights(model: nn.Module, arch: str, path: Path) -> list[str]:
    """Load a local (ImageNet) state dict into ``model``, skipping the classification head.

    Accepts torchvision's files (including DenseNet's old ``norm.1`` key style), ``.pth``/``.pt`` or
    ``.safetensors``. Every backbone tensor must be present with the right shape, else ``ModelError``.
    Returns the skipped keys (the old head).
    """
    _check_arch(arch)
    state = _read_state_dict(Path(path))
    if arch == "densenet121":
        state = {_DENSENET_OLD_KEY.sub(lambda m: m.group(1) + m.group(2), k): v for k, v in state.items()}
    prefix = _HEAD_PREFIX[arch]
    skipped = sorted(k for k in state if k.startswith(prefix))
    backbone = {k: v for k, v in state.items() if not k.startswith(prefix)}
    own = model.state_dict()
    # old torchvision files have no BatchNorm num_batches_tracked: those may be missing
    problem = state_dict_mismatch(
        {k: v for k, v in own.items() if not k.startswith(prefix)},
        backbone,
        may_miss=lambda k: k.endswith("num_batches_tracked"),
    )
    if problem:
        raise ModelError(f"{path} is not a {arch} backbone: {problem}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in backbone.items()}, strict=False)
    return skipped


def layer_groups(model: nn.Module, arch: str) -> list[nn.Module]:
    """The model's parts ordered from input (stem) to output (head); the last one is the head.

    Training freezes a prefix of this list for transfer learning ("freeze early layers").
    """
    _check_arch(arch)
    sub = model.get_submodule
    if arch == "resnet50":
        stem = nn.ModuleList([sub("conv1"), sub("bn1")])
        return [stem, sub("layer1"), sub("layer2"), sub("layer3"), sub("layer4"), sub("fc")]
    if arch == "densenet121":
        f = _sequential(model, "features").get_submodule
        stem = nn.ModuleList([f("conv0"), f("norm0")])
        blocks = [
            nn.ModuleList([f("denseblock1"), f("transition1")]),
            nn.ModuleList([f("denseblock2"), f("transition2")]),
            nn.ModuleList([f("denseblock3"), f("transition3")]),
            nn.ModuleList([f("denseblock4"), f("norm5")]),
        ]
        return [stem, *blocks, sub("classifier")]
    feats = list(_sequential(model, "features"))
    pools = [i for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
    groups: list[nn.Module] = []
    start = 0
    for p in pools:
        groups.append(nn.ModuleList(feats[start : p + 1]))
        start = p + 1
    groups.append(sub("classifier"))
    return groups


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
