"""The typed records of a job's result: what the writer hands the worker, and what is stored with a job.

Who makes and who reads them:

- ``WrittenResults`` (``ResultFiles`` + the writer's step timings): ``pacs_ai.write.results.write_results``
  returns it to the worker (``pacs_ai.daemon.worker.ResultWriter``).
- ``JobResult``: the worker stores it with a done job (``Classification`` + ``ResultFiles`` + timings,
  the routing ``RoutingOutcome`` and the ``ShadowScore`` of each shadow model) or a skipped one (only
  ``routing``), passing it to ``JobStore.complete``/``skip``. Deliveries, studies, the shadow report, the
  dashboard and the CLI read it back with ``job.job_result()`` (``JobResult.read`` of the stored JSON).

The job store keeps the result as one JSON document. ``to_json`` writes ONE shape (below); ``from_json``
reads that shape, and also the shapes written by earlier versions (see ``_upgrade``), so rows stored before
this module existed still read::

    {"probability": 0.93, "fractured": true, "label": "fractured", "threshold": 0.5,
     "model_name": "...", "model_version": "...", "architecture": "densenet121",
     "timings": {"forward": 0.05, ...},                         # seconds per step
     "files": {"sc": "/.../sc.dcm", "sr": "/.../sr.dcm", "overlay": "/.../overlay.png",
               "sc_sop_instance_uid": "...", "sr_sop_instance_uid": "...",
               "series_instance_uids": {"sc": "...", "sr": "..."},
               "roi": [x0, y0, x1, y1],                           # source pixels, end exclusive, or null
               "region": [x0, y0, x1, y1]},                       # the SR's region (null: whole image),
                                                                  # only where it is not the roi
     "routing": {"action": "analyse", "rule": "...", "reason": "..."},   # when a router decided
     "shadow": [{"model_name": "...", "model_version": "...", "architecture": "...",
                 "probability": 0.4, "fractured": false, "threshold": 0.5, "seconds": 0.03}
                | {"model_name": "...", "model_version": "...", "error": "..."}]}

A skipped job's result is ``{"routing": {...}}``. Unknown keys are ignored on reading (never written).
A document that is not an object, or whose fields have the wrong types, raises ``ResultFormatError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pacs_ai.errors import ResultFormatError

__all__ = [
    "Classification",
    "JobResult",
    "ResultFiles",
    "ResultFormatError",
    "RoutingOutcome",
    "ShadowScore",
    "StudyImage",
    "StudyLeftOut",
    "StudyResult",
    "WrittenResults",
]


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ResultFormatError(f"job result field {name!r}: expected a string, got {type(value).__name__}")
    return value


def _opt_str(value: Any, name: str) -> str | None:
    return None if value is None else _str(value, name)


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResultFormatError(f"job result field {name!r}: expected a number, got {type(value).__name__}")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ResultFormatError(f"job result field {name!r}: expected true/false, got {type(value).__name__}")
    return value


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ResultFormatError(f"job result field {name!r}: expected an object, got {type(value).__name__}")
    return value


def _timings(value: Any, name: str = "timings") -> dict[str, float]:
    """Seconds per step; entries that are not numbers are dropped (earlier versions stored none)."""
    if value is None:
        return {}
    return {
        str(k): float(v) for k, v in _mapping(value, name).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@dataclass(frozen=True)
class ResultFiles:
    """Where the result objects of one image are and what their UIDs are (all optional but at least one file).

    ``sc``/``sr``: the Secondary Capture and the Structured Report (DICOM files, delivered in this order);
    ``overlay``: the PNG preview (never delivered); ``roi``: the hottest region ``(x0, y0, x1, y1)`` in source
    pixels, end exclusive, or None when no fracture is suspected; ``region``: the region the SR reports
    (``roi`` when a fracture is suspected, else the heat map's hottest region), None for the whole image
    (rows written before it existed read it as ``roi``, what their SRs reported).
    """

    sc: Path | None = None
    sr: Path | None = None
    overlay: Path | None = None
    sc_sop_instance_uid: str | None = None
    sr_sop_instance_uid: str | None = None
    sc_series_instance_uid: str | None = None
    sr_series_instance_uid: str | None = None
    roi: tuple[int, int, int, int] | None = None
    region: tuple[int, int, int, int] | None = None

    def dicom_files(self) -> dict[str, Path]:
        """The DICOM objects to deliver by key, SC first: ``{"sc": path, "sr": path}`` (those present)."""
        return {key: path for key, path in (("sc", self.sc), ("sr", self.sr)) if path is not None}

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {k: str(p) for k, p in (("sc", self.sc), ("sr", self.sr), ("overlay", self.overlay)) if p is not None}
        if self.sc_sop_instance_uid is not None:
            doc["sc_sop_instance_uid"] = self.sc_sop_instance_uid
        if self.sr_sop_instance_uid is not None:
            doc["sr_sop_instance_uid"] = self.sr_sop_instance_uid
        series = {k: v for k, v in (("sc", self.sc_series_instance_uid), ("sr", self.sr_series_instance_uid)) if v is not None}
        if series:
            doc["series_instance_uids"] = series
        doc["roi"] = list(self.roi) if self.roi is not None else None
        if self.region != self.roi:  # written only where it differs (earlier rows, read back, stay the same)
            doc["region"] = list(self.region) if self.region is not None else None
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> ResultFiles:
        """The current shape (an object); earlier versions' list of paths is read as ``sc`` then ``sr``."""
        if isinstance(doc, (list, tuple)):  # earlier shape: a list of paths, the .dcm files delivered in order
            dcm = [Path(str(p)) for p in doc if str(p).lower().endswith(".dcm")]
            named = {p.stem: p for p in dcm}
            if set(named) <= {"sc", "sr"} and len(named) == len(dcm):
                return cls(sc=named.get("sc"), sr=named.get("sr"))
            return cls(sc=dcm[0] if dcm else None, sr=dcm[1] if len(dcm) > 1 else None)
        m = _mapping(doc, "files")
        series = _mapping(m.get("series_instance_uids") or {}, "files.series_instance_uids")

        def box(key: str) -> tuple[int, int, int, int] | None:
            value = m.get(key)
            if value is None:
                return None
            if not isinstance(value, (list, tuple)) or len(value) != 4:
                raise ResultFormatError(f"job result field 'files.{key}': expected [x0, y0, x1, y1], got {value!r}")
            x0, y0, x1, y1 = (int(_float(v, f"files.{key}")) for v in value)
            return x0, y0, x1, y1

        roi = box("roi")
        region = box("region") if "region" in m else roi  # earlier rows: their SR reported the roi

        def path(key: str) -> Path | None:
            value = m.get(key)
            return Path(_str(value, f"files.{key}")) if value else None

        return cls(
            sc=path("sc"),
            sr=path("sr"),
            overlay=path("overlay"),
            sc_sop_instance_uid=_opt_str(m.get("sc_sop_instance_uid"), "files.sc_sop_instance_uid"),
            sr_sop_instance_uid=_opt_str(m.get("sr_sop_instance_uid"), "files.sr_sop_instance_uid"),
            sc_series_instance_uid=_opt_str(series.get("sc"), "files.series_instance_uids.sc"),
            sr_series_instance_uid=_opt_str(series.get("sr"), "files.series_instance_uids.sr"),
            roi=roi,
            region=region,
        )


@dataclass(frozen=True)
class WrittenResults:
    """The writer's hand-off to the worker: the files it wrote and its seconds per step."""

    files: ResultFiles
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Classification:
    """The live model's answer for one image (``pacs_ai.infer.engine.Prediction`` without the heat map)."""

    probability: float
    """Calibrated P(fracture), 0..1."""
    fractured: bool
    """``probability >= threshold``."""
    threshold: float
    label: str
    """``"fractured"`` or ``"not_fractured"``."""
    model_name: str
    model_version: str
    architecture: str

    def to_json(self) -> dict[str, Any]:
        """Its fields by name (stored at the top level of a job result)."""
        return asdict(self)

    @classmethod
    def of(cls, prediction: Any) -> Classification:
        """From an engine ``Prediction`` (or anything with the same attributes)."""
        return cls(
            probability=float(prediction.probability),
            fractured=bool(prediction.fractured),
            threshold=float(prediction.threshold),
            label=str(prediction.label),
            model_name=str(prediction.model_name),
            model_version=str(prediction.model_version),
            architecture=str(prediction.architecture),
        )


@dataclass(frozen=True)
class RoutingOutcome:
    """The routing decision stored with a job: ``action`` analyse/skip, the deciding ``rule``, ``reason``."""

    action: str
    rule: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "rule": self.rule, "reason": self.reason}

    @classmethod
    def from_json(cls, doc: Any) -> RoutingOutcome:
        m = _mapping(doc, "routing")
        return cls(str(m.get("action", "")), str(m.get("rule", "")), str(m.get("reason", "")))


