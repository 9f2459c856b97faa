"""Tests for pacs_ai.infer.architectures and pacs_ai.infer.model_card (random weights, temp folders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pacs_ai.errors import ModelError
from pacs_ai.explain.gradcam import cam_target_layers
from pacs_ai.infer.architectures import (
    ARCHITECTURES,
    build_model,
    count_parameters,
    layer_groups,
    load_backbone_weights,
)
from pacs_ai.infer.model_card import (
    CARD_FILE,
    PT_FILE,
    WEIGHTS_FILE,
    ModelCard,
    load_model_folder,
    save_model_folder,
)
from pacs_ai.infer.preprocess import InputSpec


@pytest.fixture(scope="module")
def densenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("densenet121").eval()


def card(**kw: object) -> ModelCard:
    base = dict(name="test", architecture="densenet121", version="0.0.1", input=InputSpec(size=64), threshold=0.3, temperature=1.5)
    base.update(kw)
    return ModelCard(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_build_model_two_class_head_and_cam_layer(arch: str) -> None:
    model = build_model(arch).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 2)
    layers = cam_target_layers(model, arch)
    assert len(layers) == 1 and any(layers[0] is m for m in model.modules())
    groups = layer_groups(model, arch)
    assert sum(count_parameters(g) for g in groups) == count_parameters(model)


def test_vgg_cam_layer_is_end_of_last_conv_block() -> None:
    model = build_model("vgg16")
    feats = list(model.features)
    idx = next(i for i, m in enumerate(feats) if m is cam_target_layers(model, "vgg16")[0])
    assert isinstance(feats[idx + 1], torch.nn.MaxPool2d) and idx + 2 == len(feats)


def test_unknown_architecture() -> None:
    with pytest.raises(ModelError, match="unknown architecture"):
        build_model("alexnet")


def test_card_json_round_trip() -> None:
    c = card(metrics={"auc": 0.9}, training={"epochs": 3})
    again = ModelCard.from_json(c.to_json())
    assert again == c
    assert again.positive_index == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("architecture", "alexnet"), ("threshold", 1.5), ("temperature", 0.0), ("class_names", ("a",)), ("name", "")],
)
def test_card_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ModelError, match=field):
        card(**{field: value})


def test_card_from_json_rejects_unknown_and_bad_input() -> None:
    d = card().to_dict()
    with pytest.raises(ModelError, match="colour"):
        ModelCard.from_dict({**d, "colour": "red"})
    with pytest.raises(ModelError, match="input.size"):
        ModelCard.from_dict({**d, "input": {**d["input"], "size": 1}})


def test_save_and_load_folder_fp32_and_fp16(tmp_path: Path, densenet: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = densenet(x)
    save_model_folder(tmp_path / "a", densenet, card())
    model, c = load_model_folder(tmp_path / "a")
    assert c == card() or c.name == "test"
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    save_model_folder(tmp_path / "b", densenet, card(), half=True)
    size32 = (tmp_path / "a" / WEIGHTS_FILE).stat().st_size
    size16 = (tmp_path / "b" / WEIGHTS_FILE).stat().st_size
    assert size16 < 0.55 * size32
    model16, _ = load_model_folder(tmp_path / "b")
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model16(x), ref, atol=5e-2, rtol=5e-2)


def test_load_pt_fallback(tmp_path: Path, densenet: torch.nn.Module) -> None:
    tmp_path.joinpath(CARD_FILE).write_text(card().to_json())
    torch.save(densenet.state_dict(), tmp_path / PT_FILE)
    model, _ = load_model_folder(tmp_path)
    assert isinstance(model, torch.nn.Module)


def test_load_refuses_mismatched_weights(tmp_path: Path, densenet: torch.nn.Module) -> None:
    save_model_folder(tmp_path, densenet, card())
    # card says resnet50 but weights are a densenet: missing and unexpected keys are named
    data = json.loads((tmp_path / CARD_FILE).read_text())
    data["architecture"] = "resnet50"
    (tmp_path / CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelError, match="missing keys.*unexpected keys"):
        load_model_folder(tmp_path)
    # three classes in the card: the head's shape does not match
    data["architecture"] = "densenet121"
    data["class_names"] = ["a", "b", "c"]
    (tmp_path / CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"shape mismatches: classifier\.weight"):
        load_model_folder(tmp_path)


def test_load_missing_folder_or_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_model_folder(tmp_path / "nope")
    with pytest.raises(ModelError, match="model.json"):
        load_model_folder(tmp_path)
    tmp_path.joinpath(CARD_FILE).write_text(card().to_json())
    with pytest.raises(ModelError, match="no weights"):
        load_model_folder(tmp_path)


def test_load_backbone_weights_skips_head(tmp_path: Path, densenet: torch.nn.Module) -> None:
    # an "ImageNet" file: 1000-class head, old-style DenseNet keys (norm.1 instead of norm1)
    state = {k: v.clone() for k, v in densenet.state_dict().items() if not k.startswith("classifier.")}
    state = {k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v for k, v in state.items()}
    state["classifier.weight"] = torch.zeros(1000, 1024)
    state["classifier.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "imagenet.pth")
    fresh = build_model("densenet121")
    skipped = load_backbone_weights(fresh, "densenet121", tmp_path / "imagenet.pth")
    assert skipped == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(fresh.features.conv0.weight, densenet.features.conv0.weight)
    with pytest.raises(ModelError, match="not a resnet50 backbone"):
        load_backbone_weights(build_model("resnet50"), "resnet50", tmp_path / "imagenet.pth")


REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"


@pytest.mark.skipif(not (REFERENCE / CARD_FILE).is_file(), reason="no bundled reference model yet")
def test_bundled_reference_model_loads_and_is_small() -> None:
    size_mb = sum(f.stat().st_size for f in REFERENCE.iterdir() if f.is_file()) / 1e6
    assert size_mb <= 50
    model, c = load_model_folder(REFERENCE)
    assert c.metrics.get("validation", {}).get("ci95", {}).get("auc") is not None
    with torch.no_grad():
        out = model(torch.zeros(1, 3, c.input.size, c.input.size))
    assert out.shape == (1, len(c.class_names))
