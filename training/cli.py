"""``python -m training <command>`` / ``pacs-ai-train``: split, train, evaluate, calibrate, compare, cam-review, export."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pacs_ai.errors import PacsAiError
from pacs_ai.infer.architectures import ARCHITECTURES
from training.loop import RunConfig
from training.maptrain import MapTrainConfig
from training.train import TrainConfig


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core this process may use, as the daemon's rule)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda (default: auto)")


def _add_run_options(p: argparse.ArgumentParser, config: type[RunConfig], *, data_help: str, split_help: str, out_help: str, resume_help: str) -> None:
    """The options of every training run (the fields of ``training.loop.RunConfig``), defaults from ``config``."""
    d = {f.name: f.default for f in dataclasses.fields(config)}
    p.add_argument("--arch", choices=ARCHITECTURES, default=d["arch"])
    p.add_argument("--data", type=Path, required=True, help=data_help)
    p.add_argument("--split", type=Path, default=None, help=split_help)
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--cache-dir", type=Path, default=None, help="cache letterboxed images here (.npy)")
    p.add_argument("--name", default=d["export_name"], help="model name for the card")
    p.add_argument("--version", default=d["export_version"], help="model version for the card")
    p.add_argument("--half", action="store_true", help="export weights as float16")
    p.add_argument("--target-sensitivity", type=float, default=d["target_sensitivity"])
    p.add_argument("--n-boot", type=int, default=d["n_boot"], help="bootstrap resamples for the exported card's intervals")
    p.add_argument("--limit", type=int, default=None, help="use at most N train and N val images (smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads(p)


def _run_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``RunConfig`` keyword arguments from the options :func:`_add_run_options` added."""
    return {
        "data": str(args.data), "out": str(args.out), "arch": args.arch, "split": str(args.split) if args.split else None,
        "val_fraction": args.val_fraction, "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "weight_decay": args.weight_decay, "threads": args.threads, "device": args.device,
        "cache_dir": str(args.cache_dir) if args.cache_dir else None, "export_name": args.name,
        "export_version": args.version, "export_half": args.half, "target_sensitivity": args.target_sensitivity,
        "n_boot": args.n_boot, "limit": args.limit,
    }


