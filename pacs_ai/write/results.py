"""The worker's ResultWriter: one classified image in, the SC, the SR and a PNG preview on disk.

``write_results(source, prepared, prediction, folder)`` finds the hottest region on the heat map (on the
picture's grid, scaled to original pixels: its coordinates go into the SR, and it is boxed on the picture
when a fracture is suspected),
renders the overlay once at the picture's size (long side at most ``SC_MAX_SIDE``, 1024 px; the heat map
is mapped straight onto that grid; ``prepared.display`` may already be that size), builds
the Secondary Capture and the Structured Report with deterministic UIDs, and writes ``sc.dcm``,
``sr.dcm`` and ``overlay.png`` into ``folder`` atomically
(temporary file, fsync, rename; one folder fsync for the three).

The picture and its PNG (OpenCV, which releases the interpreter lock) are made in a second thread while
this one builds the SR (highdicom, pure Python), so the two cores of a small machine share the work.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom

from pacs_ai.errors import DicomWriteError, StorageError
from pacs_ai.results import ResultFiles, WrittenResults
from pacs_ai.store.atomic import describe_os_error, fsync_dir, write_atomic
from pacs_ai.write.common import ModelInfo
from pacs_ai.write.overlay import SC_MAX_SIDE, Caption, hottest_region, picture_size, render_result_image
from pacs_ai.write.secondary_capture import build_secondary_capture
from pacs_ai.write.structured_report import build_structured_report
from pacs_ai.write.uids import derive_uid

__all__ = ["ROI_REL_THRESHOLD", "encode_dataset", "write_results"]

ROI_REL_THRESHOLD = 0.5
"""The hottest region is the blob of heat >= this fraction of the maximum around the maximum."""

def _write_all(files: dict[Path, bytes]) -> None:
    """Write each file atomically (temp + fsync + rename), then make the renames durable at once."""
    folders = {path.parent for path in files}
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        for path, data in files.items():
            write_atomic(path, data, sync_dir=False)
        for folder in folders:
            fsync_dir(folder)
    except OSError as exc:
        raise StorageError(describe_os_error(exc, next(iter(folders)))) from exc


def encode_dataset(ds: pydicom.Dataset) -> bytes:
    """A DICOM file (preamble, file meta, data set) as bytes."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


PREVIEW_MAX_SIDE = 1024
"""overlay.png is the SC picture downscaled to this long side (PNG-encoding 2048 px costs most of a second)."""


def _preview(rgb: np.ndarray) -> np.ndarray:
    """The SC picture as BGR for OpenCV, downscaled to PREVIEW_MAX_SIDE."""
    h, w = rgb.shape[:2]
    factor = PREVIEW_MAX_SIDE / max(h, w)
    if factor < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def _region_on_source(heat: np.ndarray, geometry: Any) -> tuple[int, int, int, int] | None:
    """The hottest region of ``heat`` (a heat map on the picture's grid) in source pixel coordinates
    (end exclusive), widened to whole source pixels; the same box as on a full-size map, within the
    picture's pixel size (about 2 source pixels for a 2140 px image in a 1024 px picture)."""
    box = hottest_region(heat, ROI_REL_THRESHOLD)
    if box is None:
        return None
    ph, pw = heat.shape
    sx, sy = geometry.orig_w / pw, geometry.orig_h / ph
    x0, y0 = int(np.floor(box[0] * sx)), int(np.floor(box[1] * sy))
    x1, y1 = min(geometry.orig_w, int(np.ceil(box[2] * sx))), min(geometry.orig_h, int(np.ceil(box[3] * sy)))
    return x0, y0, x1, y1


def write_results(source: pydicom.Dataset, prepared: Any, prediction: Any, folder: Path) -> WrittenResults:
    """Build and save the results of one classification; returns where they are and their UIDs.

    Returns ``WrittenResults``: ``files`` (``sc``, ``sr``, ``overlay`` paths, the SC's and SR's SOP and
    Series Instance UIDs, ``roi``: ``(x0, y0, x1, y1)`` in source pixel coordinates, end exclusive, or
    None when no fracture is suspected, and ``region``: the region the SR reports, ``roi`` when a fracture
    is suspected, else the heat map's hottest region, None (the whole image) when there is no heat map)
    and ``timings`` (seconds per step: roi, sr_build, overlay, png, picture_wait, sc_encode, fsync).
    Raises DicomWriteError (the objects cannot be built) or StorageError (they cannot be written).
    """
    folder = Path(folder)
    model = ModelInfo.from_prediction(prediction)
    try:
        probability = float(prediction.probability)
        threshold = float(prediction.threshold)
    except (TypeError, ValueError, AttributeError) as exc:
        raise DicomWriteError(f"the prediction has no usable probability/threshold: {exc}") from exc
    src_uid = str(source.get("SOPInstanceUID", "") or "")
    if not src_uid:
        raise DicomWriteError("the source image has no SOPInstanceUID")

    try:
        return _build_and_write(source, prepared, prediction, folder, model, probability, threshold, src_uid)
    except (DicomWriteError, StorageError, OSError, MemoryError):
        raise
    except Exception as exc:
        raise DicomWriteError(f"cannot build the result objects: {type(exc).__name__}: {exc}") from exc


