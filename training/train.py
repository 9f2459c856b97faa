"""The classifier training loop (``python -m training train``), cut as torchvision's
references/classification/train.py: :func:`train_one_epoch`, :func:`evaluate`, the checkpoint helpers
(:func:`checkpoint_state`, :func:`resume`; files written by ``training.loop.save_checkpoint``) and
:func:`main`.

One epoch = shuffled batches of augmented letterboxed images -> weighted cross-entropy -> AdamW/SGD
with a per-step schedule (one-cycle or warm-up + cosine). After each epoch: validation AUROC, a
checkpoint (``last.pt``; ``best.pt`` when AUROC improves) holding model, optimizer, scheduler, epoch,
best AUROC and RNG states, so ``--resume`` continues exactly. On improvement the model is also exported
(calibrated) when ``export_dir`` is set, so a usable model exists whenever training stops. Early
stopping on validation AUROC (``patience``) and an optional wall-clock budget (``max_minutes``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pacs_ai.errors import ModelError
from pacs_ai.infer.architectures import build_model, layer_groups, load_backbone_weights
from pacs_ai.infer.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec, normalise
from training.augment import AugmentConfig, augment_batch
from training.data import Item, load_images
from training.export import export_model, machine_description
from training.loop import (
    RunConfig,
    dataset_description,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    schedule_progress,
    start_run,
    write_config,
)
from training.loop import load_split as _load_split
from training.metrics import binary_metrics, softmax_positive
from training.predict import predict_letterboxed

__all__ = [
    "Parts",
    "RunState",
    "TrainConfig",
    "checkpoint_state",
    "evaluate",
    "load_split",
    "main",
    "resume",
    "train_one_epoch",
    "training_info",
]


@dataclass
class TrainConfig(RunConfig):
    """Everything a classifier run depends on (stored in each checkpoint and in the model card): the
    shared :class:`~training.loop.RunConfig` plus the classifier's own settings."""

    size: int = 224
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    weights: str = "none"
    freeze_epochs: int = 0
    freeze_groups: int = -2
    balance: str = "loss"
    label_smoothing: float = 0.0
    patience: int = 10
    max_minutes: float | None = None
    export_dir: str | None = None
    progress: bool = True

    def spec(self) -> InputSpec:
        return InputSpec(size=self.size, mean=IMAGENET_MEAN, std=IMAGENET_STD, clahe=self.clahe)


def resolve_weights(model: nn.Module, arch: str, weights: str) -> str:
    """Apply ``--weights``: ``none`` (random init), ``imagenet`` (torchvision's local cache) or a file."""
    if weights == "none":
        return "none (trained from scratch)"
    if weights == "imagenet":
        import torchvision.models as tvm

        enum = {"resnet50": tvm.ResNet50_Weights.IMAGENET1K_V2, "vgg16": tvm.VGG16_Weights.IMAGENET1K_V1, "densenet121": tvm.DenseNet121_Weights.IMAGENET1K_V1}[arch]
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        if not path.is_file():
            raise ModelError(
                f"--weights imagenet: {path} is not in torchvision's local cache and nothing is downloaded here; "
                f"copy the file there (from {enum.url}) or pass --weights FILE, or use --weights none"
            )
        load_backbone_weights(model, arch, path)
        return f"imagenet ({path.name})"
    load_backbone_weights(model, arch, Path(weights))
    return f"file {Path(weights).name}"


def _set_frozen(model: nn.Module, arch: str, n_groups: int, frozen: bool) -> None:
    """Freeze (or unfreeze) the first ``n_groups`` layer groups; frozen BatchNorms keep their statistics."""
    for g in layer_groups(model, arch)[: n_groups if n_groups >= 0 else len(layer_groups(model, arch)) + n_groups]:
        for p in g.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            g.eval()


class CosinePlan:
    """Linear warm-up then cosine decay to ``floor`` x lr, driven by a progress value in [0, 1].

    Progress is ``max(step / total_steps, elapsed / budget)``: with a wall-clock budget the learning rate
    reaches its floor when the time is spent, even if a busy machine made the epochs slower.
    """

    def __init__(self, warmup: float, floor: float = 1e-3) -> None:
        self.warmup = warmup
        self.floor = floor
        self.progress = 0.0

    def __call__(self, _step: int) -> float:
        p = min(1.0, self.progress)
        if p < self.warmup:
            return max(1e-3, p / self.warmup)
        q = (p - self.warmup) / max(1e-9, 1.0 - self.warmup)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * q))


