"""A synthetic model prediction for the result writers' tests: a fixed probability and a two-blob heat map
(the writers do not care where the map comes from). Used by test_write_dicom, test_header_copy and
test_result_numbering."""

from __future__ import annotations

import numpy as np

from pacs_ai.infer.engine import Prediction


def synthetic_cam(size: int = 224, cx: float = 0.6, cy: float = 0.4) -> np.ndarray:
    """A ``size`` x ``size`` float32 map: its maximum at (``cx``, ``cy``) of the network input, a weaker blob
    at (0.25, 0.75)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    main = np.exp(-(((xx - cx) / 0.08) ** 2 + ((yy - cy) / 0.06) ** 2))
    side = 0.45 * np.exp(-(((xx - 0.25) / 0.12) ** 2 + ((yy - 0.75) / 0.1) ** 2))
    return (main + side).astype(np.float32)


def synthetic_prediction(arch: str, fractured: bool, probability: float | None = None) -> Prediction:
    """Model ``fracture-<arch>`` version 1.2.3, threshold 0.42; probability 0.873 (fractured) or 0.062."""
    p = probability if probability is not None else (0.873 if fractured else 0.062)
    return Prediction(
        probability=p,
        fractured=fractured,
        threshold=0.42,
        label="fractured" if fractured else "not fractured",
        cam=synthetic_cam(),
        model_name=f"fracture-{arch}",
        model_version="1.2.3",
        architecture=arch,
        timings={"preprocess": 0.0, "forward": 0.0, "cam": 0.0},
    )
