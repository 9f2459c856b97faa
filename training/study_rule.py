"""``study-rule``: choose the study-level rule (max, mean, noisy-or) on validation data.

FracAtlas has no study identifiers; its manifest's ``group`` (images of one patient and region that are
near-duplicates or other views) stands in for a study. For every validation group the image
probabilities of the model are aggregated by each rule (``pacs_ai.studies.rules``); a group is fractured
when any of its images is. The rules are compared by study-level AUROC (percentile bootstrap 95%
interval over groups) and, at the threshold that reaches the target sensitivity on these groups, by
specificity. The rule with the highest AUROC wins (ties, within 0.001, go to the simpler rule in the
order max, mean, noisy_or). ``--write-card`` records the winner, its threshold, the comparison, and the
validation probability distribution (decile bins, for drift in ``pacs-ai shadow report``) in the card.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pacs_ai.shadow.drift import histogram, quantile_edges
from pacs_ai.studies.rules import RULES, aggregate

__all__ = ["compare_rules", "study_rule_command"]


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def _threshold_for_sensitivity(y: np.ndarray, score: np.ndarray, target: float) -> float:
    from training.metrics import threshold_for_sensitivity

    return threshold_for_sensitivity(y, score, target)


def compare_rules(
    rows: list[dict[str, Any]],
    target_sensitivity: float = 0.90,
    n_boot: int = 1000,
    seed: int = 0,
    image_threshold: float | None = None,
) -> dict[str, Any]:
    """Compare the rules on ``rows`` (dicts with ``group``, ``label`` 0/1, ``probability``).

    Returns ``{"n_groups", "n_fractured_groups", "n_multi_image_groups", "rules": {rule: {...}}, "winner"}``
    where each rule has ``auc``, ``auc_ci95``, ``auc_multi`` (groups of two or more images only),
    ``threshold``, ``sensitivity``, ``specificity`` (at that threshold) and, with ``image_threshold``,
    ``at_image_threshold`` (sensitivity and specificity when the image threshold is used for studies).
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[str(row["group"])].append(row)
    names = sorted(groups)
    y = np.array([int(any(int(r["label"]) for r in groups[g])) for g in names])
    multi = np.array([len(groups[g]) > 1 for g in names])
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, len(names), len(names)) for _ in range(n_boot)]
    out: dict[str, Any] = {
        "n_images": len(rows),
        "n_groups": len(names),
        "n_fractured_groups": int(y.sum()),
        "n_multi_image_groups": int(multi.sum()),
        "n_fractured_multi_image_groups": int(y[multi].sum()),
        "target_sensitivity": target_sensitivity,
        "rules": {},
    }
    for rule in RULES:
        score = np.array([aggregate(rule, [float(r["probability"]) for r in groups[g]]) for g in names])
        threshold = _threshold_for_sensitivity(y, score, target_sensitivity)
        pred = score >= threshold
        aucs = [a for a in (_auc(y[b], score[b]) for b in boots) if np.isfinite(a)]
        out["rules"][rule] = {
            "auc": _auc(y, score),
            "auc_ci95": [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))] if aucs else None,
            "auc_multi": _auc(y[multi], score[multi]) if multi.any() else None,
            "threshold": float(threshold),
            "sensitivity": float((pred & (y == 1)).sum() / max(1, (y == 1).sum())),
            "specificity": float((~pred & (y == 0)).sum() / max(1, (y == 0).sum())),
        }
        if image_threshold is not None:
            at = score >= image_threshold
            out["rules"][rule]["at_image_threshold"] = {
                "threshold": float(image_threshold),
                "sensitivity": float((at & (y == 1)).sum() / max(1, (y == 1).sum())),
                "specificity": float((~at & (y == 0)).sum() / max(1, (y == 0).sum())),
            }
    best = max(out["rules"][r]["auc"] for r in RULES)
    out["winner"] = next(r for r in RULES if out["rules"][r]["auc"] >= best - 0.001)
    return out


