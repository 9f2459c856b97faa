"""Figures (matplotlib, Agg backend): ROC curves and confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def roc_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "ROC curve") -> Path:
    """Overlay ROC curves: ``{label: (y, prob)}``; the legend shows each AUROC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for name, (y, prob) in curves.items():
        fpr, tpr, _ = roc_curve(y, prob)
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUROC {roc_auc_score(y, prob):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def confusion_png(matrices: dict[str, dict[str, Any]], path: Path) -> Path:
    """One confusion matrix per model side by side: ``{label: {"tn","fp","fn","tp", "threshold"}}``."""
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), dpi=120, squeeze=False)
    for ax, (name, cm) in zip(axes[0], matrices.items(), strict=True):
        m = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black", fontsize=12)
        ax.set_xticks([0, 1], ["not fractured", "fractured"])
        ax.set_yticks([0, 1], ["not fractured", "fractured"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        thr = cm.get("threshold")
        ax.set_title(f"{name}" + (f"\n(threshold {thr:.3f})" if thr is not None else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def reliability_png(rel: dict[str, Any], path: Path, title: str = "Reliability diagram") -> Path:
    """Observed fracture rate against mean predicted P(fracture) per bin (from ``metrics.reliability``),
    with the bin counts as bars underneath and the ECE in the title."""
    bins = rel["bins"]
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5, 6), dpi=120, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect calibration")
    ax.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], marker="o", lw=1.5, label="model")
    ax.set_ylabel("observed fracture rate")
    ax.set_title(f"{title}\nECE {rel['ece']:.3f} ({rel['n_bins']} bins)", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    width = 1.0 / rel["n_bins"]
    axn.bar([b["lo"] + width / 2 for b in bins], [b["n"] for b in bins], width=width * 0.9, color="tab:grey")
    axn.set_xlabel("predicted P(fracture)")
    axn.set_ylabel("images")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
