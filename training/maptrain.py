"""Localisation-supervised training of a fracture-map model (``python -m training train-map``).

The model (:class:`pacs_ai.infer.architectures.FractureMapNet`) gives one fracture logit per cell of its
last feature map and an image logit by log-sum-exp pooling of that map. Training uses the FracAtlas
fracture boxes (``boxes.csv``, fractions of width and height):

- images are letterboxed once at ``scale`` px (the serving preprocessing, ``preprocess.letterbox``
  with CLAHE at that scale) and cached as uint8;
- each step takes ``crop`` px crops: half from fractured images, centred near a random box (jittered),
  half from normal images, at random or (``hard_fraction``) at the hottest cell found by the previous
  epoch's whole-image pass over a sample of normal training images (hard negatives);
- the crop and a mask of its boxes go through the same random affine (``augment.augment_with_mask``);
- cell targets: a cell is positive when its box coverage is at least ``pos_coverage`` (or it is the
  best-covered cell of a crop whose coverage is positive); every cell of a normal image is negative
  (weight 1); cells of a fractured image outside every box are negative with weight ``outside_weight``
  (0 = ignored); partly covered cells are ignored;
- loss = image BCE on the pooled logit (crops of a fractured image that lost their box are left out)
  + ``map_weight`` x class-balanced cell BCE;
- AdamW with a one-cycle schedule over ``epochs * crops_per_epoch / batch_size`` steps, or, with
  ``max_minutes``, over whichever of those steps and that wall-clock budget runs out first (the run then
  ends when the budget is spent, after validating the epoch it cut short: a run sized to the machine it is
  on, at the price of a step count that depends on that machine);
- ``workers`` > 0 builds batches in that many DataLoader worker processes (each batch depends only on the
  seed, the epoch and its index, so the crops do not depend on the number of workers).

Validation after every epoch runs the whole letterboxed validation images (``scale`` px, as served)
through the model: AUROC of the pooled probability and the pointing game of the model's own map
(``pacs_ai.explain.fracture_map.cells_to_heat``, the explainer the daemon uses). Checkpoints: ``last.pt``
(everything needed to continue, also written every ``checkpoint_minutes`` inside an epoch: a resumed run
replays the interrupted epoch's crop plan and skips the batches already done), ``epoch-NNN.pt`` (weights
+ validation figures) and ``best.pt``; the best epoch by AUROC is exported, calibrated, to
``OUT/model-best`` (a model folder the daemon loads). The group-aware split is written to
``OUT/split.csv``.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pacs_ai.explain.fracture_map import cells_to_heat
from pacs_ai.infer.architectures import FractureMapNet, build_model
from pacs_ai.infer.preprocess import IMAGENET_MEAN, IMAGENET_STD, Geometry, InputSpec, normalise, read_gray
from training.augment import AugmentConfig, augment_with_mask
from training.data import Item, load_images, write_split
from training.export import export_model, machine_description
from training.loop import RunConfig, dataset_description, load_checkpoint, load_split, save_checkpoint, schedule_progress, start_run, write_config
from training.metrics import binary_metrics
from training.pointing import Box, boxes_on_grid, peak_hit, pointing_game, read_boxes

PixelBox = tuple[float, float, float, float]


@dataclass
class MapTrainConfig(RunConfig):
    """Everything a fracture-map run depends on (stored in each checkpoint and in the model card): the
    shared :class:`~training.loop.RunConfig` (with this run's defaults) plus the map's own settings."""

    epochs: int = 12
    weight_decay: float = 0.05
    export_name: str = "pacs-ai-fracture-map"
    export_version: str = "2.0.0"
    scale: int = 512
    crop: int = 256
    crops_per_epoch: int = 2048
    pct_start: float = 0.25
    pool_r: float = 5.0
    map_weight: float = 1.0
    pos_coverage: float = 0.2
    outside_weight: float = 0.1
    pos_fraction: float = 0.5
    box_jitter: float = 0.35
    hard_fraction: float = 0.3
    hard_pool: int = 128
    checkpoint_minutes: float = 10.0
    val_batch: int = 8
    val_limit: int | None = None
    workers: int = 0
    max_minutes: float | None = None
    command: str = ""

    def spec(self) -> InputSpec:
        """The serving input: the whole image letterboxed at ``scale`` px."""
        return InputSpec(size=self.scale, mean=IMAGENET_MEAN, std=IMAGENET_STD, clahe=self.clahe)


# ----------------------------------------------------------------------------------------------------
# Data: geometries, boxes, crops and cell targets
# ----------------------------------------------------------------------------------------------------


def item_geometries(root: Path, items: list[Item], size: int) -> list[Geometry]:
    """Letterbox geometry of each item at ``size``: original size from ``manifest.csv`` (width,
    height) when it has them, else read from the image."""
    dims: dict[str, tuple[int, int]] = {}
    manifest = Path(root) / "manifest.csv"
    if manifest.is_file():
        with manifest.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("width") and row.get("height"):
                    dims[row["file"]] = (int(row["height"]), int(row["width"]))
    out = []
    for it in items:
        h, w = dims.get(it.file) or read_gray(Path(root) / it.file).shape
        out.append(Geometry.for_image(h, w, size))
    return out


def box_mask(shape: tuple[int, int], boxes: list[PixelBox], top: int = 0, left: int = 0) -> np.ndarray:
    """float32 mask (h, w): 1 inside any pixel box (x0, y0, x1, y1) shifted by the crop origin."""
    m = np.zeros(shape, dtype=np.float32)
    h, w = shape
    for x0, y0, x1, y1 in boxes:
        a, b = max(0, int(math.floor(y0 - top))), min(h, int(math.ceil(y1 - top)))
        c, d = max(0, int(math.floor(x0 - left))), min(w, int(math.ceil(x1 - left)))
        if b > a and d > c:
            m[a:b, c:d] = 1.0
    return m


def cell_targets(mask: np.ndarray, stride: int, fractured: bool, pos_coverage: float, outside_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Box mask (S, S) -> cell targets and weights (S/stride, S/stride), float32.

    Positive: coverage >= ``pos_coverage``, or the best-covered cell when some coverage exists but no cell
    reaches it (small boxes). Partly covered cells: weight 0. Normal image: every cell negative, weight 1.
    Fractured image, uncovered cells: negative with weight ``outside_weight``.
    """
    g = mask.shape[0] // stride
    if not fractured:
        return np.zeros((g, g), np.float32), np.ones((g, g), np.float32)
    cov = mask[: g * stride, : g * stride].reshape(g, stride, g, stride).mean(axis=(1, 3))
    target = (cov >= pos_coverage).astype(np.float32)
    if not target.any() and cov.max() > 0:
        target[np.unravel_index(int(np.argmax(cov)), cov.shape)] = 1.0
    weight = np.where(target > 0, 1.0, np.where(cov > 0, 0.0, outside_weight)).astype(np.float32)
    return target, weight


@dataclass
class TrainData:
    """Cached letterboxed images and their boxes (pixel coordinates on the letterboxed square)."""

    items: list[Item]
    images: np.ndarray
    geometries: list[Geometry]
    boxes: list[list[PixelBox]]
    raw_boxes: list[list[Box]]

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items])