def _schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> tuple[torch.optim.lr_scheduler.LRScheduler, CosinePlan | None]:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(0.5, max(0.0, cfg.warmup_epochs / max(1, cfg.epochs)))
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=max(0.01, warm), div_factor=25, final_div_factor=1e3), None
    if cfg.schedule != "cosine":
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    plan = CosinePlan(warm)
    return torch.optim.lr_scheduler.LambdaLR(opt, plan), plan


def load_split(cfg: TrainConfig) -> dict[str, list[Item]]:
    """The run's train and validation items (``training.loop.load_split``)."""
    return _load_split(cfg.data, cfg.split, cfg.val_fraction, cfg.seed, cfg.limit)


@dataclass
class Parts:
    """The model and what updates it (built by :func:`build_parts`)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: CosinePlan | None
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    weights: str
    """What ``--weights`` loaded (for the card)."""


@dataclass
class RunState:
    """Where a run stands; saved in ``last.pt`` and restored by :func:`resume`."""

    next_epoch: int = 0
    best_auc: float = -1.0
    best_epoch: int = -1
    stale: int = 0
    step: int = 0
    elapsed: float = 0.0
    """Seconds of training (all epochs, all sessions): paces the cosine schedule and the budget."""
    history: list[dict[str, Any]] = field(default_factory=list)


def build_parts(cfg: TrainConfig, y_tr: np.ndarray, device: torch.device) -> Parts:
    """Model (``--weights`` applied), optimizer, per-step schedule, AMP scaler and class-weighted loss."""
    model = build_model(cfg.arch, 2)
    weights_desc = resolve_weights(model, cfg.arch, cfg.weights)
    model.to(device).to(memory_format=torch.channels_last)
    params = [p for p in model.parameters()]
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    sched, plan = _schedule(opt, cfg, steps_per_epoch(cfg, len(y_tr)))
    counts = np.bincount(y_tr, minlength=2).astype(np.float64)
    class_w = torch.tensor(len(y_tr) / (2 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=class_w if cfg.balance == "loss" else None, label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    return Parts(model, opt, sched, plan, scaler, loss_fn, weights_desc)


def steps_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    return max(1, math.ceil(n_train / cfg.batch_size))


def epoch_order(cfg: TrainConfig, y_tr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of one epoch: a permutation, or (``balance="sampler"``) a class-balanced draw with replacement."""
    if cfg.balance == "sampler":
        counts = np.bincount(y_tr, minlength=2).astype(np.float64)
        w = (1.0 / np.maximum(counts, 1))[y_tr]
        return rng.choice(len(y_tr), size=len(y_tr), p=w / w.sum())
    return rng.permutation(len(y_tr))


def train_one_epoch(
    parts: Parts, cfg: TrainConfig, x_tr: np.ndarray, y_tr: np.ndarray, epoch: int, state: RunState,
    rng: np.random.Generator, device: torch.device,
) -> dict[str, float]:
    """One pass over the training images (augmented, normalised as served); steps the schedule per batch
    and advances ``state.step``. Returns ``{"train_loss", "train_img_s", "seen"}``."""
    t0 = time.time()
    spec = cfg.spec()
    model, opt, sched, scaler = parts.model, parts.optimizer, parts.scheduler, parts.scaler
    frozen = epoch < cfg.freeze_epochs
    model.train()
    _set_frozen(model, cfg.arch, cfg.freeze_groups, frozen)
    order = epoch_order(cfg, y_tr, rng)
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    total_steps = cfg.epochs * steps_per_epoch(cfg, len(y_tr))
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    aug_cfg = AugmentConfig(**cfg.augment)
    bar: Any = batches
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}{' (frozen)' if frozen else ''}", unit="batch", mininterval=5.0 if sys.stderr.isatty() else 60.0)
    run_loss, seen = 0.0, 0
    for idx in bar:
        imgs = augment_batch(x_tr[idx], rng, aug_cfg)
        x = normalise(imgs, spec).to(device).contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(y_tr[idx], device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            loss = parts.loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        state.step += 1
        if parts.plan is not None:
            parts.plan.progress = schedule_progress(state.step, total_steps, state.elapsed + time.time() - t0, budget_s)
        sched.step()
        run_loss += float(loss.detach()) * len(idx)
        seen += len(idx)
        if cfg.progress:
            bar.set_postfix(loss=f"{run_loss / seen:.4f}", img_s=f"{seen / (time.time() - t0):.1f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
    return {"train_loss": run_loss / max(1, seen), "train_img_s": seen / max(time.time() - t0, 1e-9), "seen": seen}


def evaluate(model: nn.Module, x_va: np.ndarray, y_va: np.ndarray, spec: InputSpec, device: torch.device) -> dict[str, Any]:
    """Validation: logits (N, 2), AUROC, sensitivity and specificity at 0.5, cross-entropy loss."""
    logits = predict_letterboxed(model, x_va, spec, batch_size=32, device=device)
    m = binary_metrics(y_va, softmax_positive(logits), 0.5)
    val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_va)).item())
    return {"logits": logits, "auc": m["auc"], "sensitivity": m["sensitivity"], "specificity": m["specificity"], "loss": val_loss}