def _picture(
    prepared: Any, prediction: Any, caption: Caption, roi: tuple[int, int, int, int] | None, heat: np.ndarray | None
) -> tuple[np.ndarray, bytes, dict[str, float]]:
    """The SC picture (RGB) and its PNG preview; ``heat`` is already on the picture's grid."""
    t = time.perf_counter()
    geometry = prepared.geometry
    rgb = render_result_image(
        prepared.display, heat, caption, roi=roi, heat_scale=getattr(prediction, "heat_scale", "relative"),
        max_side=SC_MAX_SIDE, source_size=(geometry.orig_h, geometry.orig_w),
    )
    t_png = time.perf_counter()
    ok, png = cv2.imencode(".png", _preview(rgb), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 RGB image
        raise DicomWriteError("cannot encode the overlay PNG")
    return rgb, png.tobytes(), {"overlay": t_png - t, "png": time.perf_counter() - t_png}


def _heat_on_picture(prepared: Any, prediction: Any) -> np.ndarray | None:
    cam = getattr(prediction, "cam", None)
    if cam is None:
        return None
    from pacs_ai.infer.preprocess import cam_to_original

    rows, columns = prepared.display.shape[:2]
    out_size = picture_size(rows, columns, SC_MAX_SIDE)
    return np.asarray(cam_to_original(np.asarray(cam, dtype=np.float32), prepared.geometry, out_size), dtype=np.float32)


_PICTURES = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sc-picture")
"""Renders SC pictures and PNG previews (OpenCV, which releases the GIL) while the SR is built."""


def _build_and_write(
    source: pydicom.Dataset,
    prepared: Any,
    prediction: Any,
    folder: Path,
    model: ModelInfo,
    probability: float,
    threshold: float,
    src_uid: str,
) -> WrittenResults:
    timings: dict[str, float] = {}
    fractured = bool(prediction.fractured)
    t = time.perf_counter()
    # The region goes into the SR in source pixels: found on the heat map on the picture's grid (the same
    # map the picture shows) and scaled to source pixels. It is the
    # suspected region when a fracture is suspected (also boxed on the SC), else the strongest
    # sub-threshold evidence (SR only: a box on a negative SC would read as a finding).
    heat = _heat_on_picture(prepared, prediction)
    region = _region_on_source(heat, prepared.geometry) if heat is not None else None
    roi = region if fractured else None
    timings["roi"] = time.perf_counter() - t
    # The picture (overlay + PNG) is rendered on another core while this thread builds the SR.
    picture = _PICTURES.submit(
        _picture, prepared, prediction, Caption(fractured, probability, threshold, model.display), roi, heat
    )
    uids = {kind: derive_uid(src_uid, model.version, kind) for kind in ("sc-series", "sc", "sr-series", "sr")}
    try:
        t = time.perf_counter()
        sr = build_structured_report(
            source,
            model,
            probability=probability,
            threshold=threshold,
            fractured=fractured,
            roi=region,
            series_instance_uid=uids["sr-series"],
            sop_instance_uid=uids["sr"],
        )
        try:
            sr_bytes = encode_dataset(sr)
        except Exception as exc:
            raise DicomWriteError(f"cannot encode the result objects: {exc}") from exc
        timings["sr_build"] = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        rgb, png, picture_timings = picture.result()  # always collected: no picture left running behind
        timings["picture_wait"] = time.perf_counter() - t
    timings.update(picture_timings)

    t = time.perf_counter()
    sc = build_secondary_capture(
        source, rgb, model, series_instance_uid=uids["sc-series"], sop_instance_uid=uids["sc"]
    )
    try:
        sc_bytes = encode_dataset(sc)
    except Exception as exc:
        raise DicomWriteError(f"cannot encode the result objects: {exc}") from exc
    del sc, rgb
    timings["sc_encode"] = time.perf_counter() - t

    t = time.perf_counter()
    paths = {"sc": folder / "sc.dcm", "sr": folder / "sr.dcm", "overlay": folder / "overlay.png"}
    _write_all({paths["sc"]: sc_bytes, paths["sr"]: sr_bytes, paths["overlay"]: png})
    timings["fsync"] = time.perf_counter() - t
    files = ResultFiles(
        sc=paths["sc"],
        sr=paths["sr"],
        overlay=paths["overlay"],
        sc_sop_instance_uid=uids["sc"],
        sr_sop_instance_uid=uids["sr"],
        sc_series_instance_uid=uids["sc-series"],
        sr_series_instance_uid=uids["sr-series"],
        roi=(int(roi[0]), int(roi[1]), int(roi[2]), int(roi[3])) if roi is not None else None,
        region=(int(region[0]), int(region[1]), int(region[2]), int(region[3])) if region is not None else None,
    )
    return WrittenResults(files, timings)
