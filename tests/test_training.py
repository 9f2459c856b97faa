"""Tests for the training package: the whole cycle on a tiny synthetic set, augmentation, metrics, split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pacs_ai.infer.model_card import load_model_folder
from pacs_ai.infer.preprocess import InputSpec, normalise
from training.augment import AugmentConfig, augment, augment_batch
from training.cli import build_parser, main
from training.data import Item, list_dataset, load_images, read_split, split_items
from training.metrics import (
    binary_metrics,
    bootstrap_intervals,
    fit_temperature,
    nll,
    softmax_positive,
    summarize,
    threshold_for_sensitivity,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FRACATLAS = SHARED / "fracatlas"
needs_fracatlas = pytest.mark.skipif(not (FRACATLAS / "manifest.csv").is_file(), reason=f"FracAtlas not found at {FRACATLAS}")


def _write_dicom(path: Path, img: np.ndarray) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (4095 - img.astype(np.uint16) * 16).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic radiograph-like images (fractured ones carry a dark crack) + a manifest and 2 DICOMs."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    rows = []
    for label in ("fractured", "not_fractured"):
        (root / label).mkdir()
        for i in range(8):
            h, w = int(rng.integers(70, 110)), int(rng.integers(60, 100))
            img = np.zeros((h, w), np.uint8)
            cv2.rectangle(img, (w // 3, 5), (2 * w // 3, h - 5), 200, -1)  # a "bone"
            img = cv2.add(img, rng.integers(0, 30, (h, w), dtype=np.uint8))
            if label == "fractured":
                cv2.line(img, (w // 3, h // 2), (2 * w // 3, h // 2 + 3), 20, 2)
            name = f"{label}/img{i}.png"
            cv2.imwrite(str(root / name), img)
            rows.append((name, label, f"{label}-g{i // 2}"))  # pairs of near-duplicates share a group
        _write_dicom(root / label / "scan.dcm", img)
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "group"])
        w.writerows(rows)
    return root


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for cmd in ("split", "train", "evaluate", "calibrate", "compare", "cam-review", "export"):
        with pytest.raises(SystemExit) as ei:
            parser.parse_args([cmd, "--help"])
        assert ei.value.code == 0
    assert "cam-review" in capsys.readouterr().out


def test_full_cycle(tiny_dataset: Path, tmp_path: Path) -> None:
    split_csv = tmp_path / "split.csv"
    assert main(["split", "--data", str(tiny_dataset), "--out", str(split_csv), "--val-fraction", "0.5", "--seed", "1"]) == 0
    split = read_split(split_csv)
    assert {it.label for it in split["val"]} == {0, 1}
    run, model_dir = tmp_path / "run", tmp_path / "model"
    common = ["--data", str(tiny_dataset), "--split", str(split_csv), "--out", str(run), "--size", "64", "--batch-size", "4",
              "--arch", "densenet121", "--threads", "1", "--no-progress", "--n-boot", "20", "--export", str(model_dir)]
    assert main(["train", *common, "--epochs", "1"]) == 0
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    model, card = load_model_folder(model_dir)
    assert card.architecture == "densenet121" and card.input.size == 64 and card.temperature > 0
    assert {"auc", "ci95", "sensitivity"} <= set(card.metrics["validation"])
    # resume continues with epoch 2 from the checkpoint
    assert main(["train", *common, "--epochs", "2", "--resume"]) == 0
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]

    assert main(["calibrate", "--model", str(model_dir), "--data", str(tiny_dataset), "--split", str(split_csv), "--n-boot", "20"]) == 0
    out_json = tmp_path / "eval" / "metrics.json"
    # evaluation on the whole folder: PNG and DICOM files alike
    assert main(["evaluate", "--model", str(model_dir), "--data", str(tiny_dataset), "--json", str(out_json), "--n-boot", "20"]) == 0
    metrics = json.loads(out_json.read_text())
    assert {"n", "auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "threshold"} <= set(metrics)
    assert metrics["n"] == 18
    assert (tmp_path / "eval" / "roc.png").is_file() and (tmp_path / "eval" / "confusion.png").is_file()

    model, card = load_model_folder(model_dir)  # the epoch-2 export
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(exported), "--half"]) == 0
    m2, c2 = load_model_folder(exported)
    assert all(p.dtype == torch.float32 for p in m2.parameters())
    x = normalise(load_images(tiny_dataset, split["val"][:2], c2.input, progress=False), c2.input)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), model(x), atol=0.1, rtol=0.1)

    _check_daemon_engine(model_dir, tiny_dataset / "fractured" / "scan.dcm")

    report = tmp_path / "compare"
    assert main(["compare", "--models", str(model_dir), str(exported), "--data", str(tiny_dataset), "--split", str(split_csv),
                 "--out", str(report), "--timing-images", "2", "--n-boot", "20"]) == 0
    assert "| densenet121" in (report / "report.md").read_text()


def _check_daemon_engine(model_dir: Path, dicom_file: Path) -> None:
    """The daemon's engine loads the exported folder and agrees with the card's calibrated probability."""
    import pydicom

    from pacs_ai.infer import engine as engine_mod
    from pacs_ai.infer.preprocess import dicom_to_gray, prepare

    model, card = load_model_folder(model_dir)
    prepared = prepare(dicom_to_gray(pydicom.dcmread(dicom_file)), card.input)
    engine = engine_mod.InferenceEngine(model_dir, device="cpu", batch_size=2)
    try:
        pred = engine.predict([prepared], with_cam=False)[0]
    finally:
        engine.close()
    with torch.no_grad():
        logits = model(prepared.tensor.unsqueeze(0)).numpy()
    expected = float(softmax_positive(logits, card.temperature, card.positive_index)[0])
    assert pred.probability == pytest.approx(expected, abs=1e-3)
    assert pred.threshold == pytest.approx(card.threshold)


def test_cam_review_pointing_game(tiny_dataset: Path, tmp_path: Path) -> None:
    from pacs_ai.infer.architectures import build_model
    from pacs_ai.infer.model_card import ModelCard, save_model_folder

    model_dir = tmp_path / "m"
    save_model_folder(model_dir, build_model("resnet50"), ModelCard(name="t", architecture="resnet50", version="0", input=InputSpec(size=64)))
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("file,x0,y0,x1,y1\n" + "".join(f"fractured/img{i}.png,0.0,0.0,1.0,1.0\n" for i in range(3)))
    assert main(["cam-review", "--model", str(model_dir), "--data", str(tiny_dataset), "--boxes", str(boxes), "--out", str(tmp_path / "cam"), "--gallery", "2"]) == 0
    result = json.loads((tmp_path / "cam" / "cam_review.json").read_text())
    assert result["n"] == 3 and result["method"] == "GradCAM"
    assert result["pointing_game"] == sum(r["hit"] for r in result["images"]) / 3
    assert (tmp_path / "cam" / "gallery.png").is_file()


def test_augmentation_keeps_images_valid() -> None:
    rng = np.random.default_rng(0)
    spec = InputSpec(size=64)
    imgs = rng.integers(0, 256, (6, 64, 64), dtype=np.uint8)
    imgs[:, :, :8] = 0  # letterbox padding
    out = augment_batch(imgs, rng)
    assert out.shape == imgs.shape and out.dtype == np.uint8
    x = normalise(out, spec)
    assert x.shape == (6, 3, 64, 64) and torch.isfinite(x).all()
    # identity config leaves the image unchanged; augmentation is deterministic for a seed
    ident = AugmentConfig(rotate_deg=0, zoom=(1, 1), shift=0, hflip=False, brightness=0, contrast=0)
    np.testing.assert_array_equal(augment(imgs[0], rng, ident), imgs[0])
    a = augment(imgs[0], np.random.default_rng(5))
    b = augment(imgs[0], np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


def test_horizontal_flip_mirrors() -> None:
    img = np.zeros((32, 32), np.uint8)
    img[10:20, 2:6] = 255
    cfg = AugmentConfig(rotate_deg=0, zoom=(1, 1), shift=0, hflip=True, brightness=0, contrast=0)
    outs = [augment(img, np.random.default_rng(s), cfg) for s in range(10)]
    flipped = [o for o in outs if not np.array_equal(o, img)]
    assert flipped, "no flip in 10 draws"
    np.testing.assert_array_equal(flipped[0], img[:, ::-1])


def test_metrics_match_sklearn() -> None:
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    prob = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    thr = 0.5
    m = binary_metrics(y, prob, thr)
    pred = (prob >= thr).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, prob))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    ci = bootstrap_intervals(y, prob, thr, n_boot=200)
    for k, (lo, hi) in ci.items():
        assert lo <= m[k] <= hi, k
    s = summarize(y, prob, thr, n_boot=50)
    assert s["n"] == 300 and sum(s["confusion_matrix"].values()) == 300
    json.dumps(s, allow_nan=False)


def test_threshold_for_sensitivity() -> None:
    y = np.array([1] * 10 + [0] * 10)
    prob = np.concatenate([np.linspace(0.1, 1.0, 10), np.linspace(0.0, 0.5, 10)])
    thr = threshold_for_sensitivity(y, prob, 0.9)
    sens = ((prob >= thr) & (y == 1)).sum() / 10
    assert sens >= 0.9
    assert ((prob >= thr + 1e-9) & (y == 1)).sum() / 10 < 0.9  # the highest such threshold


def test_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    logits = np.stack([np.zeros_like(z), 3.0 * z], axis=1)  # 3x overconfident
    t = fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.15)
    assert nll(logits, y, t) < nll(logits, y, 1.0)
    np.testing.assert_allclose(softmax_positive(logits, t), 1 / (1 + np.exp(-3.0 * z / t)), rtol=1e-6)


def test_split_never_puts_a_group_on_both_sides() -> None:
    rng = np.random.default_rng(1)
    items = [Item(f"f{i}.jpg", int(rng.random() < 0.2), f"g{i // 3}") for i in range(600)]
    s = split_items(items, 0.2, seed=7)
    assert not {i.group for i in s["train"]} & {i.group for i in s["val"]}
    assert len(s["train"]) + len(s["val"]) == 600
    frac_val = sum(i.label for i in s["val"]) / len(s["val"])
    frac_all = sum(i.label for i in items) / len(items)
    assert abs(frac_val - frac_all) < 0.05
    assert split_items(items, 0.2, seed=7) == s  # deterministic


@needs_fracatlas
def test_fracatlas_split_by_group() -> None:
    items = list_dataset(FRACATLAS)
    assert len(items) > 3000
    s = split_items(items, 0.2, seed=0)
    assert not {i.group for i in s["train"]} & {i.group for i in s["val"]}
    assert 0.15 < len(s["val"]) / len(items) < 0.25


def test_imagenet_weights_absent_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pacs_ai.errors import ModelError
    from pacs_ai.infer.architectures import build_model
    from training.train import resolve_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelError, match=r"resnet50-11ad3fa6\.pth.*not in torchvision's local cache"):
        resolve_weights(build_model("resnet50"), "resnet50", "imagenet")
    assert resolve_weights(build_model("resnet50"), "resnet50", "none").startswith("none")
