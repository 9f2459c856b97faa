"""The training loop (after torchvision's references/classification/train.py, kept plain).

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
import random
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
from pacs_ai.infer.device import configure_threads, select_device
from pacs_ai.infer.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec, normalise
from training.augment import AugmentConfig, augment_batch
from training.data import Item, list_dataset, load_images, read_split, split_items
from training.export import export_model, machine_description
from training.metrics import binary_metrics, softmax_positive
from training.predict import predict_letterboxed


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in each checkpoint and in the model card)."""

    data: str
    out: str
    arch: str = "densenet121"
    split: str | None = None
    val_fraction: float = 0.2
    seed: int = 0
    size: int = 224
    clahe: bool = True
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
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
    threads: int | None = None
    device: str = "auto"
    cache_dir: str | None = None
    export_dir: str | None = None
    export_name: str = "fracture-classifier"
    export_version: str = "0.1.0"
    export_half: bool = False
    target_sensitivity: float = 0.90
    n_boot: int = 1000
    limit: int | None = None
    progress: bool = True
    augment: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> InputSpec:
        return InputSpec(size=self.size, mean=IMAGENET_MEAN, std=IMAGENET_STD, clahe=self.clahe)


def _subset(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """At most ``limit`` items, keeping both classes (for smoke tests)."""
    if limit is None or len(items) <= limit:
        return items
    rng = random.Random(seed)
    pos = [i for i in items if i.label == 1]
    neg = [i for i in items if i.label == 0]
    k = max(1, min(len(pos), limit // 2))
    return rng.sample(pos, k) + rng.sample(neg, min(len(neg), limit - k))


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


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate()}


def _load_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


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
    if cfg.split:
        split = read_split(Path(cfg.split))
    else:
        split = split_items(list_dataset(Path(cfg.data)), cfg.val_fraction, cfg.seed)
    for k in ("train", "val"):
        if not split.get(k):
            raise ValueError(f"split has no {k!r} items")
    return {"train": _subset(split["train"], cfg.limit, cfg.seed), "val": _subset(split["val"], cfg.limit, cfg.seed + 1)}


def train(cfg: TrainConfig, resume: bool = False, log: Any = print) -> dict[str, Any]:
    """Run (or resume) training. Returns a summary (best AUROC, epochs, seconds, paths)."""
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        import cv2

        configure_threads(cfg.threads)
        cv2.setNumThreads(cfg.threads)
    device = select_device(cfg.device, key="--device")
    random.seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    spec = cfg.spec()
    split = load_split(cfg)
    tr_items, va_items = split["train"], split["val"]
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    x_tr = np.array(load_images(Path(cfg.data), tr_items, spec, cache, progress=cfg.progress))
    x_va = np.array(load_images(Path(cfg.data), va_items, spec, cache, progress=cfg.progress))
    y_tr = np.array([it.label for it in tr_items])
    y_va = np.array([it.label for it in va_items])
    log(f"train {len(y_tr)} images ({int(y_tr.sum())} fractured), val {len(y_va)} ({int(y_va.sum())} fractured), {spec.size}px, device {device}")

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
    steps_per_epoch = max(1, math.ceil(len(y_tr) / cfg.batch_size))
    sched, plan = _schedule(opt, cfg, steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    counts = np.bincount(y_tr, minlength=2).astype(np.float64)
    class_w = torch.tensor(len(y_tr) / (2 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=class_w if cfg.balance == "loss" else None, label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    aug_cfg = AugmentConfig(**cfg.augment)

    start_epoch, best_auc, best_epoch, stale, step, train_elapsed = 0, -1.0, -1, 0, 0, 0.0
    history: list[dict[str, Any]] = []
    if resume and (out / "last.pt").is_file():
        ck = torch.load(out / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start_epoch, best_auc, best_epoch, stale = ck["epoch"] + 1, ck["best_auc"], ck["best_epoch"], ck["stale"]
        step, train_elapsed = ck.get("step", 0), ck.get("elapsed", 0.0)
        history = ck.get("history", [])
        _load_rng_state(np_rng, ck["rng"])
        log(f"resumed from {out / 'last.pt'} at epoch {start_epoch} (best AUROC {best_auc:.4f} at epoch {best_epoch + 1})")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    epoch_seconds: list[float] = []
    sampler_p = None
    if cfg.balance == "sampler":
        w = (1.0 / np.maximum(counts, 1))[y_tr]
        sampler_p = w / w.sum()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        frozen = epoch < cfg.freeze_epochs
        model.train()
        _set_frozen(model, cfg.arch, cfg.freeze_groups, frozen)
        if sampler_p is not None:
            order = np_rng.choice(len(y_tr), size=len(y_tr), p=sampler_p)
        else:
            order = np_rng.permutation(len(y_tr))
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        bar: Any = batches
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}{' (frozen)' if frozen else ''}", unit="batch", mininterval=5.0 if sys.stderr.isatty() else 60.0)
        run_loss, seen = 0.0, 0
        for idx in bar:
            imgs = augment_batch(x_tr[idx], np_rng, aug_cfg)
            x = normalise(imgs, spec).to(device).contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(y_tr[idx], device=device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            if plan is not None:
                plan.progress = max(step / total_steps, (train_elapsed + time.time() - t0) / budget_s if budget_s else 0.0)
            sched.step()
            run_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
            if cfg.progress:
                bar.set_postfix(loss=f"{run_loss / seen:.4f}", img_s=f"{seen / (time.time() - t0):.1f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
        train_s = time.time() - t0
        logits = predict_letterboxed(model, x_va, spec, batch_size=32, device=device)
        prob = softmax_positive(logits)
        m = binary_metrics(y_va, prob, 0.5)
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_va)).item())
        improved = m["auc"] > best_auc
        if improved:
            best_auc, best_epoch, stale = m["auc"], epoch, 0
        else:
            stale += 1
        ep_s = time.time() - t0
        train_elapsed += ep_s
        epoch_seconds.append(ep_s)
        rec = {
            "epoch": epoch + 1,
            "train_loss": run_loss / max(1, seen),
            "val_loss": val_loss,
            "val_auc": m["auc"],
            "val_sens@0.5": m["sensitivity"],
            "val_spec@0.5": m["specificity"],
            "lr": sched.get_last_lr()[0],
            "train_img_s": seen / max(train_s, 1e-9),
            "seconds": ep_s,
            "elapsed_min": (time.time() - t_start) / 60,
        }
        history.append(rec)
        log(json.dumps(rec))
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "best_auc": best_auc,
            "best_epoch": best_epoch,
            "stale": stale,
            "step": step,
            "elapsed": train_elapsed,
            "rng": _rng_state(np_rng),
            "config": asdict(cfg),
            "history": history,
        }
        torch.save(state, out / "last.tmp")
        (out / "last.tmp").replace(out / "last.pt")
        if improved:
            torch.save({"model": model.state_dict(), "config": asdict(cfg), "epoch": epoch, "val_auc": best_auc, "history": history}, out / "best.tmp")
            (out / "best.tmp").replace(out / "best.pt")
            np.savez(out / "best_val_logits.npz", logits=logits, y=y_va)
            if cfg.export_dir:
                info = training_info(cfg, weights_desc, len(y_tr), len(y_va), int(y_tr.sum()), int(y_va.sum()), epoch + 1, history, time.time() - t_start)
                card = export_model(
                    Path(cfg.export_dir), model, cfg.arch, spec, logits, y_va,
                    name=cfg.export_name, version=cfg.export_version, training=info,
                    target_sensitivity=cfg.target_sensitivity, half=cfg.export_half,
                    description=default_description(cfg, weights_desc), n_boot=cfg.n_boot,
                )
                v = card.metrics["validation"]
                log(f"exported epoch {epoch + 1} to {cfg.export_dir}: AUROC {v['auc']:.4f} {v['ci95'].get('auc')}, T={card.temperature:.3f}, threshold={card.threshold:.4f}")
        (out / "history.json").write_text(json.dumps(history, indent=2))
        if stale >= cfg.patience:
            log(f"early stop: no AUROC improvement for {stale} epochs")
            break
        if budget_s is not None and train_elapsed + 0.8 * max(epoch_seconds) > budget_s:
            log(f"time budget: {train_elapsed / 60:.1f} min used of {cfg.max_minutes} min; stopping")
            break
    return {"best_auc": best_auc, "best_epoch": best_epoch + 1, "epochs_run": len(history), "seconds": time.time() - t_start, "out": str(out)}


def training_info(cfg: TrainConfig, weights_desc: str, n_tr: int, n_va: int, pos_tr: int, pos_va: int, epoch: int, history: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The card's ``training`` object."""
    return {
        "data": Path(cfg.data).name,
        "dataset": "FracAtlas (Abedeen et al., Scientific Data 10, 521, 2023; CC BY 4.0)" if "fracatlas" in str(cfg.data).lower() else str(cfg.data),
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
