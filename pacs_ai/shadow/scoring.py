"""Shadow models: further models that score every analysed image beside the live model, never sent.

The worker decodes each image once. Its live model's network input (``Prepared``) is reused by every
shadow model with the same input specification; a shadow with another specification (input size,
CLAHE...) gets its input prepared from the same decoded grey image, so no image is decoded twice.
Shadows run without Grad-CAM. Their results are stored in the job's result (``JobResult.shadow``: one
``ShadowScore`` per shadow model: ``model_name``, ``model_version``, ``probability``, ``fractured``,
``threshold``, or ``error``) and nothing of them is written to DICOM or sent. A shadow that fails never
fails the job: its entry carries the error instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pacs_ai.infer.engine import InferenceEngine
from pacs_ai.infer.preprocess import InputSpec, Prepared, prepare
from pacs_ai.results import ShadowScore

__all__ = ["ShadowScorer", "load_shadow_scorer"]

log = logging.getLogger(__name__)


class ShadowScorer:
    """One engine per shadow model folder; used from the worker's thread."""

    def __init__(self, engines: Sequence[InferenceEngine]) -> None:
        self.engines = list(engines)

    def needs_gray(self, live_spec: InputSpec) -> bool:
        """True when some shadow needs its own input made from the decoded grey image."""
        return any(e.spec != live_spec for e in self.engines)

    def inputs(self, gray: np.ndarray | None, live_spec: InputSpec, live: Prepared) -> list[Prepared]:
        """The network input of each shadow for one image: the live one when the specs match."""
        out = []
        for engine in self.engines:
            if engine.spec == live_spec:
                out.append(live)
            else:
                if gray is None:
                    raise ValueError("a shadow with its own input specification needs the decoded image")
                out.append(prepare(gray, engine.spec, source_size=(live.geometry.orig_h, live.geometry.orig_w)))
        return out

    def score(self, inputs: Sequence[Sequence[Prepared]]) -> list[list[ShadowScore]]:
        """``inputs[i][k]``: image i's input for shadow k -> ``results[i][k]`` (see the module docstring)."""
        results: list[list[ShadowScore]] = [[] for _ in inputs]
        for k, engine in enumerate(self.engines):
            t0 = time.perf_counter()
            try:
                predictions = engine.predict([item[k] for item in inputs], with_cam=False)
            except Exception as exc:  # noqa: BLE001 - a shadow must never fail the job
                log.warning("shadow model %s %s failed on a batch of %d: %s", engine.model_name, engine.model_version, len(inputs), exc)
                for row in results:
                    row.append(ShadowScore(engine.model_name, engine.model_version, error=f"{type(exc).__name__}: {exc}"))
                continue
            seconds = (time.perf_counter() - t0) / max(1, len(inputs))
            for row, p in zip(results, predictions, strict=True):
                row.append(
                    ShadowScore(
                        model_name=p.model_name,
                        model_version=p.model_version,
                        architecture=p.architecture,
                        probability=float(p.probability),
                        fractured=bool(p.fractured),
                        threshold=float(p.threshold),
                        seconds=round(seconds, 6),
                    )
                )
        return results


def load_shadow_scorer(paths: Sequence[Path], *, device: str, batch_size: int, threads: int) -> ShadowScorer | None:
    """Load each shadow model folder (raises ModelError like the live model); None when there are none."""
    if not paths:
        return None
    engines = [InferenceEngine([p], device=device, batch_size=batch_size, threads=threads) for p in paths]
    for e in engines:
        log.info("shadow model loaded: %s %s (%s) from its folder; results stored, never sent", e.model_name, e.model_version, e.architecture)
    return ShadowScorer(engines)
