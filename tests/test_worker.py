"""The worker (pacs_ai.daemon.worker) with a real SQLite job store and a tiny random-weight model."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
import torch

from pacs_ai.daemon.worker import Worker
from pacs_ai.infer.engine import InferenceEngine, Prediction
from pacs_ai.infer.preprocess import Prepared, cam_to_original
from pacs_ai.queue.jobstore import JobState, JobStore, RetryPolicy
from pacs_ai.results import ResultFiles, WrittenResults
from support.model_factory import model_folder

DESTINATIONS = ("pacs", "archive")


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    before = torch.get_num_threads()
    eng = InferenceEngine([model_folder("densenet121")], device="cpu", batch_size=8, threads=1)
    yield eng
    torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", RetryPolicy(3, 0.0, 0.0), upgrade=True)
    yield s
    s.close()


class Events:
    """A recording Observer (only job_finished matters here)."""

    def __init__(self) -> None:
        self.finished: list[tuple[int, str, float, float]] = []

    def job_finished(self, job_id: int, state: str, inference_s: float, cam_s: float) -> None:
        self.finished.append((job_id, state, inference_s, cam_s))

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *a, **k: None


def png_writer(ds: pydicom.Dataset, prepared: Prepared, prediction: Prediction, folder: Path) -> WrittenResults:
    """A minimal ResultWriter: the heat map on the original grid as an 8-bit PNG."""
    heat = cam_to_original(prediction.cam, prepared.geometry)
    path = folder / "heatmap.png"
    assert cv2.imwrite(str(path), np.uint8(np.clip(heat, 0, 1) * 255))
    return WrittenResults(ResultFiles(overlay=path))


_counter = iter(range(1, 10**6))


def enqueue(store: JobStore, path: Path) -> int:
    n = next(_counter)
    return store.enqueue(
        sop_instance_uid=f"1.2.826.0.1.3680043.10.999.{n}",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        calling_aet="TEST",
        spool_path=str(Path(path).resolve()),
        sha256=f"sha{n}",
        size=Path(path).stat().st_size if Path(path).exists() else 0,
    ).job_id


def make_worker(store: JobStore, engine: Any, tmp_path: Path, writer=png_writer, **kw: Any) -> Worker:  # type: ignore[no-untyped-def]
    return Worker(store, engine, writer, tmp_path / "results", DESTINATIONS, owner="w1", **kw)


def test_batch_with_good_undecodable_and_non_dicom_files(store, engine, tmp_path, sample_files, undecodable_files) -> None:
    not_dicom = tmp_path / "not.dcm"
    not_dicom.write_text("this is not DICOM")
    undecodable = undecodable_files
    good = [enqueue(store, f) for f in sample_files]
    bad = {enqueue(store, f): "undecodable_pixel_data" for f in undecodable}
    bad[enqueue(store, not_dicom)] = "unreadable_dicom"
    events = Events()
    worker = make_worker(store, engine, tmp_path, observer=events)
    assert worker.run_once() == len(good) + len(bad)
    for job_id, reason in bad.items():
        job = store.get(job_id)
        assert job.state == JobState.DEAD, job  # permanent: no retry
        assert job.last_error.startswith(f"{reason}: ") and len(job.last_error) > len(reason) + 5
    for job_id in good:
        job = store.get(job_id)
        assert job.state == JobState.DONE, job.last_error
        result = job.result
        assert set(result) == {
            "probability", "fractured", "label", "threshold", "model_name", "model_version", "architecture",
            "timings", "files",
        }
        assert 0.0 <= result["probability"] <= 1.0 and result["label"] in ("fractured", "not_fractured")
        assert result["fractured"] == (result["probability"] >= result["threshold"])
        assert result["architecture"] == "densenet121" and result["model_version"] == "0.0.1-test"
        assert set(result["timings"]) == {"preprocess", "forward", "cam", "read", "decode", "contrast_resize"}
        timings = result["timings"]
        assert timings["preprocess"] > 0
        # the phases are parts of the preprocessing time measured around them
        parts = timings["read"] + timings["decode"] + timings["contrast_resize"]
        assert 0 < parts <= timings["preprocess"] + 4e-6  # four values each rounded to 1e-6
        png = Path(result["files"]["overlay"])
        assert png == tmp_path / "results" / str(job_id) / "heatmap.png" and png.is_file()
        ds = pydicom.dcmread(job.spool_path, stop_before_pixels=True)
        assert cv2.imread(str(png), cv2.IMREAD_GRAYSCALE).shape == (ds.Rows, ds.Columns)
        json.dumps(result)
        assert sorted(d.destination for d in store.list_deliveries(job_id=job_id)) == sorted(DESTINATIONS)
    states = {job_id: state for job_id, state, _, _ in events.finished}
    assert states == {**{j: "done" for j in good}, **{j: "dead" for j in bad}}
    assert worker.run_once() == 0


class FlakyEngine:
    """Wraps the real engine; fails any batch holding a poisoned image, and 2-image+ batches once."""

    def __init__(self, engine: InferenceEngine) -> None:
        self.engine = engine
        self.calls: list[int] = []

    @property
    def spec(self):  # type: ignore[no-untyped-def]
        return self.engine.spec

    def predict(self, batch, with_cam=True):  # type: ignore[no-untyped-def]
        self.calls.append(len(batch))
        if any(p.geometry.orig_h == 440 and p.geometry.orig_w == 440 for p in batch):  # the tibia
            raise RuntimeError("simulated inference crash")
        return self.engine.predict(batch, with_cam)


def test_one_bad_image_does_not_fail_the_others(store, engine, tmp_path, sample_files) -> None:
    ids = {f.name: enqueue(store, f) for f in sample_files}
    assert "cr_tibia_mono1_small.dcm" in ids
    flaky = FlakyEngine(engine)
    worker = make_worker(store, flaky, tmp_path)
    worker.run_once()
    assert flaky.calls[0] == len(sample_files) and flaky.calls[1:] == [1] * len(sample_files)
    for name, job_id in ids.items():
        job = store.get(job_id)
        if name == "cr_tibia_mono1_small.dcm":
            assert job.state == JobState.FAILED and "simulated inference crash" in job.last_error  # retried later
        else:
            assert job.state == JobState.DONE


def test_writer_failure_is_retried_then_dead(store, engine, tmp_path, sample_files) -> None:
    calls = {"n": 0}

    def broken_writer(ds, prepared, prediction, folder):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        raise OSError("disk on fire")

    job_id = enqueue(store, sample_files[0])
    worker = make_worker(store, engine, tmp_path, writer=broken_writer)
    for expected in (JobState.FAILED, JobState.FAILED, JobState.DEAD):  # max_attempts = 3, no backoff
        assert worker.run_once() == 1
        job = store.get(job_id)
        assert job.state == expected and "disk on fire" in job.last_error
        assert not (tmp_path / "results" / str(job_id)).exists(), "a failed attempt left an empty results folder"
    assert calls["n"] == 3 and worker.run_once() == 0


def test_result_object_that_cannot_be_built_goes_dead_at_once(store, engine, tmp_path, sample_files) -> None:
    """A DicomWriteError will not change on retry: the job is dead-lettered with the reason."""
    from pacs_ai.errors import DicomWriteError

    def refusing_writer(ds, prepared, prediction, folder):  # type: ignore[no-untyped-def]
        raise DicomWriteError("source has no Study Instance UID")

    job_id = enqueue(store, sample_files[0])
    worker = make_worker(store, engine, tmp_path, writer=refusing_writer)
    assert worker.run_once() == 1
    job = store.get(job_id)
    assert job.state == JobState.DEAD
    assert job.last_error.startswith("result_not_writable:") and "Study Instance UID" in job.last_error
    assert not (tmp_path / "results" / str(job_id)).exists(), "a dead job left an empty results folder"


def test_drain_processes_the_queue_in_batches_and_honours_stop(store, engine, tmp_path, sample_files) -> None:
    ids = [enqueue(store, sample_files[i % len(sample_files)]) for i in range(5)]
    worker = make_worker(store, engine, tmp_path, batch_size=2)
    stop = threading.Event()
    stop.set()
    assert worker.drain(stop) == 0
    assert all(store.get(i).state == JobState.QUEUED for i in ids)
    assert worker.drain(threading.Event()) == 5
    assert all(store.get(i).state == JobState.DONE for i in ids)


def test_jobs_claimed_when_stop_is_set_go_back_to_the_queue(store, engine, tmp_path, sample_files) -> None:
    stop = threading.Event()

    class StoppingStore:
        """Sets ``stop`` right after the claim (a shutdown arriving mid-batch)."""

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(store, name)

        def claim(self, *a, **k):  # type: ignore[no-untyped-def]
            jobs = store.claim(*a, **k)
            stop.set()
            return jobs

    job_id = enqueue(store, sample_files[0])
    worker = Worker(StoppingStore(), engine, png_writer, tmp_path / "r", DESTINATIONS, owner="w1")  # type: ignore[arg-type]
    assert worker.drain(stop) == 1
    job = store.get(job_id)
    assert job.state == JobState.QUEUED and job.attempts == 0


def test_worker_with_the_real_result_writer(store, engine, tmp_path, sample_files) -> None:
    from pacs_ai.write import results
    job_id = enqueue(store, sample_files[0])
    worker = make_worker(store, engine, tmp_path, writer=results.write_results)
    assert worker.run_once() == 1
    job = store.get(job_id)
    assert job.state == JobState.DONE, job.last_error
    files = job.result["files"]
    for key in ("sc", "sr"):
        assert Path(files[key]).is_file()
        assert pydicom.dcmread(files[key]).StudyInstanceUID == pydicom.dcmread(sample_files[0]).StudyInstanceUID


def test_drain_loads_the_next_batch_while_the_model_runs(store, engine, tmp_path, sample_files) -> None:
    """A burst: the batch after the first is claimed and decoded in the loader thread, and every job ends done."""
    ids = [enqueue(store, sample_files[i % len(sample_files)]) for i in range(7)]
    worker = make_worker(store, engine, tmp_path, batch_size=2)
    loaded_in: dict[int, str] = {}
    real_load = worker._load

    def recording_load(job):  # type: ignore[no-untyped-def]
        loaded_in[job.id] = threading.current_thread().name
        return real_load(job)

    worker._load = recording_load  # type: ignore[method-assign]
    assert worker.drain(threading.Event()) == 7
    assert [store.get(i).state for i in ids] == [JobState.DONE] * 7
    assert all(loaded_in[i] == threading.main_thread().name for i in ids[:2])  # the first batch: at once
    assert all(loaded_in[i].startswith("image-loader") for i in ids[2:])  # the rest: while the model ran


def test_a_prefetched_batch_goes_back_to_the_queue_when_stop_is_set(store, engine, tmp_path, sample_files) -> None:
    stop = threading.Event()
    claims = {"n": 0}

    class StopOnSecondClaim:
        """Sets ``stop`` right after the second claim (the prefetch): a shutdown in the middle of a burst."""

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(store, name)

        def claim(self, *a, **k):  # type: ignore[no-untyped-def]
            jobs = store.claim(*a, **k)
            claims["n"] += 1
            if claims["n"] == 2:
                stop.set()
            return jobs

    ids = [enqueue(store, sample_files[0]) for _ in range(4)]
    worker = Worker(StopOnSecondClaim(), engine, png_writer, tmp_path / "r", DESTINATIONS, owner="w1", batch_size=2)  # type: ignore[arg-type]
    assert worker.drain(stop) == 4
    for job_id in ids:
        job = store.get(job_id)
        assert job.state == JobState.QUEUED and job.attempts == 0 and job.lease_owner is None


def test_warm_up_runs_the_writer_now_or_hands_it_to_the_writer_thread(engine: InferenceEngine, tmp_path: Path) -> None:
    """Without ``background`` the writer's warm-up runs inside ``warm_up``; with it, ``warm_up`` returns
    after the codecs and the model and the writer runs when the background task does. Either way the
    writer sees one synthetic image with the model's own prediction and leaves nothing behind."""
    from pacs_ai.daemon.warmup import warm_up
    from pacs_ai.write.results import write_results

    calls: list[tuple[Any, ...]] = []

    def writer(*args: Any) -> WrittenResults:
        calls.append(args)
        return write_results(*args)

    timings = warm_up(engine, writer, tmp_path)
    assert set(timings) == {"codecs", "model", "writer"} and len(calls) == 1
    source, prepared, prediction, _ = calls[0]
    assert source.Modality == "CR" and prediction.model_name == engine.model_name
    assert list(tmp_path.iterdir()) == []

    tasks: list[Any] = []
    timings = warm_up(engine, writer, tmp_path, background=tasks.append)
    assert set(timings) == {"codecs", "model"} and len(tasks) == 1 and len(calls) == 1
    tasks[0]()
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []
