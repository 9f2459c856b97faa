"""What the classifier loop (``train``) and the fracture-map loop (``train-map``) share.

- :func:`start_run`: the run folder, the thread and device rules of serving
  (``pacs_ai.infer.device``), the seeds;
- :func:`load_split`: the split file or a group-aware split made on the fly, reduced to ``limit``
  images per side for smoke tests;
- checkpoints: :func:`save_checkpoint` writes atomically (``pacs_ai.store.atomic``: temporary file,
  fsync, rename), so a run killed while saving keeps its previous ``last.pt``; :func:`load_checkpoint`;
  :func:`rng_state` / :func:`restore_rng_state` (numpy, torch and Python generators);
- :class:`RunConfig`, the settings both runs have (each run's config extends it), :func:`write_config`
  and :func:`dataset_description` for the run folder and the model card.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pacs_ai.infer.device import configure_threads, select_device
from pacs_ai.store.atomic import write_atomic_with
from training.data import Item, list_dataset, read_split, split_items

__all__ = [
    "RunConfig",
    "dataset_description",
    "limit_items",
    "load_checkpoint",
    "load_split",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
    "schedule_progress",
    "start_run",
    "write_config",
]

FRACATLAS = "FracAtlas (Abedeen et al., Scientific Data 10, 521, 2023; CC BY 4.0)"


@dataclass
class RunConfig:
    """The settings of every training run (``train`` and ``train-map``); stored in each checkpoint
    (``asdict``) and read back by keyword, so adding a field with a default keeps old checkpoints loadable."""

    data: str
    out: str
    arch: str = "densenet121"
    split: str | None = None
    val_fraction: float = 0.2
    seed: int = 0
    clahe: bool = True
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    threads: int | None = None
    device: str = "auto"
    cache_dir: str | None = None
    export_name: str = "fracture-classifier"
    export_version: str = "0.1.0"
    export_half: bool = False
    target_sensitivity: float = 0.90
    n_boot: int = 1000
    limit: int | None = None
    augment: dict[str, Any] = field(default_factory=dict)


def start_run(out: str | Path, threads: int | None, device: str, seed: int) -> tuple[Path, torch.device]:
    """Create the run folder, apply ``threads`` (only when given: the CLI has applied the rule already),
    choose the device (``select_device``) and seed Python's and torch's generators. Returns both."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if threads:
        configure_threads(threads)
    dev = select_device(device, key="--device")
    random.seed(seed)
    torch.manual_seed(seed)
    return folder, dev


def limit_items(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """At most ``limit`` items, keeping both classes (for smoke tests)."""
    if limit is None or len(items) <= limit:
        return items
    rng = random.Random(seed)
    pos = [i for i in items if i.label == 1]
    neg = [i for i in items if i.label == 0]
    k = max(1, min(len(pos), limit // 2))
    return rng.sample(pos, k) + rng.sample(neg, min(len(neg), limit - k))


def load_split(data: str | Path, split: str | Path | None, val_fraction: float, seed: int, limit: int | None = None) -> dict[str, list[Item]]:
    """``{"train": [...], "val": [...]}`` from a split CSV or a group-aware split of ``data``; each side
    reduced by :func:`limit_items` (seeds ``seed`` and ``seed + 1``). Raises ValueError for an empty side."""
    rows = read_split(Path(split)) if split else split_items(list_dataset(Path(data)), val_fraction, seed)
    for k in ("train", "val"):
        if not rows.get(k):
            raise ValueError(f"split has no {k!r} items")
    return {"train": limit_items(rows["train"], limit, seed), "val": limit_items(rows["val"], limit, seed + 1)}


def schedule_progress(step: int, total_steps: int, seconds: float, budget_s: float | None) -> float:
    """Where a progress-driven learning-rate schedule stands (``train``'s cosine plan, ``train-map``'s
    one-cycle plan): ``max(step / total_steps, seconds / budget_s)``, so that with a wall-clock budget the
    schedule ends when the steps or the time run out, whichever comes first; 1.0 or more means ended."""
    return max(step / max(1, total_steps), seconds / budget_s if budget_s else 0.0)


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically and durably (the old file stays until the new one is whole)."""
    write_atomic_with(Path(path), lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (tensors mapped to ``device``)."""
    return torch.load(Path(path), map_location=device, weights_only=False)


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The numpy, torch and Python generator states (to store in a checkpoint)."""
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def write_config(out: Path, cfg: Any) -> None:
    """``out/config.json``: the run's configuration dataclass."""
    (Path(out) / "config.json").write_text(json.dumps(asdict(cfg), indent=2))


def dataset_description(data: str | Path) -> str:
    """The data set named in the card: FracAtlas with its citation, else the folder."""
    return FRACATLAS if "fracatlas" in str(data).lower() else str(data)
