"""The worker: claim queued jobs, classify and explain them in batches, store the results.

``Worker.run_once()`` claims up to ``batch_size`` jobs and, for each one:

0. reads the spooled DICOM file's header and asks the router (``pacs_ai.route``) whether the image is to
   be analysed; an image outside the rules ends ``skipped`` with the deciding rule, before any pixel is
   decoded, and nothing is sent for it;
1. preprocesses the image (and, with shadow models, their inputs from the same decoded image) with the engine's ``InputSpec``. An image that can
   never be processed (``InputError``: undecodable pixel data, unsupported photometric interpretation,
   not DICOM at all, ...) fails its job *permanently* (straight to dead) with ``"reason: detail"``;
2. runs the engine on all the good images of the batch at once (one forward + Grad-CAM);
3. calls the result writer (Secondary Capture, SR, overlay PNG...) with a folder
   ``results_dir/<job id>`` and marks the job done with its result and one delivery per destination.

Anything unexpected fails only the job it happened to, as a retryable failure (backoff, then dead after
the store's ``max_attempts``); when the batched forward itself fails, each image is retried alone so one
bad image cannot take the others down. A job whose lease was lost (another worker took it over) is left
alone. ``drain(stop)`` repeats ``run_once`` until the queue is empty or ``stop`` is set; jobs claimed but
not yet classified when ``stop`` is set are released back to the queue.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from pacs_ai.errors import DicomWriteError, InputError, LeaseLostError
from pacs_ai.infer.engine import InferenceEngine, Prediction
from pacs_ai.infer.preprocess import Prepared, dicom_to_gray, prepare
from pacs_ai.ops.events import NullObserver, Observer
from pacs_ai.queue.jobstore import Job, JobStore
from pacs_ai.results import Classification, JobResult, RoutingOutcome, ShadowScore, WrittenResults
from pacs_ai.route.facts import ImageFacts
from pacs_ai.route.rules import Decision, Router
from pacs_ai.shadow.scoring import ShadowScorer

__all__ = ["ResultWriter", "Worker", "job_result", "routing_outcome"]

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.0002
"""The interpreter's thread switch interval (``sys.setswitchinterval``) in a process that runs a worker.

