"""Binary classification metrics with bootstrap intervals, temperature scaling, threshold choice.

Convention: the positive class is "fractured"; a case is called positive when its probability is
``>= threshold``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METRIC_NAMES = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")


def softmax_positive(logits: np.ndarray, temperature: float = 1.0, positive: int = 1) -> np.ndarray:
    """Probability of class ``positive`` from (N, C) logits divided by ``temperature``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e[:, positive] / e.sum(axis=1)).astype(np.float64)


def confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp) for 0/1 arrays."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    return int((~y & ~pred).sum()), int((~y & pred).sum()), int((y & ~pred).sum()), int((y & pred).sum())


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC and threshold metrics (accuracy, sensitivity, specificity, precision, F1)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    tn, fp, fn, tp = confusion(y, prob >= threshold)
    sens = _safe_div(tp, tp + fn)
    prec = _safe_div(tp, tp + fp)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    auc = float(roc_auc_score(y, prob)) if 0 < y.sum() < len(y) else float("nan")
    return {
        "auc": auc,
        "accuracy": _safe_div(tp + tn, len(y)),
        "sensitivity": sens,
        "specificity": _safe_div(tn, tn + fp),
        "precision": prec,
        "f1": f1,
    }


def bootstrap_intervals(
    y: np.ndarray, prob: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, list[float]]:
    """Percentile bootstrap (1 - alpha) intervals for every metric of ``binary_metrics``.

    Resamples cases with replacement, stratified by label so each resample has both classes.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        return {k: [float("nan"), float("nan")] for k in METRIC_NAMES}
    pred = prob >= threshold
    samples: dict[str, list[float]] = {k: [] for k in METRIC_NAMES}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        yy, pp, dd = y[idx], prob[idx], pred[idx]
        tn, fp, fn, tp = confusion(yy, dd)
        samples["auc"].append(float(roc_auc_score(yy, pp)))
        samples["accuracy"].append((tp + tn) / len(yy))
        samples["sensitivity"].append(_safe_div(tp, tp + fn))
        samples["specificity"].append(_safe_div(tn, tn + fp))
        samples["precision"].append(_safe_div(tp, tp + fp))
        samples["f1"].append(_safe_div(2 * tp, 2 * tp + fp + fn))
    out: dict[str, list[float]] = {}
    for k, v in samples.items():
        a = np.asarray(v, dtype=np.float64)
        a = a[np.isfinite(a)]
        out[k] = [float(np.quantile(a, alpha / 2)), float(np.quantile(a, 1 - alpha / 2))] if len(a) else [float("nan")] * 2
    return out


def summarize(y: np.ndarray, prob: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Everything ``evaluate`` reports: n, metrics, 95% intervals, confusion matrix, threshold."""
    y = np.asarray(y).astype(int)
    m = binary_metrics(y, prob, threshold)
    tn, fp, fn, tp = confusion(y, np.asarray(prob) >= threshold)
    out: dict[str, Any] = {"n": int(len(y)), "n_fractured": int(y.sum()), "n_not_fractured": int(len(y) - y.sum())}
    out.update(m)
    out["threshold"] = float(threshold)
    out["ci95"] = bootstrap_intervals(y, prob, threshold, n_boot=n_boot, seed=seed) if n_boot > 0 else {}
    out["confusion_matrix"] = {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    return json_clean(out)


def json_clean(obj: Any) -> Any:
    """Replace NaN/inf by None recursively so the result is strict JSON."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return json_clean(obj.item())
    return obj


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of ``y`` (temperature scaling, Guo et al. 2017).

    A bounded 1-D search over log T in [log 0.05, log 20] (the NLL is convex in 1/T).
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y).astype(int)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood at ``temperature``."""
    s = np.asarray(logits, dtype=np.float64) / temperature
    s = s - s.max(axis=1, keepdims=True)
    logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), np.asarray(y).astype(int)].mean())


def threshold_for_sensitivity(y: np.ndarray, prob: np.ndarray, target: float = 0.90) -> float:
    """Highest threshold whose sensitivity (``prob >= threshold``) is at least ``target``."""
    y = np.asarray(y).astype(int)
    pos = np.sort(np.asarray(prob, dtype=np.float64)[y == 1])[::-1]
    if len(pos) == 0:
        return 0.5
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    return float(pos[k - 1])


def operating_points(y: np.ndarray, prob: np.ndarray, sensitivity: float = 0.90, specificity: float = 0.90) -> dict[str, float]:
    """Points of the ROC curve (``sklearn.metrics.roc_curve``): the best sensitivity among thresholds with
    specificity >= ``specificity``, and the best specificity among thresholds with sensitivity >=
    ``sensitivity``. Keys ``sensitivity_at_specificity_90`` and ``specificity_at_sensitivity_90`` (the
    suffix is the target in percent). NaN when a class is missing."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y).astype(int)
    ks = f"sensitivity_at_specificity_{round(100 * specificity)}"
    kp = f"specificity_at_sensitivity_{round(100 * sensitivity)}"
    if not 0 < y.sum() < len(y):
        return {ks: float("nan"), kp: float("nan")}
    fpr, tpr, _ = roc_curve(y, np.asarray(prob, dtype=np.float64))
    ok_spec = (1.0 - fpr) >= specificity - 1e-12
    ok_sens = tpr >= sensitivity - 1e-12
    return {ks: float(tpr[ok_spec].max()) if ok_spec.any() else 0.0, kp: float((1.0 - fpr[ok_sens]).max()) if ok_sens.any() else 0.0}


def bootstrap(y: np.ndarray, prob: np.ndarray, stat: Any, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of every value of ``stat(y, prob) -> dict`` (label-stratified resamples)."""
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0 or n_boot <= 0:
        return {}
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        for k, v in stat(y[idx], prob[idx]).items():
            samples.setdefault(k, []).append(v)
    out = {}
    for k, v in samples.items():
        a = np.asarray(v, dtype=np.float64)
        a = a[np.isfinite(a)]
        out[k] = [float(np.quantile(a, alpha / 2)), float(np.quantile(a, 1 - alpha / 2))] if len(a) else [float("nan")] * 2
    return out


def reliability(y: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error over ``n_bins`` equal-width bins of P(fracture) and the diagram's bins.

    Bins as ``sklearn.calibration.calibration_curve(strategy="uniform")``; ECE = sum over non-empty bins
    of (bin count / N) * |observed fracture rate - mean predicted probability| (Naeini et al., 2015).
    Returns ``{"ece", "n_bins", "bins": [{"lo", "hi", "n", "mean_predicted", "observed"}]}``.
    """
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], prob)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = ids == b
        n = int(sel.sum())
        if n == 0:
            continue
        mp, obs = float(prob[sel].mean()), float(y[sel].mean())
        ece += n / len(y) * abs(obs - mp)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n, "mean_predicted": mp, "observed": obs})
    return {"ece": float(ece) if len(y) else float("nan"), "n_bins": n_bins, "bins": bins}