def checkpoint_state(parts: Parts, state: RunState, epoch: int, rng: np.random.Generator, cfg: TrainConfig) -> dict[str, Any]:
    """The ``last.pt`` dictionary after ``epoch`` (keys as always: model, optimizer, scheduler, scaler,
    epoch, best_auc, best_epoch, stale, step, elapsed, rng, config, history)."""
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "epoch": epoch,
        "best_auc": state.best_auc,
        "best_epoch": state.best_epoch,
        "stale": state.stale,
        "step": state.step,
        "elapsed": state.elapsed,
        "rng": rng_state(rng),
        "config": asdict(cfg),
        "history": state.history,
    }


def resume(path: Path, parts: Parts, rng: np.random.Generator, device: torch.device) -> RunState:
    """Load ``last.pt`` into ``parts`` and ``rng``; returns the run state to continue from."""
    ck = load_checkpoint(path, device)
    parts.model.load_state_dict(ck["model"])
    parts.optimizer.load_state_dict(ck["optimizer"])
    parts.scheduler.load_state_dict(ck["scheduler"])
    parts.scaler.load_state_dict(ck["scaler"])
    restore_rng_state(rng, ck["rng"])
    return RunState(
        next_epoch=ck["epoch"] + 1, best_auc=ck["best_auc"], best_epoch=ck["best_epoch"], stale=ck["stale"],
        step=ck.get("step", 0), elapsed=ck.get("elapsed", 0.0), history=ck.get("history", []),
    )


def main(cfg: TrainConfig, resume_run: bool = False, log: Any = print) -> dict[str, Any]:
    """Run (or resume) training. Returns a summary (best AUROC, epochs, seconds, paths)."""
    t_start = time.time()
    out, device = start_run(cfg.out, cfg.threads, cfg.device, cfg.seed)
    if cfg.threads:
        import cv2

        cv2.setNumThreads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)

    spec = cfg.spec()
    split = load_split(cfg)
    tr_items, va_items = split["train"], split["val"]
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    x_tr = np.array(load_images(Path(cfg.data), tr_items, spec, cache, progress=cfg.progress))
    x_va = np.array(load_images(Path(cfg.data), va_items, spec, cache, progress=cfg.progress))
    y_tr = np.array([it.label for it in tr_items])
    y_va = np.array([it.label for it in va_items])
    log(f"train {len(y_tr)} images ({int(y_tr.sum())} fractured), val {len(y_va)} ({int(y_va.sum())} fractured), {spec.size}px, device {device}")

    parts = build_parts(cfg, y_tr, device)
    state = RunState()
    if resume_run and (out / "last.pt").is_file():
        state = resume(out / "last.pt", parts, rng, device)
        log(f"resumed from {out / 'last.pt'} at epoch {state.next_epoch} (best AUROC {state.best_auc:.4f} at epoch {state.best_epoch + 1})")
    write_config(out, cfg)

    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    epoch_seconds: list[float] = []
    for epoch in range(state.next_epoch, cfg.epochs):
        t0 = time.time()
        tr = train_one_epoch(parts, cfg, x_tr, y_tr, epoch, state, rng, device)
        v = evaluate(parts.model, x_va, y_va, spec, device)
        improved = v["auc"] > state.best_auc
        if improved:
            state.best_auc, state.best_epoch, state.stale = v["auc"], epoch, 0
        else:
            state.stale += 1
        ep_s = time.time() - t0
        state.elapsed += ep_s
        epoch_seconds.append(ep_s)
        rec = {
            "epoch": epoch + 1,
            "train_loss": tr["train_loss"],
            "val_loss": v["loss"],
            "val_auc": v["auc"],
            "val_sens@0.5": v["sensitivity"],
            "val_spec@0.5": v["specificity"],
            "lr": parts.scheduler.get_last_lr()[0],
            "train_img_s": tr["train_img_s"],
            "seconds": ep_s,
            "elapsed_min": (time.time() - t_start) / 60,
        }
        state.history.append(rec)
        log(json.dumps(rec))
        save_checkpoint(checkpoint_state(parts, state, epoch, rng, cfg), out / "last.pt")
        if improved:
            save_best(parts, cfg, spec, epoch, state, v["logits"], y_va, out, t_start, log, n_train=(len(y_tr), int(y_tr.sum())))
        (out / "history.json").write_text(json.dumps(state.history, indent=2))
        if state.stale >= cfg.patience:
            log(f"early stop: no AUROC improvement for {state.stale} epochs")
            break
        if budget_s is not None and state.elapsed + 0.8 * max(epoch_seconds) > budget_s:
            log(f"time budget: {state.elapsed / 60:.1f} min used of {cfg.max_minutes} min; stopping")
            break
    return {"best_auc": state.best_auc, "best_epoch": state.best_epoch + 1, "epochs_run": len(state.history), "seconds": time.time() - t_start, "out": str(out)}


