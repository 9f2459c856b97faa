"""Fracture-map models (model format 2): card, loading, engine output, heat map and legend.

Expected values come from independent computations: the pooled probability from numpy's log-sum-exp of
the model's cell logits, the heat map from OpenCV's bilinear resize of ``sigmoid(cell / T)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pacs_ai.errors import ModelError
from pacs_ai.infer.architectures import ARCHITECTURES, FractureMapNet, build_model
from pacs_ai.infer.engine import InferenceEngine
from pacs_ai.infer.model_card import CARD_FILE, ModelCard, load_card, load_model_folder
from pacs_ai.infer.preprocess import InputSpec, prepare
from pacs_ai.write.overlay import Caption, render_result_image
from support.model_factory import calibration_batch, make_map_model_folder, make_model_folder

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch,stride", [("resnet50", 32), ("densenet121", 32), ("vgg16", 16)])
def test_map_model_shapes_and_pooling_between_mean_and_max(arch: str, stride: int) -> None:
    model = build_model(arch, 2, head="fracture_map").eval()
    assert isinstance(model, FractureMapNet)
    with torch.no_grad():
        model.map_head.weight.normal_(0, 0.05)
        logits, cells = model.forward_map(calibration_batch(InputSpec(size=64), n=2))
    assert logits.shape == (2, 2) and cells.shape == (2, 1, 64 // stride, 64 // stride)
    assert torch.all(logits[:, 0] == 0)
    flat = cells.flatten(1)
    z = logits[:, 1]
    assert torch.all(z >= flat.mean(1) - 1e-5) and torch.all(z <= flat.max(1).values + 1e-5)


def test_card_head_round_trip_and_format_1_cards_unchanged() -> None:
    card = ModelCard(name="m", architecture="densenet121", version="2", head="fracture_map")
    again = ModelCard.from_json(card.to_json())
    assert again.head == "fracture_map"
    old = ModelCard(name="m", architecture="densenet121", version="1")
    assert "head" not in json.loads(old.to_json())
    assert ModelCard.from_json(old.to_json()).head == "classifier"
    with pytest.raises(ModelError, match="head"):
        ModelCard(name="m", architecture="densenet121", version="1", head="boxes")
    with pytest.raises(ModelError, match="class_names"):
        ModelCard(name="m", architecture="densenet121", version="1", head="fracture_map", class_names=("a", "b", "c"))


def test_classifier_weights_under_a_map_card_are_refused(tmp_path: Path) -> None:
    folder = make_map_model_folder(tmp_path / "m", "densenet121")
    card = load_card(folder)
    card.head = "classifier"
    (folder / CARD_FILE).write_text(card.to_json())
    with pytest.raises(ModelError, match="classifier head"):
        load_model_folder(folder)


def _expected(model: torch.nn.Module, x: torch.Tensor, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        feats = model.features(x)
        cells = model.map_head(feats)[:, 0].double().numpy()
    r = float(model.pool_r)
    flat = cells.reshape(len(cells), -1) * r
    top = flat.max(axis=1, keepdims=True)
    z = (top[:, 0] + np.log(np.exp(flat - top).mean(axis=1))) / r
    prob = 1.0 / (1.0 + np.exp(-z / temperature))
    size = x.shape[-1]
    heat = np.stack([cv2.resize((1.0 / (1.0 + np.exp(-c / temperature))).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) for c in cells])
    return prob, heat


@pytest.mark.parametrize("arch", ["densenet121", "resnet50"])
def test_engine_probability_and_heat_map_come_from_the_models_own_map(tmp_path: Path, arch: str) -> None:
    folder = make_map_model_folder(tmp_path / "m", arch, seed=3, temperature=1.7, threshold=0.3)
    engine = InferenceEngine([folder], device="cpu", threads=1, batch_size=2)
    x = calibration_batch(engine.spec, n=3, seed=9)
    grays = [(t[0].numpy() * engine.spec.std[0] + engine.spec.mean[0]).clip(0, 1) for t in x]
    prepared = [prepare(np.float32(g), engine.spec) for g in grays]
    preds = engine.predict(prepared)
    plain = engine.predict(prepared, with_cam=False)
    model, _ = load_model_folder(folder)
    prob, heat = _expected(model, torch.stack([p.tensor for p in prepared]), 1.7)
    for i, pred in enumerate(preds):
        assert pred.probability == pytest.approx(prob[i], abs=1e-5)
        assert plain[i].probability == pytest.approx(prob[i], abs=1e-5)
        assert pred.fractured == (prob[i] >= 0.3)
        assert pred.heat_scale == "probability"
        assert pred.cam.shape == (64, 64)
        np.testing.assert_allclose(pred.cam, heat[i], atol=1e-4)
    info = engine.describe()
    assert info["cam_method"] == "fracture map" and info["heat_scale"] == "probability"
    assert json.loads(json.dumps(preds[0].to_dict()))["heat_scale"] == "probability"


def test_format_1_classifier_folders_still_load_and_explain_with_gradcam(tmp_path: Path) -> None:
    # the bundled model was a format-1 classifier up to 2.x; such folders (no "head" in the card) still serve
    folder = make_model_folder(tmp_path / "v1", "densenet121", seed=3)
    assert "head" not in json.loads((folder / CARD_FILE).read_text())
    card = load_card(folder)
    assert card.head == "classifier"
    engine = InferenceEngine([folder], device="cpu", threads=1)
    x = calibration_batch(engine.spec, n=1)
    gray = (x[0, 0].numpy() * engine.spec.std[0] + engine.spec.mean[0]).clip(0, 1)
    pred = engine.predict([prepare(np.float32(gray), engine.spec)])[0]
    assert pred.heat_scale == "relative" and engine.describe()["cam_method"] == "GradCAM"
    assert 0.0 <= pred.probability <= 1.0 and pred.cam.max() in (0.0, pytest.approx(1.0))


def test_bundled_reference_model_is_a_fracture_map_model_at_512_px() -> None:
    card = load_card(REFERENCE)
    assert card.head == "fracture_map" and card.input.size == 512 and card.version.split(".")[0] == "3"
    assert card.intended_use.get("body_parts") and card.training["n_val"] == 643


def test_probability_heat_is_shown_as_is_and_relative_heat_is_stretched() -> None:
    grey = np.full((300, 400), 100, np.uint8)
    cold = np.full((300, 400), 0.1, np.float32)
    cap = Caption(False, 0.02, 0.5, "m 2")
    shown = render_result_image(grey, cold, cap, heat_scale="probability")
    stretched = render_result_image(grey, cold, cap, heat_scale="relative")
    mid = (slice(150, 200), slice(150, 250))  # away from caption and legend
    assert np.all(shown[mid] == 100), "a 10 % per-region probability stays plain grey"
    assert not np.all(stretched[mid] == 100), "Grad-CAM heat is scaled to its peak and tinted"
    with pytest.raises(ValueError, match="heat_scale"):
        render_result_image(grey, cold, cap, heat_scale="percent")


def test_map_models_for_every_architecture_save_and_load(tmp_path: Path) -> None:
    for arch in ARCHITECTURES:
        folder = make_map_model_folder(tmp_path / arch, arch, size=32)
        model, card = load_model_folder(folder)
        assert isinstance(model, FractureMapNet) and card.head == "fracture_map" and model.arch == arch
