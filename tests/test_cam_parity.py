"""Training's ``cam-review`` and the daemon's engine give the same heat map for the same image and model.

For each architecture (a small random model from ``model_factory``) and for a fracture-map (format 2)
model, ``python -m training cam-review --maps`` is run on a few committed-style synthetic images and its
maps are compared with what ``InferenceEngine.predict`` (the daemon's worker path) gives for the same
file, read and prepared independently here with pydicom/OpenCV-free steps of the serving code. The maps
must have the same shape and differ by at most 1e-5.

An independent reference for what the map should be: for resnet50 and densenet121 (global-average-pool
+ linear head) Grad-CAM equals the classic CAM ``relu(sum_k w_k A_k)`` (Zhou et al. 2016) computed here by
hand from the last feature map (after DenseNet's final ReLU); the review's map must match it after the
same bilinear upsampling and peak scaling. A second CAM that hooked DenseNet's ``norm5`` (before the
in-place ReLU, the old training code) would not.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pacs_ai.infer.engine import InferenceEngine
from pacs_ai.infer.model_card import load_model_folder
from pacs_ai.infer.preprocess import prepare, read_gray
from support.model_factory import make_map_model_folder, model_folder
from training.cli import main

N_IMAGES = 3


@pytest.fixture(scope="module")
def boxed_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 'fractured' and one normal synthetic radiograph (PNG), each fractured one with a box."""
    root = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(7)
    (root / "fractured").mkdir()
    (root / "not_fractured").mkdir()
    lines = ["file,x0,y0,x1,y1"]
    for i in range(N_IMAGES):
        h, w = 90 + 10 * i, 70 + 15 * i
        img = np.zeros((h, w), np.uint8)
        cv2.rectangle(img, (w // 3, 5), (2 * w // 3, h - 5), 190, -1)
        img = cv2.add(img, rng.integers(0, 40, (h, w), dtype=np.uint8))
        cv2.line(img, (w // 3, h // 2), (2 * w // 3, h // 2 + 4), 15, 2)
        cv2.imwrite(str(root / "fractured" / f"f{i}.png"), img)
        lines.append(f"fractured/f{i}.png,0.3,0.4,0.7,0.6")
    cv2.imwrite(str(root / "not_fractured" / "n0.png"), np.full((80, 60), 100, np.uint8))
    (root / "boxes.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _review_maps(folder: Path, data: Path, out: Path) -> tuple[dict[str, np.ndarray], dict]:
    assert main(["cam-review", "--model", str(folder), "--data", str(data), "--out", str(out), "--maps", "--gallery", "1", "--device", "cpu", "--threads", "1"]) == 0
    with np.load(out / "maps.npz") as z:
        maps = {str(f): z["cams"][i] for i, f in enumerate(z["files"])}
    return maps, json.loads((out / "cam_review.json").read_text())


def _engine_maps(folder: Path, data: Path, files: list[str]) -> dict[str, np.ndarray]:
    engine = InferenceEngine(folder, device="cpu", batch_size=1, threads=1)
    try:
        return {f: engine.predict([prepare(read_gray(data / f), engine.spec)])[0].cam for f in files}
    finally:
        engine.close()


def _classic_cam(folder: Path, data: Path, file: str) -> np.ndarray:
    """Zhou et al.'s CAM for a GAP + linear classifier, by hand: relu(sum_k w_k A_k) on the last feature
    map, min-max scaled and resized bilinearly to the input as pytorch-grad-cam scales its maps, peak 1."""
    model, card = load_model_folder(folder, map_location="cpu")
    model.eval()
    x = prepare(read_gray(data / file), card.input).tensor.unsqueeze(0)
    with torch.no_grad():
        if card.architecture == "densenet121":
            feats = torch.relu(model.features(x))  # the map the classifier pools: after the final ReLU
            w = model.classifier.weight
        else:
            m = model
            feats = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
            w = model.fc.weight
        cam = np.maximum(torch.einsum("nchw,c->nhw", feats, w[card.positive_index]).numpy()[0], 0)
    cam = cam - cam.min()
    cam = cam / (1e-7 + cam.max())
    up = cv2.resize(np.float32(cam), (card.input.size, card.input.size))
    return (up / up.max()).astype(np.float32) if up.max() > 0 else up


@pytest.mark.parametrize("kind", ["resnet50", "densenet121", "vgg16", "fracture_map"])
def test_cam_review_matches_the_daemon_engine(kind: str, boxed_dataset: Path, tmp_path: Path) -> None:
    folder = make_map_model_folder(tmp_path / "map", "densenet121") if kind == "fracture_map" else model_folder(kind)
    review, summary = _review_maps(folder, boxed_dataset, tmp_path / "review")
    files = [f"fractured/f{i}.png" for i in range(N_IMAGES)]
    assert sorted(review) == files and summary["n"] == N_IMAGES
    assert summary["method"] == {"resnet50": "GradCAM", "densenet121": "GradCAM", "vgg16": "HiResCAM", "fracture_map": "fracture map"}[kind]
    served = _engine_maps(folder, boxed_dataset, files)
    for f in files:
        assert review[f].shape == served[f].shape == (64, 64)
        diff = float(np.max(np.abs(review[f] - served[f])))
        assert diff <= 1e-5, f"{kind} {f}: review and engine maps differ by {diff}"
        assert float(served[f].max()) > 0.0, "an all-zero map would make the comparison empty"
    if kind in ("resnet50", "densenet121"):
        for f in files:
            ref = _classic_cam(folder, boxed_dataset, f)
            assert float(np.max(np.abs(review[f] - ref))) <= 2e-3, f"{kind} {f}: not the textbook CAM"