def save_best(
    parts: Parts, cfg: TrainConfig, spec: InputSpec, epoch: int, state: RunState, logits: np.ndarray, y_va: np.ndarray,
    out: Path, t_start: float, log: Any, n_train: tuple[int, int],
) -> None:
    """``best.pt`` (weights, config, epoch, AUROC, history), the validation logits, and the calibrated
    export to ``cfg.export_dir`` when set."""
    model = parts.model
    save_checkpoint({"model": model.state_dict(), "config": asdict(cfg), "epoch": epoch, "val_auc": state.best_auc, "history": state.history}, out / "best.pt")
    np.savez(out / "best_val_logits.npz", logits=logits, y=y_va)
    if cfg.export_dir:
        info = training_info(cfg, parts.weights, n_train[0], len(y_va), n_train[1], int(y_va.sum()), epoch + 1, state.history, time.time() - t_start)
        card = export_model(
            Path(cfg.export_dir), model, cfg.arch, spec, logits, y_va,
            name=cfg.export_name, version=cfg.export_version, training=info,
            target_sensitivity=cfg.target_sensitivity, half=cfg.export_half,
            description=default_description(cfg, parts.weights), n_boot=cfg.n_boot,
        )
        v = card.metrics["validation"]
        log(f"exported epoch {epoch + 1} to {cfg.export_dir}: AUROC {v['auc']:.4f} {v['ci95'].get('auc')}, T={card.temperature:.3f}, threshold={card.threshold:.4f}")


def training_info(cfg: TrainConfig, weights_desc: str, n_tr: int, n_va: int, pos_tr: int, pos_va: int, epoch: int, history: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The card's ``training`` object."""
    return {
        "data": Path(cfg.data).name,
        "dataset": dataset_description(cfg.data),
        "split": f"group-aware, label-stratified; val_fraction {cfg.val_fraction}, seed {cfg.seed}" if not cfg.split else f"split file {Path(cfg.split).name}",
        "n_train": n_tr,
        "n_train_fractured": pos_tr,
        "n_val": n_va,
        "n_val_fractured": pos_va,
        "weights": weights_desc,
        "epoch": epoch,
        "epochs_planned": cfg.epochs,
        "input_size": cfg.size,
        "batch_size": cfg.batch_size,
        "optimizer": f"{cfg.optimizer} lr {cfg.lr} weight_decay {cfg.weight_decay}, {cfg.schedule} schedule",
        "class_balance": cfg.balance,
        "augmentation": {**asdict(AugmentConfig(**cfg.augment))},
        "freeze_epochs": cfg.freeze_epochs,
        "seconds": round(seconds, 1),
        "machine": machine_description(),
        "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items() if k in ("epoch", "train_loss", "val_loss", "val_auc")} for h in history],
    }


def default_description(cfg: TrainConfig, weights_desc: str) -> str:
    return (
        f"{cfg.arch} fracture / no-fracture classifier for radiographs, {cfg.size}px letterboxed input with CLAHE. "
        f"Weights: {weights_desc}. Research use only; not a medical device; not for diagnostic use."
    )