@dataclass(frozen=True)
class ShadowScore:
    """One shadow model's score of an image (stored, never sent); ``error`` instead of a score when it failed."""

    model_name: str
    model_version: str
    architecture: str = ""
    probability: float | None = None
    fractured: bool | None = None
    threshold: float | None = None
    seconds: float | None = None
    """Seconds per image of the shadow's batched forward pass."""
    error: str | None = None

    @property
    def scored(self) -> bool:
        return self.error is None and self.probability is not None and self.fractured is not None

    def to_json(self) -> dict[str, Any]:
        """A score: every field but ``error``; a failure: ``model_name``, ``model_version`` and ``error``."""
        if self.error is not None:
            return {"model_name": self.model_name, "model_version": self.model_version, "error": self.error}
        return {k: v for k, v in asdict(self).items() if k != "error"}

    @classmethod
    def from_json(cls, doc: Any) -> ShadowScore:
        m = _mapping(doc, "shadow[]")
        return cls(
            model_name=str(m.get("model_name", "?")),
            model_version=str(m.get("model_version", "?")),
            architecture=str(m.get("architecture") or ""),
            probability=_float(m["probability"], "shadow[].probability") if m.get("probability") is not None else None,
            fractured=_bool(m["fractured"], "shadow[].fractured") if m.get("fractured") is not None else None,
            threshold=_float(m["threshold"], "shadow[].threshold") if m.get("threshold") is not None else None,
            seconds=_float(m["seconds"], "shadow[].seconds") if m.get("seconds") is not None else None,
            error=_opt_str(m.get("error"), "shadow[].error"),
        )



