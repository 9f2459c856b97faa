"""Job results for tests that complete or skip jobs by hand.

``JobStore.complete``/``skip`` take a typed :class:`pacs_ai.results.JobResult`; tests write the stored
document's shape (``{"probability": ..., "files": {...}}``, ``{"routing": {...}}``; see ``pacs_ai.results``)
and this reads it into one. Keys the shape does not know are ignored, so ``job_result({})`` is an empty result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pacs_ai.results import JobResult


def job_result(doc: Mapping[str, Any] | None = None) -> JobResult:
    """The JobResult a stored result document ``doc`` reads as (None or ``{}``: an empty result)."""
    return JobResult.from_json(dict(doc or {}))
