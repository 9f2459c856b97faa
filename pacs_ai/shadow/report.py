"""``pacs-ai shadow report``: live versus shadow models on the images analysed since a given time.

For the live model and every shadow model found in the jobs' results (jobs done since ``since``):

- ``n``: images scored (shadow entries with an error are counted apart), share called fractured;
- agreement with the live decision (share of images where both say the same) and Cohen's kappa
  (scikit-learn), and the mean absolute difference of the probabilities;
- the distribution of the probabilities: quantiles, and a histogram on the bins of the model card's
  ``validation_distribution``;
- drift: the population stability index of that histogram against the card's validation counts
  (``pacs_ai.shadow.drift``), or None when the card carries no validation distribution.

``render_text`` prints it; ``render_png`` draws each model's distribution over its validation one and,
per shadow, its probabilities against the live ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from pacs_ai.errors import ResultFormatError
from pacs_ai.queue.jobstore import Job, JobState
from pacs_ai.shadow.drift import histogram, psi, psi_reading

log = logging.getLogger(__name__)

__all__ = ["ModelStats", "ShadowReport", "build_report", "render_png", "render_text"]

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class ModelStats:
    role: str
    """``live`` or ``shadow``."""
    model_name: str
    model_version: str
    n: int
    errors: int
    positive_rate: float | None
    agreement: float | None
    kappa: float | None
    mean_abs_diff: float | None
    quantiles: dict[str, float]
    reference_edges: list[float] | None
    reference_counts: list[int] | None
    counts: list[int] | None
    psi: float | None
    psi_reading: str | None
    probabilities: list[float] = field(repr=False)
    live_probabilities: list[float] = field(repr=False)
    """The live model's probabilities on the same images (for the scatter plot)."""


@dataclass(frozen=True)
class ShadowReport:
    since: datetime
    jobs: int
    models: list[ModelStats]


def _stats(
    role: str,
    key: tuple[str, str],
    pairs: Sequence[tuple[float, bool, float, bool]],
    errors: int,
    reference: Mapping[str, Any] | None,
) -> ModelStats:
    """``pairs``: (probability, fractured, live probability, live fractured) per image."""
    probs = np.array([p[0] for p in pairs], dtype=float)
    calls = np.array([p[1] for p in pairs], dtype=bool)
    live_probs = np.array([p[2] for p in pairs], dtype=float)
    live_calls = np.array([p[3] for p in pairs], dtype=bool)
    agreement = kappa = mad = None
    if role == "shadow" and len(pairs):
        from sklearn.metrics import cohen_kappa_score

        agreement = float((calls == live_calls).mean())
        kappa = float(cohen_kappa_score(live_calls, calls)) if len(set(calls) | set(live_calls)) > 1 else None
        if kappa is not None and not np.isfinite(kappa):
            kappa = None
        mad = float(np.abs(probs - live_probs).mean())
    edges = counts = ref_counts = None
    drift = None
    if reference and len(pairs):
        edges = [float(e) for e in reference["bin_edges"]]
        ref_counts = [int(c) for c in reference["counts"]]
        counts = histogram(probs, edges)
        drift = psi(ref_counts, counts)
    return ModelStats(
        role=role,
        model_name=key[0],
        model_version=key[1],
        n=len(pairs),
        errors=errors,
        positive_rate=float(calls.mean()) if len(pairs) else None,
        agreement=agreement,
        kappa=kappa,
        mean_abs_diff=mad,
        quantiles={f"p{int(q * 100)}": float(np.quantile(probs, q)) for q in QUANTILES} if len(pairs) else {},
        reference_edges=edges,
        reference_counts=ref_counts,
        counts=counts,
        psi=drift,
        psi_reading=psi_reading(drift) if drift is not None else None,
        probabilities=[float(p) for p in probs],
        live_probabilities=[float(p) for p in live_probs],
    )