@dataclass(frozen=True)
class JobResult:
    """The result stored with a job: a done job has ``classification`` and ``files``; a skipped one only
    ``routing``. ``timings``: seconds per step (the engine's preprocess/forward/cam, the worker's read/
    decode/contrast_resize, the writer's own)."""

    classification: Classification | None = None
    files: ResultFiles | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    routing: RoutingOutcome | None = None
    shadow: tuple[ShadowScore, ...] = ()

    @property
    def analysed(self) -> bool:
        """True when the live model scored the image."""
        return self.classification is not None

    @classmethod
    def skipped(cls, routing: RoutingOutcome) -> JobResult:
        return cls(routing=routing)

    def to_json(self) -> dict[str, Any]:
        """The one stored shape (see the module docstring)."""
        doc: dict[str, Any] = {}
        c = self.classification
        if c is not None:
            doc.update(c.to_json(), timings={k: round(float(v), 6) for k, v in self.timings.items()})
        elif self.timings:
            doc["timings"] = {k: round(float(v), 6) for k, v in self.timings.items()}
        if self.files is not None:
            doc["files"] = self.files.to_json()
        if self.routing is not None:
            doc["routing"] = self.routing.to_json()
        if self.shadow:
            doc["shadow"] = [s.to_json() for s in self.shadow]
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> JobResult:
        """Read a stored result (this version's shape or an earlier one). Raises ResultFormatError."""
        m = _upgrade(_mapping(doc, "result"))
        classification = None
        if m.get("probability") is not None:
            classification = Classification(
                probability=_float(m["probability"], "probability"),
                fractured=_bool(m["fractured"], "fractured")
                if "fractured" in m
                else _float(m["probability"], "probability") >= _float(m.get("threshold", 0.5), "threshold"),
                threshold=_float(m.get("threshold", 0.5), "threshold"),
                label=str(m.get("label") or ("fractured" if m.get("fractured") else "not_fractured")),
                model_name=str(m.get("model_name") or ""),
                model_version=str(m.get("model_version") or ""),
                architecture=str(m.get("architecture") or ""),
            )
        shadow = m.get("shadow") or []
        if not isinstance(shadow, (list, tuple)):
            raise ResultFormatError(f"job result field 'shadow': expected a list, got {type(shadow).__name__}")
        return cls(
            classification=classification,
            files=ResultFiles.from_json(m["files"]) if m.get("files") is not None else None,
            timings=_timings(m.get("timings")),
            routing=RoutingOutcome.from_json(m["routing"]) if m.get("routing") else None,
            shadow=tuple(ShadowScore.from_json(s) for s in shadow),
        )

    @classmethod
    def read(cls, doc: Any) -> JobResult | None:
        """``from_json`` for a job's stored result that may be absent (None: the job has no result yet)."""
        return None if doc is None else cls.from_json(doc)


def _upgrade(m: Mapping[str, Any]) -> Mapping[str, Any]:
    """Earlier versions' shapes -> this one. Earlier versions wrote the result files either under ``files``
    (an object, as now, or a list of paths) or at the top level (``sc``/``sr``/``overlay`` and the UIDs
    beside the classification); those top-level keys move under ``files``."""
    if "files" in m:
        return m
    moved = {k: m[k] for k in ("sc", "sr", "overlay", "sc_sop_instance_uid", "sr_sop_instance_uid", "series_instance_uids", "roi") if k in m}
    if not any(k in moved for k in ("sc", "sr", "overlay")):
        return m
    rest = {k: v for k, v in m.items() if k not in moved}
    return {**rest, "files": moved}


