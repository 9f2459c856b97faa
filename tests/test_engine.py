"""InferenceEngine on tiny random-weight models (64 px) and real DICOM images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from pacs_ai.errors import ConfigError, ModelError
from pacs_ai.infer.architectures import ARCHITECTURES
from pacs_ai.infer.device import autocast_dtype, configure_threads, select_device, thread_count
from pacs_ai.infer.engine import InferenceEngine, Prediction
from pacs_ai.infer.model_card import CARD_FILE, load_model_folder
from pacs_ai.infer.preprocess import Prepared, dicom_to_gray, prepare
from support.model_factory import calibration_batch, make_model_folder, model_folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on this shared 2-core machine two OpenMP threads stall each other badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_ENGINES: dict[str, InferenceEngine] = {}


def engine_for(arch: str) -> InferenceEngine:
    if arch not in _ENGINES:
        _ENGINES[arch] = InferenceEngine([model_folder(arch)], device="cpu", threads=1)
    return _ENGINES[arch]


def prepared_images(engine: InferenceEngine, n: int, seed: int = 0) -> list[Prepared]:
    x = calibration_batch(engine.spec, n=n, seed=seed)
    grays = [(t[0].numpy() * engine.spec.std[0] + engine.spec.mean[0]).clip(0, 1) for t in x]
    return [prepare(np.float32(g), engine.spec) for g in grays]


def test_prediction_fields_threshold_temperature_and_label(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "m", "densenet121", seed=2, threshold=0.4, temperature=2.0, name="fx", version="9.1")
    engine = InferenceEngine([folder], device="cpu", threads=1)
    images = prepared_images(engine, 4)
    images[0].extra["preprocess_s"] = 0.25
    preds = engine.predict(images)
    model, _ = load_model_folder(folder)
    with torch.inference_mode():
        logits = model(torch.stack([p.tensor for p in images]))
    expected = torch.softmax(logits.double() / 2.0, dim=1)[:, 1].numpy()
    assert len(preds) == 4
    for pred, p in zip(preds, expected, strict=True):
        assert isinstance(pred, Prediction)
        assert pred.probability == pytest.approx(float(p), abs=1e-5)
        assert pred.threshold == 0.4 and pred.fractured == (pred.probability >= 0.4)
        assert pred.label == ("fractured" if pred.fractured else "not_fractured")
        assert (pred.model_name, pred.model_version, pred.architecture) == ("fx", "9.1", "densenet121")
        assert pred.cam.shape == (64, 64) and pred.cam.dtype == np.float32
        assert 0.0 <= pred.cam.min() and pred.cam.max() <= 1.0
        assert set(pred.timings) == {"preprocess", "forward", "cam"} and pred.timings["forward"] > 0
        json.dumps(pred.to_dict())
    assert preds[0].timings["preprocess"] == 0.25
    info = engine.describe()
    assert info["name"] == "fx" and info["version"] == "9.1" and info["architecture"] == "densenet121"
    assert info["device"] == "cpu" and info["threshold"] == 0.4 and info["cam_method"] == "GradCAM"


def test_batching_and_no_cam_path_give_the_same_probabilities() -> None:
    engine = InferenceEngine([model_folder("densenet121")], device="cpu", batch_size=3, threads=1)
    images = prepared_images(engine, 7, seed=4)
    batched = engine.predict(images)
    single = [engine.predict([im])[0] for im in images]
    plain = engine.predict(images, with_cam=False)
    for b, s, p in zip(batched, single, plain, strict=True):
        assert b.probability == pytest.approx(s.probability, abs=1e-5)
        assert b.probability == pytest.approx(p.probability, abs=1e-5)
        np.testing.assert_allclose(b.cam, s.cam, atol=1e-4)
        assert not p.cam.any() and p.timings["cam"] == 0.0
    assert engine.predict([]) == []
    with pytest.raises(ValueError, match="shape"):
        engine.predict([Prepared(torch.zeros(3, 32, 32), np.zeros((32, 32), np.uint8), images[0].geometry)])


def test_ensemble_probability_is_the_mean_of_its_members() -> None:
    a, b = model_folder("densenet121", seed=0), model_folder("densenet121", seed=1)
    ea = InferenceEngine([a], device="cpu", threads=1)
    eb = InferenceEngine([b], device="cpu", threads=1)
    both = InferenceEngine([a, b], device="cpu", threads=1)
    images = prepared_images(both, 3, seed=9)
    for pa, pb, pm in zip(ea.predict(images), eb.predict(images), both.predict(images), strict=True):
        assert pa.probability != pytest.approx(pb.probability, abs=1e-4)  # really two different models
        assert pm.probability == pytest.approx((pa.probability + pb.probability) / 2, abs=1e-6)
        assert pm.cam.max() == pytest.approx(1.0) and pm.cam.min() >= 0.0
    assert both.describe()["members"] == 2 and "+" in both.describe()["name"]


def test_ensemble_members_must_share_preprocessing(tmp_path: Path) -> None:
    other = make_model_folder(tmp_path / "noclahe", "densenet121", clahe=False)
    with pytest.raises(ModelError, match="input specification"):
        InferenceEngine([model_folder("densenet121"), other], device="cpu", threads=1)


def test_weights_that_do_not_match_the_card_are_refused(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "m", "densenet121")
    card = json.loads((folder / CARD_FILE).read_text())
    card["architecture"] = "resnet50"
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not match"):
        InferenceEngine([folder], device="cpu", threads=1)
    card["architecture"] = "densenet121"
    card["class_names"] = ["normal", "fractured", "other"]
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="classifier.weight"):
        InferenceEngine([folder], device="cpu", threads=1)
    with pytest.raises(ModelError):
        InferenceEngine([tmp_path / "missing"], device="cpu", threads=1)


def test_device_selection() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert autocast_dtype(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            select_device("cuda")
    with pytest.raises(ConfigError, match="model.device"):
        select_device("tpu")
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert configure_threads(0) >= 1
    finally:
        torch.set_num_threads(before)


def test_one_thread_rule() -> None:
    """A configured count wins; else the cores of the process's affinity mask less the reserve, at least 1."""
    import os

    cores = len(os.sched_getaffinity(0))
    assert thread_count(3) == 3 and thread_count(3, reserve=1) == 3
    assert thread_count(0) == thread_count(None) == cores
    assert thread_count(0, reserve=1) == max(1, cores - 1)
    assert thread_count(0, reserve=cores + 5) == 1