def load_data(cfg: MapTrainConfig, items: list[Item], boxes: dict[str, list[Box]], progress: bool = True) -> TrainData:
    spec = cfg.spec()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    images = load_images(Path(cfg.data), items, spec, cache, progress=progress, workers=max(1, cfg.workers))
    geoms = item_geometries(Path(cfg.data), items, spec.size)
    raw = [boxes.get(it.file, []) if it.label == 1 else [] for it in items]
    return TrainData(items, images, geoms, [boxes_on_grid(b, g) for b, g in zip(raw, geoms, strict=True)], raw)


def _crop_origin(cy: float, cx: float, crop: int, size: int) -> tuple[int, int]:
    top = int(round(cy - crop / 2))
    left = int(round(cx - crop / 2))
    return min(max(0, top), size - crop), min(max(0, left), size - crop)


def plan_epoch(cfg: MapTrainConfig, data: TrainData, hard: list[tuple[int, float, float]], rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """The epoch's crops: ``(image index, top, left, is_fracture_crop)``; deterministic for ``rng``."""
    size, crop = cfg.scale, cfg.crop
    labels = data.labels
    boxed = [i for i in range(len(labels)) if labels[i] == 1 and data.boxes[i]]
    normal = np.flatnonzero(labels == 0)
    if not boxed or len(normal) == 0:
        raise ValueError("training needs fractured images with boxes and normal images")
    n_pos = int(round(cfg.crops_per_epoch * cfg.pos_fraction))
    plan: list[tuple[int, int, int, int]] = []
    for _ in range(n_pos):
        i = boxed[int(rng.integers(len(boxed)))]
        x0, y0, x1, y1 = data.boxes[i][int(rng.integers(len(data.boxes[i])))]
        j = cfg.box_jitter * crop
        cy = (y0 + y1) / 2 + rng.uniform(-j, j)
        cx = (x0 + x1) / 2 + rng.uniform(-j, j)
        plan.append((i, *_crop_origin(cy, cx, crop, size), 1))
    for _ in range(cfg.crops_per_epoch - n_pos):
        if hard and rng.random() < cfg.hard_fraction:
            i, cy, cx = hard[int(rng.integers(len(hard)))]
            j = 0.25 * crop
            cy, cx = cy + rng.uniform(-j, j), cx + rng.uniform(-j, j)
        else:
            i = int(normal[int(rng.integers(len(normal)))])
            g = data.geometries[i]
            cy = g.pad_top + rng.uniform(0, g.new_h)
            cx = g.pad_left + rng.uniform(0, g.new_w)
        plan.append((int(i), *_crop_origin(cy, cx, crop, size), 0))
    order = rng.permutation(len(plan))
    return [plan[k] for k in order]


def make_batch(cfg: MapTrainConfig, data: TrainData, entries: list[tuple[int, int, int, int]], stride: int, rng: np.random.Generator, aug: AugmentConfig) -> dict[str, torch.Tensor]:
    """Crops -> augmented network input and targets: x (B, 3, C, C), cell target/weight (B, g, g),
    image label and image-label mask (B,)."""
    crop = cfg.crop
    imgs, targets, weights, ylab, ymask = [], [], [], [], []
    for i, top, left, frac in entries:
        img = np.ascontiguousarray(data.images[i, top : top + crop, left : left + crop])
        mask = box_mask((crop, crop), data.boxes[i], top, left) if frac else np.zeros((crop, crop), np.float32)
        img, mask = augment_with_mask(img, mask, rng, aug)
        t, w = cell_targets(mask, stride, bool(frac), cfg.pos_coverage, cfg.outside_weight)
        imgs.append(img)
        targets.append(t)
        weights.append(w)
        has_box = bool(t.any())
        ylab.append(1.0 if frac else 0.0)
        ymask.append(1.0 if (not frac or has_box) else 0.0)
    spec = InputSpec(size=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD, clahe=cfg.clahe)
    return {
        "x": normalise(np.stack(imgs), spec),
        "target": torch.from_numpy(np.stack(targets)),
        "weight": torch.from_numpy(np.stack(weights)),
        "y": torch.tensor(ylab),
        "y_mask": torch.tensor(ymask),
    }


def map_loss(logits: torch.Tensor, cells: torch.Tensor, batch: dict[str, torch.Tensor], map_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Image BCE (pooled logit, labelled crops only) + ``map_weight`` x class-balanced weighted cell BCE."""
    z = logits[:, 1]
    y, ym = batch["y"].to(z.device), batch["y_mask"].to(z.device)
    img = (F.binary_cross_entropy_with_logits(z, y, reduction="none") * ym).sum() / ym.sum().clamp(min=1.0)
    c = cells[:, 0].float()
    t, w = batch["target"].to(c.device), batch["weight"].to(c.device)
    bce = F.binary_cross_entropy_with_logits(c, t, reduction="none")
    wp, wn = w * t, w * (1 - t)
    cell = (bce * wp).sum() / wp.sum().clamp(min=1.0) + (bce * wn).sum() / wn.sum().clamp(min=1.0)
    loss = img + map_weight * cell
    return loss, {"image_loss": float(img.detach()), "map_loss": float(cell.detach())}


# ----------------------------------------------------------------------------------------------------
# Whole-image passes: validation and hard-negative mining
# ----------------------------------------------------------------------------------------------------


@torch.inference_mode()
def whole_image_pass(model: FractureMapNet, images: np.ndarray, spec: InputSpec, indices: list[int] | np.ndarray, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Letterboxed uint8 images -> (N,) pooled logits and (N, h, w) cell logits, as served."""
    model.eval()
    zs, maps = [], []
    idx = list(indices)
    for s in range(0, len(idx), batch_size):
        sel = idx[s : s + batch_size]
        x = normalise(np.ascontiguousarray(images[sel]), spec).to(device).contiguous(memory_format=torch.channels_last)
        logits, cells = model.forward_map(x)
        zs.append(logits[:, 1].float().cpu().numpy())
        maps.append(cells[:, 0].float().cpu().numpy())
    if not zs:
        return np.zeros(0, np.float32), np.zeros((0, 1, 1), np.float32)
    return np.concatenate(zs), np.concatenate(maps)


def validate(model: FractureMapNet, data: TrainData, spec: InputSpec, batch_size: int, device: torch.device) -> dict[str, Any]:
    """AUROC of the pooled probability and pointing game of the served heat map on whole images."""
    z, cells = whole_image_pass(model, data.images, spec, np.arange(len(data.items)), batch_size, device)
    y = data.labels
    m = binary_metrics(y, 1.0 / (1.0 + np.exp(-z)), 0.5)
    hits = []
    for i in range(len(y)):
        if y[i] == 1 and data.raw_boxes[i]:
            heat = cells_to_heat(torch.from_numpy(cells[i : i + 1]), spec.size)[0].numpy()
            hits.append(peak_hit(heat, data.raw_boxes[i], data.geometries[i]))
    pg = pointing_game(hits)
    return {"auc": m["auc"], "sens@0.5": m["sensitivity"], "spec@0.5": m["specificity"], **pg, "z": z}


def mine_hard_negatives(model: FractureMapNet, data: TrainData, spec: InputSpec, cfg: MapTrainConfig, rng: np.random.Generator, device: torch.device) -> list[tuple[int, float, float]]:
    """Hottest cell of ``hard_pool`` random normal training images; keeps the hotter half as
    ``(image index, y, x)`` centres (letterboxed pixels) for next epoch's hard-negative crops."""
    normal = np.flatnonzero(data.labels == 0)
    if cfg.hard_pool <= 0 or cfg.hard_fraction <= 0 or len(normal) == 0:
        return []
    pick = rng.choice(normal, size=min(cfg.hard_pool, len(normal)), replace=False)
    _, cells = whole_image_pass(model, data.images, spec, pick, cfg.val_batch, device)
    stride = spec.size / cells.shape[-1]
    found = []
    for i, c in zip(pick, cells, strict=True):
        gy, gx = np.unravel_index(int(np.argmax(c)), c.shape)
        found.append((float(c.max()), int(i), (gy + 0.5) * stride, (gx + 0.5) * stride))
    found.sort(reverse=True)
    return [(i, cy, cx) for _, i, cy, cx in found[: max(1, len(found) // 2)]]


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def monitor_subset(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """The validation images scored after each epoch: all of them, or (``limit``) every fractured image
    (at most half of ``limit``) plus a fixed random sample of normal ones up to ``limit`` (cheaper monitoring on a busy CPU; the
    chosen checkpoint is then exported and scored on the whole validation split)."""
    if limit is None or len(items) <= limit:
        return items
    pos = [it for it in items if it.label == 1]
    neg = [it for it in items if it.label == 0]
    rng = random.Random(seed + 17)
    n_pos = min(len(pos), max(1, limit // 2))
    keep_neg = set(it.file for it in rng.sample(neg, max(0, min(len(neg), limit - n_pos))))
    keep_pos = set(it.file for it in (pos if n_pos == len(pos) else random.Random(seed + 18).sample(pos, n_pos)))
    return [it for it in items if it.file in keep_pos or it.file in keep_neg]


class OneCyclePlan:
    """Learning-rate factor of a one-cycle schedule driven by a progress value in [0, 1]: cosine from
    1/``div_factor`` up to 1 over ``pct_start``, then cosine down to 1/(``div_factor`` x ``final_div_factor``);
    the shape of ``torch.optim.lr_scheduler.OneCycleLR`` (Smith & Topin 2019) without its momentum cycle.

    Progress is set by the loop with :func:`training.loop.schedule_progress` (``max_minutes``), so the
    schedule ends when the steps or the time run out, whichever comes first. Used through ``LambdaLR``,
    whose ``state_dict`` keeps ``progress`` for ``--resume``.
    """

    def __init__(self, pct_start: float, div_factor: float = 25.0, final_div_factor: float = 1e3) -> None:
        self.pct_start = min(max(pct_start, 1e-6), 1.0)
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        self.progress = 0.0

    def __call__(self, _step: int) -> float:
        p = min(max(self.progress, 0.0), 1.0)
        lo, floor = 1.0 / self.div_factor, 1.0 / (self.div_factor * self.final_div_factor)
        if p < self.pct_start:
            return lo + (1.0 - lo) * 0.5 * (1.0 - math.cos(math.pi * p / self.pct_start))
        q = (p - self.pct_start) / max(1e-9, 1.0 - self.pct_start)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * q))


@dataclass
class MapParts:
    """The fracture-map model and what updates it (``plan``: the progress-driven schedule of a run with
    ``max_minutes``, else None and ``scheduler`` is a step-driven ``OneCycleLR``)."""

    model: FractureMapNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: OneCyclePlan | None = None

    def budget_spent(self) -> bool:
        """True when a ``max_minutes`` run's schedule has reached its end."""
        return self.plan is not None and self.plan.progress >= 1.0


@dataclass
class MapRunState:
    """Where a run stands; saved in ``last.pt`` (keys unchanged) and restored by :func:`resume_map`."""

    epoch: int = 0
    """Epochs completed (the 0-based index of the epoch to run)."""
    batch_done: int = 0
    """Batches of that epoch already done (a mid-epoch checkpoint)."""
    best_auc: float = -1.0
    best_epoch: int = 0
    elapsed: float = 0.0
    """Seconds spent by earlier sessions."""
    history: list[dict[str, Any]] = field(default_factory=list)
    hard: list[tuple[int, float, float]] = field(default_factory=list)
    session_start: float = field(default_factory=time.time)

    def seconds(self) -> float:
        """Seconds of training over all sessions so far."""
        return self.elapsed + (time.time() - self.session_start)


def build_map_parts(cfg: MapTrainConfig, device: torch.device) -> MapParts:
    """A :class:`FractureMapNet` (``pool_r`` set), AdamW and a one-cycle schedule over the whole run."""
    model = build_model(cfg.arch, 2, head="fracture_map")
    assert isinstance(model, FractureMapNet)
    with torch.no_grad():
        model.pool_r.fill_(cfg.pool_r)
    model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.max_minutes:
        plan = OneCyclePlan(cfg.pct_start)
        return MapParts(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, plan), plan)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch(cfg), pct_start=cfg.pct_start, div_factor=25, final_div_factor=1e3
    )
    return MapParts(model, opt, sched)


def steps_per_epoch(cfg: MapTrainConfig) -> int:
    """Optimizer steps in one epoch (``crops_per_epoch`` / ``batch_size``, rounded up)."""
    return math.ceil(cfg.crops_per_epoch / cfg.batch_size)


class EpochBatches(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Batch ``b`` of an epoch's crop plan, built by :func:`make_batch` with the generator seeded by
    (seed, epoch, b): what a DataLoader worker computes does not depend on which worker it is."""

    def __init__(self, cfg: MapTrainConfig, data: TrainData, batches: list[list[tuple[int, int, int, int]]], epoch: int, stride: int, first: int) -> None:
        self.cfg, self.data, self.batches, self.epoch, self.stride, self.first = cfg, data, batches, epoch, stride, first
        self.aug = AugmentConfig(**cfg.augment)

    def __len__(self) -> int:
        return len(self.batches) - self.first

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        b = self.first + k
        return make_batch(self.cfg, self.data, self.batches[b], self.stride, np.random.default_rng([self.cfg.seed, self.epoch, b]), self.aug)


def _worker_init(_worker_id: int) -> None:
    cv2.setNumThreads(1)


def map_checkpoint(parts: MapParts, st: MapRunState, cfg: MapTrainConfig, epoch: int, batch_done: int) -> dict[str, Any]:
    """The ``last.pt`` dictionary (model, optimizer, scheduler, epoch, batch_done, best_auc, best_epoch,
    elapsed, history, hard, torch_rng, config)."""
    return {
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "epoch": epoch, "batch_done": batch_done, "best_auc": st.best_auc, "best_epoch": st.best_epoch,
        "elapsed": st.seconds(), "history": st.history, "hard": st.hard,
        "torch_rng": torch.get_rng_state(), "config": asdict(cfg),
    }


def resume_map(path: Path, parts: MapParts, device: torch.device) -> MapRunState:
    """Load ``last.pt`` into ``parts`` and torch's generator; returns the run state to continue from."""
    ck = load_checkpoint(path, device)
    parts.model.load_state_dict(ck["model"])
    parts.optimizer.load_state_dict(ck["optimizer"])
    parts.scheduler.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["torch_rng"])
    return MapRunState(
        epoch=ck["epoch"], batch_done=ck["batch_done"], best_auc=ck["best_auc"], best_epoch=ck["best_epoch"],
        elapsed=ck["elapsed"], history=ck["history"], hard=[(int(h[0]), float(h[1]), float(h[2])) for h in ck["hard"]],
    )


def map_train_one_epoch(parts: MapParts, cfg: MapTrainConfig, tr: TrainData, st: MapRunState, device: torch.device, out: Path, log: Any) -> dict[str, float]:
    """Epoch ``st.epoch`` from batch ``st.batch_done``: its crop plan (deterministic for the seed and
    epoch), one optimizer step per batch, a ``last.pt`` every ``checkpoint_minutes``. Returns the mean
    losses, ``seen`` crops and ``train_s``."""
    t_epoch = time.time()
    model, opt, sched = parts.model, parts.optimizer, parts.scheduler
    epoch = st.epoch
    plan = plan_epoch(cfg, tr, st.hard, np.random.default_rng([cfg.seed, epoch, 1_000_003]))
    batches = [plan[s : s + cfg.batch_size] for s in range(0, len(plan), cfg.batch_size)]
    source = EpochBatches(cfg, tr, batches, epoch, model.stride, st.batch_done)
    loader = torch.utils.data.DataLoader(
        source, batch_size=None, shuffle=False, num_workers=cfg.workers, worker_init_fn=_worker_init if cfg.workers else None,
        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None,
    )
    total_steps, budget_s = cfg.epochs * len(batches), (cfg.max_minutes * 60 if cfg.max_minutes else None)
    model.train()
    sums = {"loss": 0.0, "image_loss": 0.0, "map_loss": 0.0}
    seen, last_ck, t_log = 0, time.time(), time.time()
    for b, batch in enumerate(loader, start=st.batch_done):
        x = batch["x"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, cells = model.forward_map(x)
        loss, losses = map_loss(logits, cells, batch, cfg.map_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if parts.plan is not None:
            parts.plan.progress = schedule_progress(epoch * len(batches) + b + 1, total_steps, st.seconds(), budget_s)
        sched.step()
        n = len(batches[b])
        seen += n
        sums["loss"] += float(loss.detach()) * n
        for k, value in losses.items():
            sums[k] += value * n
        if time.time() - t_log > 120:
            t_log = time.time()
            log(f"  epoch {epoch + 1} batch {b + 1}/{len(batches)} loss {sums['loss'] / seen:.4f} "
                f"(image {sums['image_loss'] / seen:.4f}, map {sums['map_loss'] / seen:.4f}) "
                f"{seen / (time.time() - t_epoch):.2f} crops/s lr {sched.get_last_lr()[0]:.2e}")
        if parts.budget_spent():
            log(f"  epoch {epoch + 1}: time budget of {cfg.max_minutes} min spent after batch {b + 1}/{len(batches)}")
            break
        if cfg.checkpoint_minutes and time.time() - last_ck > cfg.checkpoint_minutes * 60 and b + 1 < len(batches):
            save_checkpoint(map_checkpoint(parts, st, cfg, epoch, b + 1), out / "last.pt")
            last_ck = time.time()
    return {**{k: v / max(1, seen) for k, v in sums.items()}, "seen": seen, "train_s": time.time() - t_epoch}


def export_best_map(parts: MapParts, cfg: MapTrainConfig, st: MapRunState, tr: TrainData, va: TrainData, z_val: np.ndarray, figures: dict[str, Any], out: Path, log: Any) -> None:
    """``best.pt`` and the calibrated model folder ``out/model-best`` of the epoch just finished."""
    model, spec, epoch = parts.model, cfg.spec(), st.epoch
    save_checkpoint({"model": model.state_dict(), "config": asdict(cfg), "epoch": epoch, "validation": st.history[-1]}, out / "best.pt")
    logits = np.stack([np.zeros_like(z_val), z_val], axis=1)
    info = map_training_info(cfg, tr, va, epoch, st.history, st.seconds())
    card = export_model(
        out / "model-best", model, cfg.arch, spec, logits, va.labels, name=cfg.export_name,
        version=cfg.export_version, training=info, target_sensitivity=cfg.target_sensitivity,
        half=cfg.export_half, description=map_description(cfg), n_boot=cfg.n_boot, head="fracture_map",
        extra_metrics={k: figures[k] for k in ("pointing_game", "pointing_game_ci95", "n_boxed")},
    )
    log(f"exported epoch {epoch} to {out / 'model-best'}: AUROC {card.metrics['validation']['auc']:.4f}, "
        f"pointing game {figures['pointing_game']}, T={card.temperature:.3f}, threshold={card.threshold:.4f}")


def train_map(cfg: MapTrainConfig, resume: bool = False, log: Any = print, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a fracture-map training run. Returns a summary (best AUROC and pointing game)."""
    t_start = time.time()
    out, device = start_run(cfg.out, cfg.threads, cfg.device, cfg.seed)
    cv2.setNumThreads(1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    split = load_split(cfg.data, cfg.split, cfg.val_fraction, cfg.seed, cfg.limit)
    if not (out / "split.csv").is_file():
        write_split(out / "split.csv", split)
    boxes_path = Path(cfg.data) / "boxes.csv"
    if not boxes_path.is_file():
        raise FileNotFoundError(f"{boxes_path}: fracture-map training needs the fracture boxes")
    boxes = read_boxes(boxes_path)
    spec = cfg.spec()
    tr = load_data(cfg, split["train"], boxes, progress)
    va = load_data(cfg, monitor_subset(split["val"], cfg.val_limit, cfg.seed), boxes, progress)
    n_boxed_tr = sum(1 for b in tr.boxes if b)
    log(
        f"train {len(tr.items)} images ({int(tr.labels.sum())} fractured, {n_boxed_tr} with boxes), "
        f"val {len(va.items)} ({int(va.labels.sum())} fractured, {sum(1 for b in va.raw_boxes if b)} with boxes); "
        f"{cfg.crop}px crops of {cfg.scale}px images; device {device}, {torch.get_num_threads()} threads"
    )

    parts = build_map_parts(cfg, device)
    st = MapRunState()
    if resume and (out / "last.pt").is_file():
        st = resume_map(out / "last.pt", parts, device)
        log(f"resumed from {out / 'last.pt'}: epoch {st.epoch + 1}, batch {st.batch_done} (best AUROC {st.best_auc:.4f} at epoch {st.best_epoch})")
    write_config(out, cfg)
    st.session_start = time.time()

    while st.epoch < cfg.epochs and not parts.budget_spent():
        t_epoch = time.time()
        tr_figures = map_train_one_epoch(parts, cfg, tr, st, device, out, log)
        t_val = time.time()
        v = validate(parts.model, va, spec, cfg.val_batch, device)
        z_val = v.pop("z")
        val_s = time.time() - t_val
        st.hard = mine_hard_negatives(parts.model, tr, spec, cfg, np.random.default_rng([cfg.seed, st.epoch, 2_000_003]), device)
        improved = v["auc"] > st.best_auc
        if improved:
            st.best_auc, st.best_epoch = v["auc"], st.epoch + 1
        seen, train_s = tr_figures["seen"], tr_figures["train_s"]
        rec = {
            "epoch": st.epoch + 1,
            "train_loss": tr_figures["loss"],
            "image_loss": tr_figures["image_loss"],
            "map_loss": tr_figures["map_loss"],
            "val_auc": v["auc"],
            "val_pointing_game": v["pointing_game"],
            "val_pointing_game_ci95": v["pointing_game_ci95"],
            "val_sens@0.5": v["sens@0.5"],
            "val_spec@0.5": v["spec@0.5"],
            "lr": parts.scheduler.get_last_lr()[0],
            "crops_per_s": seen / max(train_s, 1e-9),
            "train_s": round(train_s, 1),
            "val_s": round(val_s, 1),
            "seconds": round(time.time() - t_epoch, 1),
        }
        st.history.append(rec)
        log(json.dumps(rec))
        st.epoch += 1
        st.batch_done = 0
        save_checkpoint({"model": parts.model.state_dict(), "config": asdict(cfg), "epoch": st.epoch, "validation": rec}, out / f"epoch-{st.epoch:03d}.pt")
        if improved:
            export_best_map(parts, cfg, st, tr, va, z_val, v, out, log)
        save_checkpoint(map_checkpoint(parts, st, cfg, st.epoch, 0), out / "last.pt")
        (out / "history.json").write_text(json.dumps(st.history, indent=2))
    return {"best_auc": st.best_auc, "best_epoch": st.best_epoch, "epochs_run": len(st.history), "seconds": time.time() - t_start, "out": str(out)}


def map_training_info(cfg: MapTrainConfig, tr: TrainData, va: TrainData, epoch: int, history: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The card's ``training`` object for a fracture-map model."""
    return {
        "data": Path(cfg.data).name,
        "dataset": dataset_description(cfg.data),
        "split": f"group-aware (manifest group), label-stratified; val_fraction {cfg.val_fraction}, seed {cfg.seed}" if not cfg.split else f"split file {Path(cfg.split).name}",
        "n_train": len(tr.items),
        "n_train_fractured": int(tr.labels.sum()),
        "n_train_with_boxes": sum(1 for b in tr.boxes if b),
        "n_val": len(va.items),
        "val_subset": cfg.val_limit is not None,
        "n_val_fractured": int(va.labels.sum()),
        "weights": "none (trained from scratch)",
        "recipe": (
            f"localisation-supervised fracture map: {cfg.crop}px crops of images letterboxed at {cfg.scale}px "
            f"({cfg.pos_fraction:.0%} around fracture boxes, the rest normal, {cfg.hard_fraction:.0%} of those hard negatives); "
            f"cell BCE (box cells positive, normal cells negative, outside-box cells of fractured images weight {cfg.outside_weight}) "
            f"+ image BCE on the log-sum-exp (r={cfg.pool_r}) pooled map"
        ),
        "epoch": epoch,
        "epochs_planned": cfg.epochs,
        "max_minutes": cfg.max_minutes,
        "crops_per_epoch": cfg.crops_per_epoch,
        "input_size": cfg.scale,
        "batch_size": cfg.batch_size,
        "optimizer": f"adamw lr {cfg.lr} weight_decay {cfg.weight_decay}, one-cycle (pct_start {cfg.pct_start})",
        "augmentation": asdict(AugmentConfig(**cfg.augment)),
        "seconds": round(seconds, 1),
        "machine": machine_description(),
        "command": cfg.command,
        "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items() if k in ("epoch", "train_loss", "val_auc", "val_pointing_game")} for h in history],
    }


def map_description(cfg: MapTrainConfig) -> str:
    return (
        f"{cfg.arch} fracture-map model: per-region fracture probability on a {cfg.scale // (16 if cfg.arch == 'vgg16' else 32)}-cell grid "
        f"of the whole radiograph letterboxed at {cfg.scale}px with CLAHE; the image probability is the log-sum-exp pooling "
        "of the map. Trained from scratch with box supervision. Research use only; not a medical device; not for diagnostic use."
    )