@dataclass(frozen=True)
class StudyImage:
    """An image a study result used: its job, UIDs and the live model's answer."""

    job_id: int
    sop_instance_uid: str
    series_instance_uid: str
    probability: float
    fractured: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "probability": self.probability,
            "fractured": self.fractured,
        }

    @classmethod
    def from_json(cls, doc: Any) -> StudyImage:
        m = _mapping(doc, "images[]")
        return cls(
            int(_float(m["job_id"], "images[].job_id")),
            str(m.get("sop_instance_uid", "")),
            str(m.get("series_instance_uid", "")),
            _float(m["probability"], "images[].probability"),
            _bool(m["fractured"], "images[].fractured"),
        )


@dataclass(frozen=True)
class StudyLeftOut:
    """An image of the study that the result did not use: its job ``state`` (or ``unreadable``) and why."""

    job_id: int
    sop_instance_uid: str
    state: str
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "sop_instance_uid": self.sop_instance_uid, "state": self.state, "reason": self.reason}

    @classmethod
    def from_json(cls, doc: Any) -> StudyLeftOut:
        m = _mapping(doc, "not_analysed[]")
        reason = m.get("reason")
        return cls(int(_float(m["job_id"], "not_analysed[].job_id")), str(m.get("sop_instance_uid", "")), str(m.get("state", "")), None if reason is None else str(reason))


@dataclass(frozen=True)
class StudyResult:
    """The result of a study (``pacs_ai.studies``), stored in the ``studies`` table and read back by the
    study deliveries and ``pacs-ai studies``. ``revision`` is set by the study store when it records it
    (0 before). Stored as::

        {"probability", "fractured", "threshold", "rule", "rule_source", "model_name", "model_version",
         "images": [StudyImage...], "not_analysed": [StudyLeftOut...], "forced",
         "files": {"sr": path}, "sr_sop_instance_uid", "sr_series_instance_uid", "revision"}
    """

    probability: float
    fractured: bool
    threshold: float
    rule: str
    rule_source: str
    model_name: str
    model_version: str
    sr: Path
    sr_sop_instance_uid: str
    sr_series_instance_uid: str
    images: tuple[StudyImage, ...] = ()
    not_analysed: tuple[StudyLeftOut, ...] = ()
    forced: bool = False
    revision: int = 0

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "probability": self.probability,
            "fractured": self.fractured,
            "threshold": self.threshold,
            "rule": self.rule,
            "rule_source": self.rule_source,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "images": [i.to_json() for i in self.images],
            "not_analysed": [n.to_json() for n in self.not_analysed],
            "forced": self.forced,
            "files": {"sr": str(self.sr)},
            "sr_sop_instance_uid": self.sr_sop_instance_uid,
            "sr_series_instance_uid": self.sr_series_instance_uid,
        }
        if self.revision:
            doc["revision"] = self.revision
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> StudyResult:
        """Read a stored study result. Raises ResultFormatError."""
        m = _mapping(doc, "study result")
        files = _mapping(m.get("files") or {}, "files")
        if not files.get("sr"):
            raise ResultFormatError("study result field 'files.sr': the study SR's path is missing")
        return cls(
            probability=_float(m.get("probability"), "probability"),
            fractured=_bool(m.get("fractured"), "fractured"),
            threshold=_float(m.get("threshold"), "threshold"),
            rule=str(m.get("rule", "")),
            rule_source=str(m.get("rule_source", "")),
            model_name=str(m.get("model_name", "")),
            model_version=str(m.get("model_version", "")),
            sr=Path(_str(files["sr"], "files.sr")),
            sr_sop_instance_uid=str(m.get("sr_sop_instance_uid", "")),
            sr_series_instance_uid=str(m.get("sr_series_instance_uid", "")),
            images=tuple(StudyImage.from_json(i) for i in m.get("images") or ()),
            not_analysed=tuple(StudyLeftOut.from_json(n) for n in m.get("not_analysed") or ()),
            forced=bool(m.get("forced", False)),
            revision=int(m.get("revision") or 0),
        )

    @classmethod
    def read(cls, doc: Any) -> StudyResult | None:
        """``from_json`` for a study's stored result that may be absent (None: no result yet)."""
        return None if doc is None else cls.from_json(doc)