def build_report(jobs: Sequence[Job], references: Mapping[tuple[str, str], Mapping[str, Any]], since: datetime) -> ShadowReport:
    """The report over the done ``jobs``; ``references``: (model name, version) -> the card's
    ``validation_distribution`` (models without one get no PSI)."""
    live: dict[tuple[str, str], list[tuple[float, bool, float, bool]]] = {}
    shadows: dict[tuple[str, str], list[tuple[float, bool, float, bool]]] = {}
    errors: dict[tuple[str, str], int] = {}
    n_jobs = 0
    for job in jobs:
        if job.state != JobState.DONE:
            continue
        try:
            r = job.job_result()
        except ResultFormatError as exc:
            log.warning("job %s: result left out of the shadow report: %s", job.id, exc)
            continue
        c = r.classification if r is not None else None
        if r is None or c is None:
            continue
        n_jobs += 1
        lp, lf = c.probability, c.fractured
        live.setdefault((c.model_name or "?", c.model_version or "?"), []).append((lp, lf, lp, lf))
        for entry in r.shadow:
            key = (entry.model_name, entry.model_version)
            if not entry.scored or entry.probability is None or entry.fractured is None:
                errors[key] = errors.get(key, 0) + 1
                shadows.setdefault(key, [])
                continue
            shadows.setdefault(key, []).append((entry.probability, entry.fractured, lp, lf))
    models = [_stats("live", k, v, 0, references.get(k)) for k, v in live.items()]
    models += [_stats("shadow", k, v, errors.get(k, 0), references.get(k)) for k, v in shadows.items()]
    return ShadowReport(since, n_jobs, models)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render_text(report: ShadowReport) -> str:
    lines = [f"shadow report: {report.jobs} image(s) analysed since {report.since.isoformat(timespec='seconds')}"]
    if not report.models:
        return lines[0] + "\n  nothing to report (no analysed image in that period)\n"
    if not any(m.role == "shadow" for m in report.models):
        lines.append("  no shadow results in that period (configure [model] shadow = [...])")
    for m in report.models:
        lines.append("")
        lines.append(f"{m.role:<7} {m.model_name} {m.model_version}")
        lines.append(f"  images scored        {m.n}" + (f"  ({m.errors} failed)" if m.errors else ""))
        lines.append(f"  called fractured     {_fmt(m.positive_rate, '.1%')}")
        if m.role == "shadow":
            lines.append(f"  agreement with live  {_fmt(m.agreement, '.1%')}  (Cohen's kappa {_fmt(m.kappa)})")
            lines.append(f"  mean |p - p_live|    {_fmt(m.mean_abs_diff)}")
        if m.quantiles:
            lines.append("  probability          " + "  ".join(f"{k} {v:.3f}" for k, v in m.quantiles.items()))
        if m.psi is None:
            lines.append("  drift (PSI)          - (the model card carries no validation distribution)")
        else:
            lines.append(f"  drift (PSI)          {m.psi:.3f}  {m.psi_reading}  (against the card's validation distribution)")
            assert m.reference_edges is not None and m.counts is not None and m.reference_counts is not None
            ref_total, total = sum(m.reference_counts), sum(m.counts)
            lines.append("  bin                  validation   now")
            for i, (c, rc) in enumerate(zip(m.counts, m.reference_counts, strict=True)):
                lo, hi = m.reference_edges[i], m.reference_edges[i + 1]
                lines.append(f"    [{lo:.3f}, {hi:.3f})     {rc / ref_total:>8.1%}   {c / total:>6.1%}")
    return "\n".join(lines) + "\n"


def render_png(report: ShadowReport, path: Path) -> Path:
    """Write the plot; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report.models or []
    shadows = [m for m in models if m.role == "shadow"]
    cols = max(1, len(models) + len(shadows))
    fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 3.6), squeeze=False)
    ax_iter = iter(axes[0])
    for m in models:
        ax = next(ax_iter)
        if m.reference_edges and m.reference_counts:
            edges = np.array(m.reference_edges)
            widths = np.diff(edges)
            ref = np.array(m.reference_counts, float)
            ax.bar(edges[:-1], ref / ref.sum() / widths, width=widths, align="edge", alpha=0.35, color="grey", label="validation")
            now = np.array(m.counts or [0] * len(widths), float)
            if now.sum() > 0:
                ax.step(edges, np.append(now / now.sum() / widths, 0), where="post", color="C0" if m.role == "live" else "C1", label="now")
        elif m.probabilities:
            ax.hist(m.probabilities, bins=20, range=(0, 1), density=True, color="C0" if m.role == "live" else "C1", label="now")
        title = f"{m.role}: {m.model_name} {m.model_version}"
        ax.set_title(title[:48] + ("\n" + f"PSI {m.psi:.3f} ({m.psi_reading})" if m.psi is not None else "\nno validation distribution"), fontsize=9)
        ax.set_xlabel("P(fracture)")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=8)
    for m in shadows:
        ax = next(ax_iter)
        ax.scatter(m.live_probabilities, m.probabilities, s=10, alpha=0.6, color="C1")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_xlabel("live P(fracture)")
        ax.set_ylabel("shadow P(fracture)")
        ax.set_title(f"{m.model_name}: agreement {_fmt(m.agreement, '.1%')}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    if not models:
        axes[0][0].text(0.5, 0.5, "no analysed images", ha="center", va="center")
    fig.suptitle(f"pacs-ai shadow report: {report.jobs} image(s) since {report.since:%Y-%m-%d %H:%M} UTC", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