def _add_eval_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="folder with fractured/ and not_fractured/ (DICOM, JPEG or PNG)")
    p.add_argument("--split", type=Path, default=None, help="split CSV from `split`; evaluate only its --subset rows")
    p.add_argument("--subset", default="val", help="which split rows to use with --split (default: val)")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache of letterboxed images (speeds up repeated runs)")
    p.add_argument("--batch-size", type=int, default=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs-ai-train", description="Train, evaluate, calibrate, compare and export pacs-ai fracture classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("split", help="group-aware, label-stratified train/validation split -> CSV", description="Split a dataset folder (fractured/, not_fractured/, optional manifest.csv with a group column) into train and val, keeping each group on one side and the label ratio equal. Deterministic for a seed.")
    p.add_argument("--data", type=Path, required=True, help="dataset folder")
    p.add_argument("--out", type=Path, required=True, help="CSV to write (file,label,group,split)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train", help="train a backbone (checkpoints every epoch, --resume, early stopping)", description="Train resnet50, vgg16 or densenet121 with a two-class head on letterboxed, CLAHE-enhanced radiographs (the daemon's own preprocessing). Checkpoints every epoch to --out (last.pt, best.pt); --export writes the calibrated model folder after every improving epoch.")
    _add_run_options(
        p, TrainConfig, data_help="dataset folder (fractured/, not_fractured/, optional manifest.csv)",
        split_help="split CSV (default: split on the fly with --val-fraction/--seed)",
        out_help="run folder for checkpoints, history and config", resume_help="continue from OUT/last.pt",
    )
    p.add_argument("--weights", default="none", help="none (from scratch), imagenet (torchvision's local cache only) or a local state-dict FILE (default: none)")
    p.add_argument("--size", type=int, default=224, help="square input side in pixels (default: 224)")
    p.add_argument("--no-clahe", action="store_true", help="disable CLAHE contrast enhancement")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--schedule", choices=("cosine", "onecycle"), default="cosine", help="cosine: warm-up + cosine, also paced by --max-minutes")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--freeze-epochs", type=int, default=0, help="epochs with the early layers frozen (transfer learning)")
    p.add_argument("--freeze-groups", type=int, default=-2, help="how many layer groups to freeze from the stem; negative = all but the last N (default: -2)")
    p.add_argument("--balance", choices=("loss", "sampler", "none"), default="loss", help="class imbalance: weighted loss, balanced sampler, or nothing")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=10, help="early stopping: epochs without validation AUROC improvement")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; the cosine schedule is paced to end within it")
    p.add_argument("--export", type=Path, default=None, help="model folder to (re)write, calibrated, after every improving epoch")

    p = sub.add_parser("train-map", help="localisation-supervised fracture-map model from boxes.csv (checkpoints, --resume)", description="Train a fracture-map model (per-cell fracture logits on the last feature map, log-sum-exp pooled to the image logit) on crops of images letterboxed at --scale px, supervised by the fracture boxes in DATA/boxes.csv. Validates whole images every epoch (AUROC, pointing game), checkpoints every epoch and every --checkpoint-minutes, exports the best epoch to OUT/model-best.")
    _add_run_options(
        p, MapTrainConfig, data_help="dataset folder (fractured/, not_fractured/, manifest.csv, boxes.csv)",
        split_help="split CSV (default: group-aware split with --val-fraction/--seed, written to OUT/split.csv)",
        out_help="run folder for checkpoints, history and the exported model", resume_help="continue from OUT/last.pt (also mid-epoch)",
    )
    p.add_argument("--scale", type=int, default=512, help="letterbox side of the whole image, as served (default: 512)")
    p.add_argument("--crop", type=int, default=256, help="training crop side in pixels (default: 256)")
    p.add_argument("--crops-per-epoch", type=int, default=2048)
    p.add_argument("--pct-start", type=float, default=0.25, help="one-cycle warm-up share of the steps")
    p.add_argument("--pool-r", type=float, default=5.0, help="log-sum-exp pooling sharpness")
    p.add_argument("--map-weight", type=float, default=1.0, help="weight of the cell loss next to the image loss")
    p.add_argument("--outside-weight", type=float, default=0.1, help="weight of negative cells outside the boxes of fractured images (0: ignored)")
    p.add_argument("--pos-fraction", type=float, default=0.5, help="share of crops taken around fracture boxes")
    p.add_argument("--hard-fraction", type=float, default=0.3, help="share of normal crops centred on last epoch's hottest normal regions")
    p.add_argument("--hard-pool", type=int, default=128, help="normal training images scanned per epoch for hard negatives")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--val-limit", type=int, default=None, help="score only every fractured and a fixed sample of normal validation images after each epoch, N in all (default: all)")
    p.add_argument("--val-batch", type=int, default=8, help="images per batch in the whole-image validation and hard-negative passes (default: 8)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes building the crops (default: 0, in the training process)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget: the one-cycle schedule ends when the steps or this budget run out, whichever first, and the run stops")

    p = sub.add_parser("evaluate", help="metrics with bootstrap 95%% intervals, confusion matrix, ROC curve PNG", description="Evaluate a model folder on labelled images (DICOM, JPEG or PNG). Uses the card's temperature and threshold.")
    p.add_argument("--model", type=Path, nargs="+", required=True, help="model folder (model.json + weights); several folders: their ensemble, as the daemon runs it (mean calibrated probability and mean heat map; the first model's threshold)")
    _add_eval_data(p)
    p.add_argument("--json", type=Path, default=None, help="write the metrics here")
    p.add_argument("--out", type=Path, default=None, help="folder for roc.png and confusion.png (default: next to --json, else none)")
    p.add_argument("--n-boot", type=int, default=1000)
    _add_threads(p)

    p = sub.add_parser("calibrate", help="temperature scaling + threshold for a target sensitivity, written into the card", description="Fit the temperature on validation NLL and choose the threshold that reaches --target-sensitivity on validation; rewrite the model card (and its validation metrics).")
    p.add_argument("--model", type=Path, required=True)
    _add_eval_data(p)
    p.add_argument("--target-sensitivity", type=float, default=0.90)
    p.add_argument("--n-boot", type=int, default=1000)
    _add_threads(p)

    p = sub.add_parser("compare", help="side-by-side report of several models (Markdown + PNG)", description="Score several model folders (and with --ensemble their ensemble) on the same images through the daemon's engine and write report.md: AUROC, operating points, pointing game, ECE with intervals, parameters, training time, ms per image, confusion matrices.")
    p.add_argument("--models", type=Path, nargs="+", required=True, help="model folders")
    _add_eval_data(p)
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--timing-images", type=int, default=20, help="images timed one by one per model (batch 1)")
    p.add_argument("--ensemble", action="store_true", help="also score all --models together as the daemon's ensemble")
    p.add_argument("--extra-models", type=Path, nargs="*", default=None, help="more model folders reported first, outside the ensemble (baselines)")
    p.add_argument("--evaluations", type=Path, nargs="*", default=None, help="metrics JSON files from `evaluate --json` to reuse for models (or the ensemble) with the same name, version and image count, instead of running them again")
    p.add_argument("--n-boot", type=int, default=1000)
    _add_threads(p)

    p = sub.add_parser("cam-review", help="heat-map gallery and pointing-game score against fracture boxes", description="The daemon's heat maps (its inference engine and explainer: Grad-CAM, HiResCAM for vgg16, or a fracture-map model's own map) as overlays for fractured images, and the pointing game: the share of images whose heat-map maximum falls inside a fracture box (boxes.csv: file,x0,y0,x1,y1 as fractions).")
    p.add_argument("--model", type=Path, required=True)
    _add_eval_data(p)
    p.add_argument("--boxes", type=Path, default=None, help="boxes CSV (default: DATA/boxes.csv)")
    p.add_argument("--out", type=Path, required=True, help="folder for gallery.png and cam_review.json")
    p.add_argument("--gallery", type=int, default=16, help="images in the gallery")
    p.add_argument("--limit", type=int, default=None, help="score at most N boxed images")
    p.add_argument("--maps", action="store_true", help="also write maps.npz: each image's heat map on the network grid, as the daemon computes it")
    _add_threads(p)

    p = sub.add_parser("study-rule", help="choose the study-level rule (max, mean, noisy-or) on validation groups", description="Aggregate image probabilities per manifest group (stand-in study) by max, mean and noisy-or, compare study AUROC with bootstrap intervals, report the winner; --write-card stores it and the validation probability distribution in the card.")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("--data", type=Path, default=Path("../shared/data/fracatlas"))
    p.add_argument("--split", type=Path, help="split CSV (python -m training split)")
    p.add_argument("--subset", default="val")
    p.add_argument("--predictions", type=Path, help="reuse a val_predictions.csv instead of running the model")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/study-rule"))
    p.add_argument("--target-sensitivity", type=float, default=0.90)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--write-card", action="store_true")
    _add_threads(p)

    p = sub.add_parser("export", help="checkpoint -> model folder the daemon loads (calibrated on validation)", description="Write a model folder from a training checkpoint (best.pt), calibrated on the run's validation split.")
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt or last.pt from a training run")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--name", default=None)
    p.add_argument("--version", default=None)
    p.add_argument("--half", action="store_true", help="store weights as float16 (half the size)")
    p.add_argument("--target-sensitivity", type=float, default=0.90)
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_threads(p)
    return parser