def _predict(model_dir: Path, data: Path, split: Path, subset: str, cache_dir: Path | None) -> list[dict[str, Any]]:
    from pacs_ai.infer.device import select_device
    from pacs_ai.infer.model_card import load_model_folder
    from training.evaluate import predict_model, select_items

    items = select_items(data, split, subset)
    model, card = load_model_folder(model_dir, map_location=select_device("auto", key="--device"))
    pred = predict_model(model, card, data, items, cache_dir)
    return [
        {"file": it.file, "group": it.group, "label": int(it.label), "probability": float(p)}
        for it, p in zip(items, pred.prob, strict=True)
    ]


def _report(cmp: dict[str, Any], model: str) -> str:
    lines = [
        "# Study-level rule on validation data",
        "",
        f"Model `{model}`; {cmp['n_images']} validation images in {cmp['n_groups']} FracAtlas groups (stand-in "
        f"studies), {cmp['n_fractured_groups']} fractured; {cmp['n_multi_image_groups']} groups have two or more "
        f"images ({cmp['n_fractured_multi_image_groups']} fractured). Threshold per rule chosen for "
        f"{cmp['target_sensitivity']:.0%} study sensitivity on these groups.",
        "",
        "| rule | AUROC (95% CI) | AUROC, multi-image groups | threshold | sensitivity | specificity | sens./spec. at the image threshold |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule, m in cmp["rules"].items():
        ci = m["auc_ci95"]
        multi = "n/a" if m["auc_multi"] is None or not np.isfinite(m["auc_multi"]) else f"{m['auc_multi']:.3f}"
        lines.append(
            f"| {rule} | {m['auc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) | {multi} | {m['threshold']:.4f} | "
            f"{m['sensitivity']:.3f} | {m['specificity']:.3f} | "
            + (f"{m['at_image_threshold']['sensitivity']:.3f} / {m['at_image_threshold']['specificity']:.3f} |" if "at_image_threshold" in m else "- |")
        )
    lines += [
        "",
        f"Winner (highest AUROC, ties within 0.001 to the simpler rule in the order max, mean, noisy_or): **{cmp['winner']}**.",
        "With max the daemon uses the image threshold for the study, so a study is reported fractured exactly when",
        "at least one of its images is; other rules use the threshold chosen above.",
        "",
    ]
    return "\n".join(lines)


def study_rule_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pred_csv = out / "val_predictions.csv"
    if args.predictions:
        with Path(args.predictions).open(newline="") as fh:
            rows = [dict(r) for r in csv.DictReader(fh)]
    else:
        rows = _predict(Path(args.model), Path(args.data), Path(args.split), args.subset, args.cache_dir)
        with pred_csv.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["file", "group", "label", "probability"])
            w.writeheader()
            w.writerows(rows)
    from pacs_ai.infer.model_card import load_card, save_card
    from training.metrics import json_clean

    card = load_card(args.model)
    cmp = compare_rules(rows, args.target_sensitivity, args.n_boot, image_threshold=card.threshold)
    (out / "study_rule.json").write_text(json.dumps(json_clean(cmp), indent=2) + "\n")
    (out / "study_rule.md").write_text(_report(cmp, f"{card.name} {card.version}"))
    print(_report(cmp, f"{card.name} {card.version}"))
    if args.write_card:
        probs = [float(r["probability"]) for r in rows]
        edges = quantile_edges(probs, 10)
        card.study = json_clean(
            {
                "rule": cmp["winner"],
                "threshold": card.threshold if cmp["winner"] == "max" else cmp["rules"][cmp["winner"]]["threshold"],
                "chosen_on": "FracAtlas validation groups as stand-in studies (pacs-ai-train study-rule)",
                "comparison": {r: {k: m[k] for k in ("auc", "auc_ci95", "auc_multi", "at_image_threshold")} for r, m in cmp["rules"].items()},
            }
        )
        card.validation_distribution = {
            "bin_edges": [round(e, 6) for e in edges],
            "counts": histogram(probs, edges),
            "n": len(probs),
            "source": f"calibrated probabilities on the {args.subset} split ({len(probs)} images)",
        }
        save_card(args.model, card)
        print(f"wrote the study rule and the validation distribution into {Path(args.model) / 'model.json'}")
    return 0