torch releases the interpreter lock inside each operator but takes it back between operators; while the
loader or writer thread runs Python (pydicom, highdicom's SR), the forward thread waits up to the switch
interval for it at every operator (CPython's default 5 ms). On the project's 2-core VM the bundled
ResNet-50 at 512 px (one thread) took 0.36 s alone, 1.40 s beside a thread running Python at 5 ms and
0.44 s at 0.2 ms, the Python thread at about the same speed either way (``benchmarks/bench_switch_interval.py``)."""

ResultWriter = Callable[[pydicom.Dataset, Prepared, Prediction, Path], WrittenResults]
"""``writer(source_dataset, prepared, prediction, folder) -> WrittenResults`` (the files it wrote, its timings)."""


def job_result(
    prediction: Prediction,
    written: WrittenResults,
    phases: Mapping[str, float] | None = None,
    *,
    routing: RoutingOutcome | None = None,
    shadow: Sequence[ShadowScore] = (),
) -> JobResult:
    """The result stored with a done job.

    ``timings`` (seconds) holds the prediction's (preprocess, forward, cam), the preprocessing ``phases``
    the worker measured, and the writer's own (``written.timings``).
    """
    timings = {**prediction.timings, **(phases or {}), **written.timings}
    return JobResult(
        classification=Classification.of(prediction),
        files=written.files,
        timings={k: float(v) for k, v in timings.items()},
        routing=routing,
        shadow=tuple(shadow),
    )


def routing_outcome(decision: Decision) -> RoutingOutcome:
    """The part of a routing decision stored with the job (without the trace)."""
    return RoutingOutcome(decision.action, decision.rule, decision.reason)


def _drop_decoded_pixels(ds: pydicom.Dataset) -> None:
    """Forget pydicom's cached decoded pixel array (the writer works from ``Prepared.display``)."""
    if getattr(ds, "_pixel_array", None) is not None:
        ds._pixel_array = None
        ds._pixel_id = {}


@dataclass
class _Item:
    job: Job
    dataset: pydicom.Dataset
    prepared: Prepared
    routing: RoutingOutcome | None = None
    shadow_inputs: list[Prepared] | None = None
    shadow_results: list[ShadowScore] | None = None


class Worker:
    """Turns claimed jobs into results; one instance per process, used from one thread at a time."""

    def __init__(
        self,
        jobs: JobStore,
        engine: InferenceEngine,
        writer: ResultWriter,
        results_dir: Path,
        destinations: Sequence[str],
        *,
        owner: str,
        batch_size: int = 8,
        lease_seconds: float = 300.0,
        observer: Observer | None = None,
        router: Router | None = None,
        shadow: ShadowScorer | None = None,
        display_max_side: int | None = None,
    ) -> None:
        """``display_max_side``: the long side (pixels) of the picture the writer makes
        (``pacs_ai.write.overlay.SC_MAX_SIDE``); with it, images are decoded and kept only at the
        resolution needed (a reduced JPEG 2000 level, ``Prepared.display`` at the picture's size). None:
        decoded and kept at full resolution."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.jobs = jobs
        self.engine = engine
        self.writer = writer
        self.results_dir = Path(results_dir)
        self.destinations = tuple(destinations)
        self.owner = owner
        self.batch_size = int(batch_size)
        self.lease_seconds = float(lease_seconds)
        self.observer: Observer = observer or NullObserver()
        self.router = router
        self.shadow = shadow
        self.display_max_side = display_max_side
        # The decode must keep at least the picture's and every model input's long side.
        self.min_long_side = (
            max([display_max_side, engine.spec.size, *(e.spec.size for e in (shadow.engines if shadow else ()))])
            if display_max_side is not None
            else None
        )
        self._stop: threading.Event | None = None
        # Writing results (SC, SR, PNG, fsyncs) of batch n overlaps the forward pass of batch n+1.
        self._writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="result-writer")
        # Reading and decoding the next batch overlaps the forward pass of this one (drain).
        self._loader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-loader")
        self._writing: list[Future[None]] = []

    # -- loop ---------------------------------------------------------------------------------------

    def drain(self, stop: threading.Event | None = None) -> int:
        """``run_once`` until nothing is claimable or ``stop`` is set; returns the number of jobs claimed.

        The next batch is claimed and read + decoded in a second thread while the current one goes
        through the model (decoders and torch release the interpreter lock), and each batch's results
        are written in a third while the next is processed, so a burst keeps both cores busy.
        """
        total = 0
        self._stop = stop
        prefetched: Future[list[_Item]] | None = None
        try:
            while not (stop is not None and stop.is_set()):
                if prefetched is not None:
                    items, prefetched = prefetched.result(), None
                else:
                    claimed = self.jobs.claim(self.owner, self.batch_size, self.lease_seconds)
                    if not claimed:
                        break
                    total += len(claimed)
                    items = self._load_all(claimed)
                following = self.jobs.claim(self.owner, self.batch_size, self.lease_seconds)
                if following:
                    total += len(following)
                    prefetched = self._loader_pool.submit(self._load_all, following)
                self._run_items(items)
        finally:
            if prefetched is not None:  # stopped with a batch loaded but not run: back to the queue
                for item in prefetched.result():
                    self._release(item.job)
            self._wait_for_writes()
            self._stop = None
        return total

    def warm_writer(self, task: Callable[[], None]) -> None:
        """Run ``task`` (the result writer's warm-up) in the writer thread; the first batch's results are
        written after it."""
        self._writing.append(self._writer_pool.submit(task))

    def _wait_for_writes(self) -> None:
        """Block until the results of the previous batch are written and their jobs completed."""
        for future in self._writing:
            future.result()  # _finish handles its own errors; this only waits
        self._writing = []

    def run_once(self, *, wait: bool = True) -> int:
        """Claim up to ``batch_size`` jobs and process them as one batch; returns how many were claimed.

        With ``wait=False`` the batch's results are written in the background while the caller goes on
        to the next batch (at most one batch is being written at a time); ``drain`` does this.
        """
        claimed = self.jobs.claim(self.owner, self.batch_size, self.lease_seconds)
        if not claimed:
            return 0
        try:
            self._process(claimed)
        finally:
            if wait:
                self._wait_for_writes()
        return len(claimed)

    def _process(self, claimed: list[Job]) -> None:
        self._run_items(self._load_all(claimed))

    def _load_all(self, claimed: list[Job]) -> list[_Item]:
        """Read and preprocess each claimed job's image (failed or skipped jobs are recorded, not returned)."""
        items: list[_Item] = []
        for job in claimed:
            item = self._load(job)
            if item is not None:
                items.append(item)
        return items

    def _run_items(self, items: list[_Item]) -> None:
        """Model (and shadows) on loaded items, then their results written in the background."""
        if items and self._stop is not None and self._stop.is_set():
            for item in items:
                self._release(item.job)
            return
        if not items:
            return
        predictions = self._predict(items)
        scored = [(item, p) for item, p in zip(items, predictions, strict=True) if p is not None]
        if self.shadow is not None and scored:  # same pass, same decoded images; stored, never sent
            shadows = self.shadow.score([item.shadow_inputs or [] for item, _ in scored])
            for (item, _), result in zip(scored, shadows, strict=True):
                item.shadow_results = result
        self._wait_for_writes()
        done = scored
        self._writing.append(self._writer_pool.submit(self._finish_all, done))

    def _finish_all(self, done: list[tuple[_Item, Prediction]]) -> None:
        for item, prediction in done:
            try:
                self._finish(item, prediction)
            except Exception:  # e.g. the database went away: the job's lease expires and it is retried
                log.exception("job %s: could not record its result; it will be retried", item.job.id)

    # -- steps --------------------------------------------------------------------------------------

    def _load(self, job: Job) -> _Item | None:
        """Read and preprocess one job's image; on failure fail the job and return None."""
        t0 = time.perf_counter()
        try:
            try:
                ds = pydicom.dcmread(job.spool_path)
            except InvalidDicomError as exc:
                raise InputError("unreadable_dicom", f"the spooled file is not DICOM: {exc}") from exc
            routing = None
            if self.router is not None:
                decision = self.router.decide(ImageFacts.from_dataset(ds, job.calling_aet))
                if not decision.analyse:
                    self._skip(job, decision)
                    return None
                routing = routing_outcome(decision)
            t_read = time.perf_counter()
            gray = dicom_to_gray(ds, min_long_side=self.min_long_side)
            t_gray = time.perf_counter()
            prepared = prepare(
                gray,
                self.engine.spec,
                source_size=(int(ds.Rows), int(ds.Columns)),
                display_max_side=self.display_max_side,
            )
            shadow_inputs = self.shadow.inputs(gray, self.engine.spec, prepared) if self.shadow is not None else None
            del gray
            _drop_decoded_pixels(ds)
        except InputError as exc:
            self._fail(job, str(exc), permanent=True)
            return None
        except (KeyboardInterrupt, SystemExit):
            raise
        # Anything else is retried later; BaseException because native decoders may raise panics
        # (pyo3's PanicException) that do not derive from Exception.
        except BaseException as exc:  # noqa: BLE001
            self._fail(job, f"preprocessing failed: {type(exc).__name__}: {exc}", permanent=False)
            return None
        t_end = time.perf_counter()
        prepared.extra["preprocess_s"] = t_end - t0
        prepared.extra["phases"] = {
            "read": t_read - t0,  # dcmread (+ routing decision)
            "decode": t_gray - t_read,  # pixel data decoding (reduced J2K level), modality/VOI LUTs, MONOCHROME1
            "contrast_resize": t_end - t_gray,  # uint8, resize (model input, SC picture), CLAHE, normalise
        }
        return _Item(job, ds, prepared, routing, shadow_inputs)

    def _predict(self, items: list[_Item]) -> list[Prediction | None]:
        """Predictions in order; an image the engine fails on is failed alone (None in its slot)."""
        try:
            return list(self.engine.predict([it.prepared for it in items]))
        except Exception as exc:  # noqa: BLE001
            if len(items) == 1:
                self._fail(items[0].job, f"inference failed: {type(exc).__name__}: {exc}", permanent=False)
                return [None]
            log.warning("batched inference of %d images failed (%s); retrying one by one", len(items), exc)
        out: list[Prediction | None] = []
        for item in items:
            try:
                out.append(self.engine.predict([item.prepared])[0])
            except Exception as exc:  # noqa: BLE001
                self._fail(item.job, f"inference failed: {type(exc).__name__}: {exc}", permanent=False)
                out.append(None)
        return out

    def _finish(self, item: _Item, prediction: Prediction) -> None:
        job = item.job
        folder = self.results_dir / str(job.id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            written = self.writer(item.dataset, item.prepared, prediction, folder)
            result = job_result(
                prediction,
                written,
                item.prepared.extra.get("phases"),
                routing=item.routing,
                shadow=item.shadow_results or (),
            )
        except InputError as exc:
            _remove_if_empty(folder)
            self._fail(job, str(exc), permanent=True)
            return
        except DicomWriteError as exc:  # the source lacks what the result objects need: will not change
            _remove_if_empty(folder)
            self._fail(job, f"result_not_writable: {exc}", permanent=True)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. StorageError (disk full): retried with backoff
            _remove_if_empty(folder)
            self._fail(job, f"writing results failed: {type(exc).__name__}: {exc}", permanent=False)
            return
        try:
            self.jobs.complete(job.id, self.owner, result, self.destinations)
        except LeaseLostError as exc:
            log.warning("job %s: result not stored: %s", job.id, exc)
            return
        log.info(
            "job %s done: %s (p=%.3f, threshold %.3f) in %.2f s",
            job.id,
            prediction.label,
            prediction.probability,
            prediction.threshold,
            sum(prediction.timings.values()),
        )
        self.observer.job_finished(job.id, "done", prediction.timings.get("forward", 0.0), prediction.timings.get("cam", 0.0))

    def _fail(self, job: Job, reason: str, *, permanent: bool) -> None:
        try:
            state = self.jobs.fail(job.id, self.owner, reason, permanent=permanent)
        except LeaseLostError as exc:
            log.warning("job %s: failure not recorded: %s", job.id, exc)
            return
        state_name = str(getattr(state, "value", state) or ("dead" if permanent else "failed"))
        log.warning("job %s %s: %s", job.id, state_name, reason)
        self.observer.job_finished(job.id, state_name, 0.0, 0.0)

    def _skip(self, job: Job, decision: Decision) -> None:
        try:
            self.jobs.skip(job.id, self.owner, JobResult.skipped(routing_outcome(decision)))
        except LeaseLostError as exc:
            log.warning("job %s: skip not recorded: %s", job.id, exc)
            return
        log.info("job %s skipped by routing rule %s: %s", job.id, decision.rule, decision.reason)
        self.observer.job_finished(job.id, "skipped", 0.0, 0.0)

    def _release(self, job: Job) -> None:
        try:
            self.jobs.release(job.id, self.owner)
        except LeaseLostError as exc:
            log.warning("job %s: not released: %s", job.id, exc)


def _remove_if_empty(folder: Path) -> None:
    """Remove a job's results folder that the failed attempt left empty (a dead job leaves no empty folder)."""
    with contextlib.suppress(OSError):
        folder.rmdir()  # only succeeds when empty
