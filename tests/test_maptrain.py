"""Localisation-supervised training (``train-map``), the pointing game and ``evaluate``'s figures.

- a few training steps on the synthetic "bright line inside a box" task give a fracture map whose peak
  lands in the box on held-out images (a narrow DenseNet, so it runs in well under a minute);
- the pointing game and cell targets on hand-made inputs with a known answer;
- ``evaluate`` on a tiny labelled set against scikit-learn and a hand computation from the model itself;
- the ``train-map`` command end to end at a tiny scale: checkpoints, export, mid-epoch resume.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision.models as tvm
from torch import nn

from pacs_ai.explain.fracture_map import cells_to_heat
from pacs_ai.infer.architectures import FractureMapNet
from pacs_ai.infer.engine import InferenceEngine
from pacs_ai.infer.model_card import load_model_folder
from pacs_ai.infer.preprocess import Geometry, cam_to_original, prepare, read_gray
from support.model_factory import make_map_model_folder
from support.synthetic_fractures import REGIONS, write_synthetic_set
from training.augment import AugmentConfig
from training.cli import main
from training.data import list_dataset
from training.maptrain import MapTrainConfig, cell_targets, load_data, make_batch, map_loss, plan_epoch, whole_image_pass
from training.metrics import operating_points, reliability
from training.pointing import peak_hit, pointing_game, read_boxes, wilson


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_set(root / "train", 48, 48, seed=1), write_synthetic_set(root / "test", 16, 16, seed=2)


# ----------------------------------------------------------------------------------------------------
# Learning the synthetic task
# ----------------------------------------------------------------------------------------------------


def test_a_few_steps_put_the_map_peak_inside_the_box_on_held_out_images(synthetic: tuple[Path, Path]) -> None:
    train_root, test_root = synthetic
    torch.manual_seed(0)
    steps = 40
    cfg = MapTrainConfig(data=str(train_root), out="unused", scale=256, crop=128, batch_size=16, crops_per_epoch=16 * steps, lr=3e-3, hard_fraction=0.0)
    tr = load_data(cfg, list_dataset(train_root), read_boxes(train_root / "boxes.csv"), progress=False)
    test_cfg = MapTrainConfig(data=str(test_root), out="unused", scale=256, crop=128)
    te = load_data(test_cfg, list_dataset(test_root), read_boxes(test_root / "boxes.csv"), progress=False)
    # a narrow DenseNet (same FractureMapNet code path as densenet121, stride 32) keeps this test fast
    trunk = tvm.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)
    trunk.classifier = nn.Identity()
    model = FractureMapNet("densenet121", trunk, trunk.features.norm5.num_features, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.2)
    plan = plan_epoch(cfg, tr, [], np.random.default_rng(0))
    assert sum(p[3] for p in plan) == len(plan) // 2
    model.train()
    losses = []
    for b in range(steps):
        batch = make_batch(cfg, tr, plan[b * 16 : (b + 1) * 16], 32, np.random.default_rng(b), AugmentConfig())
        logits, cells = model.forward_map(batch["x"])
        loss, _ = map_loss(logits, cells, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    z, cells = whole_image_pass(model, te.images, test_cfg.spec(), np.arange(len(te.items)), 8, torch.device("cpu"))
    y = te.labels
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, z) >= 0.9
    hits = [
        peak_hit(cells_to_heat(torch.from_numpy(cells[i : i + 1]), 256)[0].numpy(), te.raw_boxes[i], te.geometries[i])
        for i in range(len(y))
        if y[i] == 1
    ]
    # chance (a random peak) is about 4 %: the boxes cover a few percent of each image
    assert len(hits) == 16 and np.mean(hits) >= 0.7


# ----------------------------------------------------------------------------------------------------
# Hand-made inputs with known answers
# ----------------------------------------------------------------------------------------------------


def test_pointing_game_on_hand_made_maps() -> None:
    heat = np.zeros((100, 200), np.float32)
    heat[30, 150] = 1.0  # peak at x=150, y=30 -> fractions (0.7525, 0.305)
    assert peak_hit(heat, [(0.70, 0.25, 0.80, 0.35)])
    assert not peak_hit(heat, [(0.10, 0.10, 0.50, 0.50)])
    assert peak_hit(heat, [(0.10, 0.10, 0.50, 0.50), (0.74, 0.30, 0.76, 0.31)])  # any of several boxes
    assert not peak_hit(np.zeros((10, 10), np.float32), [(0.0, 0.0, 1.0, 1.0)]), "a flat map points nowhere"
    # on the letterboxed grid: a 100x200 (h x w) image in a 64 px square sits at rows 16..47
    g = Geometry.for_image(100, 200, 64)
    assert (g.pad_top, g.new_h, g.new_w) == (16, 32, 64)
    grid = np.zeros((64, 64), np.float32)
    grid[16 + 10, 48] = 1.0  # y fraction (10.5 / 32) = 0.33, x fraction 48.5 / 64 = 0.76
    assert peak_hit(grid, [(0.70, 0.25, 0.80, 0.35)], g)
    assert not peak_hit(grid, [(0.70, 0.40, 0.80, 0.50)], g)
    pg = pointing_game([True] * 8 + [False] * 2)
    assert pg["pointing_game"] == 0.8 and pg["n_boxed"] == 10 and pg["hits"] == 8
    lo, hi = pg["pointing_game_ci95"]
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)  # Wilson, 8/10
    assert wilson(0, 0) == [None, None]


def test_cell_targets_from_box_coverage() -> None:
    mask = np.zeros((64, 64), np.float32)
    mask[0:16, 0:16] = 1.0  # a whole 16 px cell
    mask[16:20, 16:32] = 1.0  # a quarter of a cell (0.25 >= 0.2): positive
    mask[40:42, 40:48] = 1.0  # 1/16 of a cell: ignored
    t, w = cell_targets(mask, 16, True, 0.2, 0.1)
    assert t.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert w[0, 0] == 1 and w[1, 1] == 1 and w[2, 2] == 0 and w[3, 3] == pytest.approx(0.1)
    small = np.zeros((64, 64), np.float32)
    small[40:42, 40:48] = 1.0
    t, w = cell_targets(small, 16, True, 0.2, 0.0)
    assert t[2, 2] == 1 and t.sum() == 1 and w[2, 2] == 1 and w[0, 0] == 0, "a small box still marks its best cell"
    t, w = cell_targets(mask, 16, False, 0.2, 0.1)
    assert t.sum() == 0 and np.all(w == 1), "every cell of a normal image is negative"


def test_operating_points_and_ece_against_brute_force_and_sklearn() -> None:
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    prob = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1)
    op = operating_points(y, prob)
    best_sens = max(((prob[y == 1] >= t).mean() for t in np.unique(prob) if (prob[y == 0] < t).mean() >= 0.9), default=0.0)
    best_spec = max(((prob[y == 0] < t).mean() for t in np.unique(prob) if (prob[y == 1] >= t).mean() >= 0.9), default=0.0)
    assert op["sensitivity_at_specificity_90"] == pytest.approx(best_sens)
    assert op["specificity_at_sensitivity_90"] == pytest.approx(best_spec)
    rel = reliability(y, prob, 10)
    true, pred = calibration_curve(y, prob, n_bins=10, strategy="uniform")
    counts = np.array([b["n"] for b in rel["bins"]])
    assert np.allclose([b["observed"] for b in rel["bins"]], true) and np.allclose([b["mean_predicted"] for b in rel["bins"]], pred)
    assert rel["ece"] == pytest.approx(float(np.sum(counts / len(y) * np.abs(true - pred))))


# ----------------------------------------------------------------------------------------------------
# evaluate: the daemon's path, checked against an independent computation
# ----------------------------------------------------------------------------------------------------


def test_evaluate_figures_match_an_independent_computation(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    data = synthetic[1]
    folder = make_map_model_folder(tmp_path / "m", "densenet121", seed=5, temperature=1.5, threshold=0.4)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(folder), "--data", str(data), "--json", str(out / "metrics.json"), "--n-boot", "50", "--threads", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"roc.png", "confusion.png", "reliability.png"} <= {p.name for p in out.iterdir()}

    model, card = load_model_folder(folder)
    items = list_dataset(data)
    boxes = read_boxes(data / "boxes.csv")
    prepared = [prepare(read_gray(data / it.file), card.input) for it in items]
    with torch.no_grad():
        logits, cells = model.forward_map(torch.stack([p.tensor for p in prepared]))
    prob = torch.sigmoid(logits[:, 1].double() / 1.5).numpy()
    y = np.array([it.label for it in items])
    assert m["n"] == 32 and m["auc"] == pytest.approx(roc_auc_score(y, prob), abs=1e-6)
    assert m["sensitivity"] == pytest.approx(((prob >= 0.4) & (y == 1)).sum() / 16, abs=1e-9)
    assert m["specificity"] == pytest.approx(((prob < 0.4) & (y == 0)).sum() / 16, abs=1e-9)
    op = operating_points(y, prob)
    assert m["sensitivity_at_specificity_90"] == pytest.approx(op["sensitivity_at_specificity_90"])
    lo, hi = m["ci95"]["specificity_at_sensitivity_90"]
    assert lo <= m["specificity_at_sensitivity_90"] <= hi
    with (data / "manifest.csv").open(newline="") as fh:
        region_of = {r["file"]: [k for k in REGIONS if r[k] == "1"][0] for r in csv.DictReader(fh)}
    for region in REGIONS:
        sel = np.array([region_of[it.file] == region for it in items])
        assert m["auc_by_region"][region]["n"] == int(sel.sum())
        assert m["auc_by_region"][region]["auc"] == pytest.approx(roc_auc_score(y[sel], prob[sel]), abs=1e-6)
    from sklearn.calibration import calibration_curve

    true, pred = calibration_curve(y, prob, n_bins=10, strategy="uniform")
    counts = np.histogram(prob, bins=np.linspace(0, 1, 11))[0]
    assert m["ece"] == pytest.approx(float(np.sum(counts[counts > 0] / len(y) * np.abs(true - pred))), abs=1e-6)
    # pointing game: peak of sigmoid(cells / T), upsampled bilinearly, mapped back onto the original
    hits = 0
    for i, it in enumerate(items):
        if it.label == 1:
            c = (1.0 / (1.0 + np.exp(-cells[i, 0].numpy() / 1.5))).astype(np.float32)
            grid = cv2.resize(c, (card.input.size, card.input.size), interpolation=cv2.INTER_LINEAR)
            full = cam_to_original(grid, prepared[i].geometry)
            yy, xx = np.unravel_index(int(np.argmax(full)), full.shape)
            fx, fy = (xx + 0.5) / full.shape[1], (yy + 0.5) / full.shape[0]
            hits += any(x0 <= fx <= x1 and y0 <= fy <= y1 for x0, y0, x1, y1 in boxes[it.file])
    assert m["n_boxed"] == 16 and m["hits"] == hits and m["pointing_game"] == pytest.approx(hits / 16)
    assert m["heat_map"] == "fracture map" and m["head"] == "fracture_map"


# ----------------------------------------------------------------------------------------------------
# The command: checkpoints, export, resume
# ----------------------------------------------------------------------------------------------------


def test_train_map_command_checkpoints_exports_and_resumes_mid_epoch(synthetic: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.maptrain as maptrain

    data = synthetic[0]

    def args(run: Path) -> list[str]:
        return ["train-map", "--data", str(data), "--out", str(run), "--arch", "densenet121", "--scale", "128", "--crop", "64",
                "--epochs", "1", "--crops-per-epoch", "24", "--batch-size", "8", "--val-limit", "8", "--hard-pool", "4",
                "--checkpoint-minutes", "1e-9", "--n-boot", "20", "--threads", "1", "--no-progress"]

    whole = tmp_path / "whole"
    assert main(args(whole)) == 0
    history = json.loads((whole / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert 0.0 <= history[0]["val_auc"] <= 1.0 and history[0]["val_pointing_game"] is not None
    for name in ("last.pt", "best.pt", "epoch-001.pt", "split.csv", "model-best/model.json"):
        assert (whole / name).is_file(), name
    model, card = load_model_folder(whole / "model-best")
    assert isinstance(model, FractureMapNet) and card.head == "fracture_map" and card.input.size == 128
    assert {"auc", "pointing_game", "pointing_game_ci95"} <= set(card.metrics["validation"])
    assert "train-map" in card.training["command"]
    engine = InferenceEngine(whole / "model-best", device="cpu", threads=1)
    pred = engine.predict([prepare(read_gray(data / "fractured" / "s1-0000.png"), engine.spec)])[0]
    assert pred.heat_scale == "probability" and pred.cam.shape == (128, 128)

    # killed right after the first mid-epoch checkpoint, then resumed: the same weights as the whole run
    real_save = maptrain.save_checkpoint

    def save_then_die(obj: dict, path: Path) -> None:
        real_save(obj, path)
        if path.name == "last.pt" and obj["batch_done"] == 1:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    monkeypatch.setattr(maptrain, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(args(cut))
    monkeypatch.setattr(maptrain, "save_checkpoint", real_save)
    assert torch.load(cut / "last.pt", weights_only=False)["batch_done"] == 1 and not (cut / "epoch-001.pt").exists()
    assert main([*args(cut), "--resume"]) == 0
    a = torch.load(whole / "epoch-001.pt", weights_only=False)["model"]
    b = torch.load(cut / "epoch-001.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


# ----------------------------------------------------------------------------------------------------
# Sized to the machine: DataLoader workers and the wall-clock budget
# ----------------------------------------------------------------------------------------------------


def test_batches_built_by_worker_processes_equal_those_built_in_process(synthetic: tuple[Path, Path]) -> None:
    from training.maptrain import EpochBatches

    data = synthetic[0]
    cfg = MapTrainConfig(data=str(data), out="unused", scale=128, crop=64, crops_per_epoch=24, batch_size=8, workers=2)
    tr = load_data(cfg, list_dataset(data), read_boxes(data / "boxes.csv"), progress=False)
    plan = plan_epoch(cfg, tr, [], np.random.default_rng(3))
    batches = [plan[s : s + 8] for s in range(0, len(plan), 8)]
    source = EpochBatches(cfg, tr, batches, epoch=2, stride=32, first=1)
    loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=2)
    got = list(loader)
    assert len(got) == 2
    for k, batch in enumerate(got):
        want = make_batch(cfg, tr, batches[1 + k], 32, np.random.default_rng([cfg.seed, 2, 1 + k]), AugmentConfig(**cfg.augment))
        for key in ("x", "target", "weight", "y", "y_mask"):
            torch.testing.assert_close(batch[key], want[key], msg=key)


def test_progress_driven_one_cycle_follows_torchs_one_cycle_lr() -> None:
    from training.maptrain import OneCyclePlan

    total, pct = 200, 0.25
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total, pct_start=pct, div_factor=25, final_div_factor=1e3, cycle_momentum=False)
    plan = OneCyclePlan(pct)
    for step in range(total):
        # OneCycleLR's phases end at step pct*total - 1 and total - 1
        warm_end = pct * total - 1
        plan.progress = step / warm_end * pct if step <= warm_end else pct + (step - warm_end) / (total - 1 - warm_end) * (1 - pct)
        assert plan(step) * 1e-3 == pytest.approx(ref.get_last_lr()[0], rel=1e-6, abs=1e-12), step
        opt.step()
        ref.step()
    plan.progress = 2.0
    assert plan(0) == pytest.approx(1 / 25e3)


def test_a_run_with_a_time_budget_stops_when_it_is_spent_and_exports_its_model(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = synthetic[0], tmp_path / "budget"
    assert main(["train-map", "--data", str(data), "--out", str(run), "--arch", "densenet121", "--scale", "128", "--crop", "64",
                 "--epochs", "50", "--crops-per-epoch", "24", "--batch-size", "8", "--val-limit", "8", "--hard-pool", "4",
                 "--max-minutes", "1e-6", "--workers", "1", "--n-boot", "20", "--threads", "1", "--no-progress"]) == 0
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert history[0]["lr"] == pytest.approx(1e-3 / 25e3)
    _, card = load_model_folder(run / "model-best")
    assert card.training["max_minutes"] == 1e-6 and card.head == "fracture_map"


def test_evaluate_of_several_models_scores_their_ensemble(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    data = synthetic[1]
    a = make_map_model_folder(tmp_path / "a", "densenet121", seed=5, temperature=1.5, threshold=0.4)
    b = make_map_model_folder(tmp_path / "b", "densenet121", seed=9, temperature=1.0, threshold=0.4)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(a), str(b), "--data", str(data), "--json", str(out / "metrics.json"), "--n-boot", "20", "--threads", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    items = list_dataset(data)
    probs = []
    for folder, temperature in ((a, 1.5), (b, 1.0)):
        model, _ = load_model_folder(folder)
        x = torch.stack([prepare(read_gray(data / it.file), model_card_input(folder)).tensor for it in items])
        with torch.no_grad():
            logits, _ = model.forward_map(x)
        probs.append(torch.sigmoid(logits[:, 1].double() / temperature).numpy())
    y = np.array([it.label for it in items])
    assert m["members"] == 2 and "+" in m["model"]
    assert m["auc"] == pytest.approx(roc_auc_score(y, (probs[0] + probs[1]) / 2), abs=1e-6)


def model_card_input(folder: Path):  # type: ignore[no-untyped-def]
    return load_model_folder(folder)[1].input


def test_compare_scores_models_and_their_ensemble_and_reuses_a_matching_evaluation(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    data = synthetic[1]
    a = make_map_model_folder(tmp_path / "a", "densenet121", seed=5, temperature=1.5, threshold=0.4)
    b = make_map_model_folder(tmp_path / "b", "densenet121", seed=9, temperature=1.0, threshold=0.4, name="test-map-b")
    ev = tmp_path / "eval-a" / "metrics.json"
    assert main(["evaluate", "--model", str(a), "--data", str(data), "--json", str(ev), "--n-boot", "20", "--threads", "1"]) == 0
    report = tmp_path / "compare"
    baseline = make_map_model_folder(tmp_path / "c", "densenet121", seed=11, name="test-map-baseline")
    assert main(["compare", "--models", str(a), str(b), "--ensemble", "--evaluations", str(ev), "--extra-models", str(baseline), "--data", str(data),
                 "--out", str(report), "--timing-images", "2", "--n-boot", "20", "--threads", "1"]) == 0
    rows = json.loads((report / "metrics.json").read_text())
    assert [r["name"] for r in rows] == ["test-map-baseline", "test-map-densenet121", "test-map-b", "test-map-densenet121+test-map-b"]
    assert [r["figures_from"] for r in rows] == ["this run", str(ev), "this run", "this run"]
    rows = rows[1:]  # the ensemble is of --models only
    assert rows[0]["auc"] == json.loads(ev.read_text())["auc"]
    items = list_dataset(data)
    y = np.array([it.label for it in items])
    probs = []
    for folder, temperature in ((a, 1.5), (b, 1.0)):
        model, card = load_model_folder(folder)
        with torch.no_grad():
            logits, _ = model.forward_map(torch.stack([prepare(read_gray(data / it.file), card.input).tensor for it in items]))
        probs.append(torch.sigmoid(logits[:, 1].double() / temperature).numpy())
    assert rows[1]["auc"] == pytest.approx(roc_auc_score(y, probs[1]), abs=1e-6)
    assert rows[2]["auc"] == pytest.approx(roc_auc_score(y, (probs[0] + probs[1]) / 2), abs=1e-6)
    assert rows[2]["ms_per_image_b1"] == pytest.approx(rows[0]["ms_per_image_b1"] + rows[1]["ms_per_image_b1"], abs=0.11)
    assert rows[2]["n_boxed"] == 16 and 0 <= rows[2]["pointing_game"] <= 1
    text = (report / "report.md").read_text()
    assert "| ensemble (densenet121 + densenet121)" in text and "pointing game" in text
