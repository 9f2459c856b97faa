"""Study completion: turn a due study (see ``pacs_ai.studies.store``) into a study result and its SR.

``StudyProcessor.run_once()`` asks the store for due studies and, for each one:

1. reads the headers (no pixels) of its analysed images from the spool, in the order received;
2. computes the study probability with the study rule (``pacs_ai.studies.rules``) and the finding with
   the study threshold;
3. writes ``<results>/studies/<StudyInstanceUID>/study-sr.dcm`` (atomically; same UIDs for every
   revision, see ``pacs_ai.studies.report``);
4. records the result (revision + 1) and one pending delivery per destination in one transaction.

Per-image results are not held back: they go out as each image is done. A study whose images are all
skipped or dead gets no study result. Errors are logged and the study is tried again next round.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from pacs_ai.errors import ModelError, PacsAiError, ResultFormatError, StorageError
from pacs_ai.queue.jobstore import JobState
from pacs_ai.results import StudyImage, StudyLeftOut, StudyResult
from pacs_ai.store.atomic import describe_os_error, write_atomic
from pacs_ai.studies.report import ImageFinding, StudyFinding, build_study_report
from pacs_ai.studies.rules import RULES, aggregate
from pacs_ai.studies.store import StudyStore
from pacs_ai.write.common import ModelInfo
from pacs_ai.write.results import encode_dataset

__all__ = ["StudyPolicy", "StudyProcessor", "read_card", "study_policy"]

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^0-9A-Za-z.\-]")


@dataclass(frozen=True)
class StudyPolicy:
    """How a study's images make its finding: ``rule`` (max, mean, noisy_or) and ``threshold``."""

    rule: str
    threshold: float
    source: str
    """Where the rule and threshold come from, for logs and ``studies show``."""


def study_policy(card: Mapping[str, Any], rule_override: str = "") -> StudyPolicy:
    """The card's ``study`` section, or max with the image threshold when it has none.

    ``card``: the model card as a mapping (``ModelCard.to_dict()`` or ``model.json`` as read, so the serve
    process needs no torch). ``rule_override`` (``[studies] rule``) replaces the card's rule; its threshold
    is then the card's study threshold when the card chose that same rule, else the image threshold.
    Raises ModelError when the card lacks a usable threshold or names an unknown rule.
    """
    study = card.get("study") or {}
    card_rule = str(study.get("rule") or "")
    rule = rule_override or card_rule or "max"
    if rule not in RULES:
        raise ModelError(f"model card: study.rule: unknown study rule {rule!r} (known: {', '.join(RULES)})")
    try:
        if rule == card_rule:
            return StudyPolicy(rule, float(study["threshold"]), f"model card {card.get('name')} {card.get('version')} (study section)")
        source = f"{'[studies] rule' if rule_override else 'default'} with the image threshold"
        return StudyPolicy(rule, float(card["threshold"]), source)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model card: no usable study or image threshold: {exc}") from exc


def read_card(folder: Path) -> dict[str, Any]:
    """``folder/model.json`` as a plain mapping (no torch import); raises ModelError."""
    path = Path(folder) / "model.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the model card: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the model card is not a JSON object")
    return data


def _folder_name(uid: str) -> str:
    return _SAFE.sub("_", uid)[:64] or "unknown"


class StudyProcessor:
    """See the module docstring."""

    def __init__(
        self,
        studies: StudyStore,
        results_dir: Path,
        destinations: Sequence[str],
        policy: StudyPolicy,
        *,
        quiet_period_s: float,
    ) -> None:
        self.studies = studies
        self.results_dir = Path(results_dir)
        self.destinations = tuple(destinations)
        self.policy = policy
        self.quiet_period_s = float(quiet_period_s)

    def run_once(self) -> int:
        """Complete every due study; returns how many got a new result."""
        done = 0
        for uid in self.studies.due(self.quiet_period_s):
            try:
                if self.complete(uid) is not None:
                    done += 1
            except PacsAiError as exc:
                log.error("study %s: no study result this round: %s", uid, exc)
            except Exception:
                log.exception("study %s: no study result this round", uid)
        return done

    def complete(self, study_instance_uid: str) -> int | None:
        """Make and record the study result now; returns its revision, or None when no image of the
        study has a usable result."""
        jobs = self.studies.study_jobs(study_instance_uid)
        record = self.studies.get(study_instance_uid)
        forced = record is not None and record.forced_at is not None
        findings: list[ImageFinding] = []
        images: list[StudyImage] = []
        left_out: list[StudyLeftOut] = []
        model: ModelInfo | None = None
        for job in jobs:
            try:
                job_result = job.job_result()
            except ResultFormatError as exc:
                left_out.append(StudyLeftOut(job.id, job.sop_instance_uid, "unreadable", str(exc)))
                continue
            c = job_result.classification if job_result is not None else None
            if job.state != JobState.DONE or c is None:
                routing = job_result.routing if job_result is not None else None
                reason = (routing.rule if routing is not None else None) if job.state == JobState.SKIPPED else job.last_error
                left_out.append(StudyLeftOut(job.id, job.sop_instance_uid, str(job.state), reason))
                continue
            try:
                header = pydicom.dcmread(job.spool_path, stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - e.g. purged spool file
                left_out.append(StudyLeftOut(job.id, job.sop_instance_uid, "unreadable", str(exc)))
                continue
            # the region the image's own SR reports (the whole image when None)
            roi = job_result.files.region if job_result is not None and job_result.files is not None else None
            findings.append(
                ImageFinding(
                    header,
                    c.probability,
                    c.fractured,
                    c.threshold,
                    (float(roi[0]), float(roi[1]), float(roi[2]), float(roi[3])) if roi is not None else None,
                )
            )
            model = ModelInfo(c.model_name or "fracture-classifier", c.model_version or "0", c.architecture)
            images.append(StudyImage(job.id, job.sop_instance_uid, job.series_instance_uid, c.probability, c.fractured))
        if not findings or model is None:
            return None
        probability = aggregate(self.policy.rule, [f.probability for f in findings])
        fractured = probability >= self.policy.threshold
        revision = (record.revision if record is not None else 0) + 1
        sr = build_study_report(
            findings, StudyFinding(probability, fractured, self.policy.threshold, self.policy.rule), model, revision=revision
        )
        path = self.results_dir / "studies" / _folder_name(study_instance_uid) / "study-sr.dcm"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(describe_os_error(exc, path.parent)) from exc
        write_atomic(path, encode_dataset(sr))
        through = max((j.finished_at for j in jobs if j.finished_at is not None), default=None)
        result = StudyResult(
            probability=float(probability),
            fractured=bool(fractured),
            threshold=float(self.policy.threshold),
            rule=self.policy.rule,
            rule_source=self.policy.source,
            model_name=model.name,
            model_version=model.version,
            sr=path,
            sr_sop_instance_uid=str(sr.SOPInstanceUID),
            sr_series_instance_uid=str(sr.SeriesInstanceUID),
            images=tuple(images),
            not_analysed=tuple(left_out),
            forced=forced,
        )
        finished = sum(1 for j in jobs if j.finished_at is not None)
        stored = self.studies.record(study_instance_uid, result.to_json(), through, finished, self.destinations)
        log.info(
            "study %s %s (revision %d%s): %s, P=%.3f by %s over %d image(s)%s",
            study_instance_uid,
            "completed" if stored == 1 else "result replaced",
            stored,
            ", forced by an admin" if forced else "",
            "fracture suspected" if fractured else "no fracture detected",
            probability,
            self.policy.rule,
            len(findings),
            f", {len(left_out)} not analysed" if left_out else "",
        )
        return stored