def test_a_batch_of_one_image_adds_only_the_cores_idle_at_that_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of one image runs on ``threads`` plus the cores idle right now, up to
    ``single_image_threads``; larger batches on ``threads``; the same probabilities either way."""
    import pacs_ai.infer.engine as engine_module

    base = engine_for("resnet50")
    engine = InferenceEngine([model_folder("resnet50")], device="cpu", threads=1, single_image_threads=3)
    try:
        images = prepared_images(engine, 2)
        seen = {}
        for idle, expected in ((5, 3), (1, 2), (0, 1), (None, 1)):
            monkeypatch.setattr(engine_module, "idle_cores", lambda idle=idle: idle)
            seen[idle] = engine.predict(images[:1])[0].probability
            assert torch.get_num_threads() == expected, (idle, expected)
        two = engine.predict(images)
        assert torch.get_num_threads() == 1
        assert all(p == pytest.approx(two[0].probability, rel=1e-5) for p in seen.values())
        assert engine.describe()["single_image_threads"] == 3
        assert base.single_image_threads == base.threads == 1
    finally:
        engine.close()
        torch.set_num_threads(1)


def test_idle_cores_reads_the_kernels_runnable_task_count(tmp_path: Path) -> None:
    """``/proc/loadavg``'s ``running/total`` field: the caller counts as running; a busy child process
    takes a core; an unreadable or malformed file gives None."""
    import subprocess
    import sys
    import time

    from pacs_ai.infer.device import default_threads, idle_cores

    fake = tmp_path / "loadavg"
    fake.write_text("0.50 0.40 0.30 1/80 12345\n")
    assert idle_cores(fake) == default_threads() - 1
    fake.write_text(f"9.0 9.0 9.0 {default_threads() + 4}/80 12345\n")
    assert idle_cores(fake) == 0
    fake.write_text("garbage\n")
    assert idle_cores(fake) is None
    assert idle_cores(tmp_path / "missing") is None
    now = idle_cores()
    assert now is not None and 0 <= now <= default_threads() - 1
    if default_threads() < 2:
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 30
        while idle_cores() > default_threads() - 2:  # type: ignore[operator]
            assert time.monotonic() < deadline, "a busy child never showed up as running"
            time.sleep(0.05)
    finally:
        spinner.kill()
        spinner.wait()


# -- real images -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wg04_grays(wg04_files: list[Path]) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Decoded grey images of the WG-04 files, grouped by image (RG2, RG3)."""
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for f in wg04_files:
        groups.setdefault(f.name.split("_")[0], []).append((f.name, dicom_to_gray(pydicom.dcmread(f))))
    return groups


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_transfer_syntax_gives_the_same_probability(wg04_grays, arch: str) -> None:
    engine = engine_for(arch)
    for image, variants in wg04_grays.items():
        assert len(variants) >= 5, image
        preds = engine.predict([prepare(g, engine.spec) for _, g in variants])
        probs = {name: p.probability for (name, _), p in zip(variants, preds, strict=True)}
        assert max(probs.values()) - min(probs.values()) <= 1e-5, probs
        assert 1e-4 < preds[0].probability < 1 - 1e-4  # not saturated: the comparison means something
        for p in preds[1:]:
            np.testing.assert_allclose(p.cam, preds[0].cam, atol=1e-4)


