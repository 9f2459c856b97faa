"""``pacs-ai classify FILE...``: classify DICOM or JPEG/PNG files offline, without the daemon.

Loads the model folder(s) once (default: the bundled model; several ``--model`` make an ensemble),
classifies the files in batches and prints one line per file (or, with ``--json``, a JSON list). With
``--cam-out DIR`` it writes a heat-map overlay PNG per file (the grey image with the Grad-CAM heat map in
colour and a caption, as in the Secondary Capture). A file that cannot be read or decoded gets an error
line naming the file and the reason; the others are still classified, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``classify`` to the parser."""
    p = subparsers.add_parser(
        "classify",
        help="classify DICOM or image files offline (no daemon) and write heat-map overlays",
        description="Classify DICOM (any supported transfer syntax) or JPEG/PNG radiographs for fractures, "
        "without the daemon. Exit status 1 when any file could not be classified.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="DICOM, JPEG or PNG files")
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        metavar="DIR",
        help="model folder (repeat for an ensemble; default: the bundled model)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default 8)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    p.add_argument("--cam-out", type=Path, metavar="DIR", help="write heat-map overlay PNGs into DIR")
    p.set_defaults(func=run)


def _chunks(items: Sequence[Path], n: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _overlay_path(out_dir: Path, src: Path, used: set[str]) -> Path:
    stem = src.stem or "image"
    name = f"{stem}_cam.png"
    k = 2
    while name in used:
        name = f"{stem}_{k}_cam.png"
        k += 1
    used.add(name)
    return out_dir / name


def _write_overlay(path: Path, prepared: Any, prediction: Any) -> None:
    import cv2

    from pacs_ai.infer.preprocess import cam_to_original
    from pacs_ai.write.overlay import Caption, render_result_image

    heat = cam_to_original(prediction.cam, prepared.geometry)
    caption = Caption(
        prediction.fractured,
        prediction.probability,
        prediction.threshold,
        f"{prediction.model_name} {prediction.model_version}",
    )
    rgb = render_result_image(prepared.display, heat, caption, heat_scale=getattr(prediction, "heat_scale", "relative"))
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def run(args: argparse.Namespace) -> int:
    import time

    from pacs_ai.cli.common import print_json
    from pacs_ai.config import BUNDLED_MODEL
    from pacs_ai.errors import InputError
    from pacs_ai.infer.engine import InferenceEngine
    from pacs_ai.infer.preprocess import prepare, read_gray

    if args.batch_size < 1:
        print("pacs-ai classify: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    engine = InferenceEngine(args.model or [BUNDLED_MODEL], device=args.device, batch_size=args.batch_size, threads=args.threads)
    with_cam = args.cam_out is not None
    if with_cam:
        args.cam_out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    records: list[dict[str, Any]] = []
    failed = 0

    def report_error(path: Path, reason: str, detail: str) -> None:
        nonlocal failed
        failed += 1
        detail = " ".join(str(detail).split())  # one line per file, whatever the decoder said
        records.append({"file": str(path), "ok": False, "reason": reason, "error": f"{reason}: {detail}"})
        print(f"{path}: error: {reason}: {detail}", file=sys.stderr)

    for chunk in _chunks(list(args.files), engine.batch_size):
        ready = []
        for path in chunk:
            t0 = time.perf_counter()
            try:
                gray = read_gray(path)
                prepared = prepare(gray, engine.spec)
            except InputError as exc:
                report_error(path, exc.reason, exc.detail)
                continue
            prepared.extra["preprocess_s"] = time.perf_counter() - t0
            ready.append((path, prepared))
        if not ready:
            continue
        predictions = engine.predict([p for _, p in ready], with_cam=with_cam)
        for (path, prepared), pred in zip(ready, predictions, strict=True):
            record: dict[str, Any] = {"file": str(path), "ok": True, **pred.to_dict()}
            if with_cam:
                out = _overlay_path(args.cam_out, path, used)
                try:
                    _write_overlay(out, prepared, pred)
                    record["overlay"] = str(out)
                except (OSError, ValueError) as exc:
                    report_error(path, "overlay_failed", str(exc))
                    continue
            records.append(record)
            if not args.json:
                extra = f"  overlay {record['overlay']}" if "overlay" in record else ""
                print(
                    f"{path}: {pred.label}  P(fracture)={pred.probability:.4f}  threshold={pred.threshold:.4f}  "
                    f"model {pred.model_name} {pred.model_version}{extra}"
                )
    if args.json:
        print_json(records)
    return 1 if failed else 0