def _threads(args: argparse.Namespace) -> None:
    """The serving thread rule (``pacs_ai.infer.device.configure_threads``) for every command but ``split``."""
    if args.command != "split":
        from pacs_ai.infer.device import configure_threads

        configure_threads(getattr(args, "threads", None))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _threads(args)
    try:
        return _dispatch(args, argv)
    except (PacsAiError, FileNotFoundError, ValueError) as exc:
        print(f"pacs-ai-train {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    if args.command == "split":
        from training.data import list_dataset, split_items, write_split

        items = list_dataset(args.data)
        split = split_items(items, args.val_fraction, args.seed)
        write_split(args.out, split)
        for k, v in split.items():
            print(f"{k}: {len(v)} images, {sum(i.label for i in v)} fractured, {len({i.group for i in v})} groups")
        print(f"wrote {args.out}")
        return 0
    if args.command == "train":
        from training.train import main as train_main

        cfg = TrainConfig(
            **_run_fields(args), size=args.size, clahe=not args.no_clahe, optimizer=args.optimizer,
            schedule=args.schedule, warmup_epochs=args.warmup_epochs, weights=args.weights, freeze_epochs=args.freeze_epochs,
            freeze_groups=args.freeze_groups, balance=args.balance, label_smoothing=args.label_smoothing, patience=args.patience,
            max_minutes=args.max_minutes, export_dir=str(args.export) if args.export else None, progress=not args.no_progress,
        )
        summary = train_main(cfg, resume_run=args.resume, log=lambda m: print(m, flush=True))
        print(json.dumps(summary))
        return 0
    if args.command == "train-map":
        import shlex

        from training.maptrain import train_map

        cfg = MapTrainConfig(
            **_run_fields(args), scale=args.scale, crop=args.crop, crops_per_epoch=args.crops_per_epoch,
            pct_start=args.pct_start, pool_r=args.pool_r, map_weight=args.map_weight, outside_weight=args.outside_weight,
            pos_fraction=args.pos_fraction, hard_fraction=args.hard_fraction, hard_pool=args.hard_pool,
            checkpoint_minutes=args.checkpoint_minutes, val_limit=args.val_limit, val_batch=args.val_batch,
            workers=args.workers, max_minutes=args.max_minutes,
            command="python -m training " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        )
        summary = train_map(cfg, resume=args.resume, log=lambda m: print(m, flush=True), progress=not args.no_progress)
        print(json.dumps(summary))
        return 0
    if args.command == "evaluate":
        from training.evaluate import evaluate_command

        return evaluate_command(args)
    if args.command == "calibrate":
        from training.evaluate import calibrate_command

        return calibrate_command(args)
    if args.command == "compare":
        from training.compare import compare_command

        return compare_command(args)
    if args.command == "cam-review":
        from training.cam_review import cam_review_command

        return cam_review_command(args)
    if args.command == "study-rule":
        from training.study_rule import study_rule_command

        return study_rule_command(args)
    if args.command == "export":
        from training.evaluate import export_command

        return export_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