def _inverted_monochrome2(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The same picture stored the other way: MONOCHROME2, pixel values and window centre mirrored."""
    top = 2 ** int(ds.BitsStored) - 1
    out = pydicom.dcmread(ds.filename)
    pixels = out.pixel_array
    out.PixelData = (top - pixels.astype(np.int32)).astype(pixels.dtype).tobytes()
    out.PhotometricInterpretation = "MONOCHROME2"
    if "WindowCenter" in out:
        # LINEAR window: y(x) = (x - (c - 0.5)) / (w - 1) + 0.5, so y(top - x; top + 1 - c) = 1 - y(x; c)
        out.WindowCenter = top + 1 - float(ds.WindowCenter)
    return out


def _mono1_files() -> list[Path]:
    from support.common import TEST_DATA, WG04_SMALL

    return [*sorted(TEST_DATA.glob("*mono1*.dcm")), WG04_SMALL / "RG3_UNC.dcm"]


@pytest.mark.parametrize("path", _mono1_files(), ids=lambda p: p.name)
def test_monochrome1_and_inverted_monochrome2_copy_give_the_same_input(path: Path) -> None:
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    engine = engine_for("densenet121")
    a = prepare(dicom_to_gray(ds), engine.spec)
    b = prepare(dicom_to_gray(_inverted_monochrome2(ds)), engine.spec)
    # uint8 display images agree to one grey level (rounding of y vs 1 - y), almost everywhere exactly
    diff = np.abs(a.display.astype(int) - b.display.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    tdiff = (a.tensor - b.tensor).abs()
    assert float(tdiff.mean()) < 1e-3
    pa, pb = engine.predict([a, b])
    assert pa.probability == pytest.approx(pb.probability, abs=1e-3)
    # bone is bright: the tibia shaft is much brighter than the air beside the leg (the collimated
    # border is bright too: it got no X-rays)
    h, w = a.display.shape
    rows = slice(int(0.09 * h), int(0.45 * h))
    air = a.display[rows, int(0.27 * w) : int(0.31 * w)].mean()
    bone = a.display[rows, int(0.47 * w) : int(0.51 * w)].mean()
    assert bone > air + 100


def test_committed_samples_classify(sample_files: list[Path]) -> None:
    engine = engine_for("resnet50")
    preds = engine.predict([prepare(dicom_to_gray(pydicom.dcmread(f)), engine.spec) for f in sample_files])
    assert len(preds) == len(sample_files)
    by_name = {f.name: p for f, p in zip(sample_files, preds, strict=True)}
    if {"cr_hip_mono2_small.dcm", "cr_hip_mono2_small_rle.dcm"} <= set(by_name):
        a, b = by_name["cr_hip_mono2_small.dcm"], by_name["cr_hip_mono2_small_rle.dcm"]
        assert a.probability == pytest.approx(b.probability, abs=1e-5)


# -- pacs-ai classify ------------------------------------------------------------------------------


def test_classify_cli_end_to_end(tmp_path: Path, sample_files: list[Path], capsys) -> None:
    import subprocess
    import sys

    import cv2

    from support.common import REPO_ROOT

    png = tmp_path / "radiograph.png"
    gray = pydicom.dcmread(sample_files[0]).pixel_array.astype(np.float32)
    assert cv2.imwrite(str(png), np.uint8(255 * (gray - gray.min()) / (np.ptp(gray) or 1)))
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    missing = tmp_path / "missing.dcm"
    cams = tmp_path / "cams"
    files = [*sample_files, png, broken, missing]
    cmd = [sys.executable, "-m", "pacs_ai", "classify", *map(str, files), "--model", str(model_folder("densenet121")),
           "--device", "cpu", "--threads", "1", "--batch-size", "2", "--json", "--cam-out", str(cams)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 1, done.stderr  # two files could not be classified
    records = json.loads(done.stdout)
    assert [r["file"] for r in records if r["ok"]] == [str(f) for f in [*sample_files, png]]
    errors = {r["file"]: r for r in records if not r["ok"]}
    assert set(errors) == {str(broken), str(missing)}
    assert errors[str(missing)]["reason"] == "unreadable_file"
    for f in (broken, missing):
        assert f"{f}: error: " in done.stderr
    for r in records:
        if r["ok"]:
            assert 0.0 <= r["probability"] <= 1.0 and r["label"] in ("fractured", "not_fractured")
            overlay = cv2.imread(r["overlay"])
            src = Path(r["file"])
            if src.suffix == ".png":
                h, w = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE).shape
            else:
                meta = pydicom.dcmread(src, stop_before_pixels=True)
                h, w = meta.Rows, meta.Columns
            assert overlay.shape[:2] == (h, w) and overlay.shape[2] == 3
            # a colour heat map is blended in somewhere: not a grey image any more
            assert (overlay.max(axis=2).astype(int) - overlay.min(axis=2)).max() > 30
    # the same image as DICOM and as RLE-compressed DICOM give the same answer
    by_name = {Path(r["file"]).name: r for r in records if r["ok"]}
    if {"cr_hip_mono2_small.dcm", "cr_hip_mono2_small_rle.dcm"} <= set(by_name):
        assert by_name["cr_hip_mono2_small.dcm"]["probability"] == pytest.approx(
            by_name["cr_hip_mono2_small_rle.dcm"]["probability"], abs=1e-5
        )
    # text mode (in-process): one line per classified file on stdout, one error line per bad file on stderr
    from pacs_ai.cli import main

    before = torch.get_num_threads()
    try:
        rc = main(["classify", str(sample_files[0]), str(missing), "--model", str(model_folder("densenet121")),
                   "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{sample_files[0]}: ") and "P(fracture)=" in lines[0]
    assert err.strip().splitlines()[-1].startswith(f"{missing}: error: unreadable_file")
