"""Datasets: listing labelled images, the group-aware split, and the letterboxed image cache.

A dataset folder holds ``fractured/`` and ``not_fractured/`` (the folder is the label), optionally a
``manifest.csv`` (columns ``file``, ``group``, ...) whose ``group`` keeps near-duplicates together.
Images may be JPEG/PNG or DICOM. Preprocessing is ``pacs_ai.infer.preprocess`` (imported, never copied):
the cache stores ``letterbox`` output (uint8, before normalisation) so augmentation and normalisation
run on exactly what serving feeds the network.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pacs_ai.infer.preprocess import InputSpec, letterbox, read_gray

CLASS_NAMES: tuple[str, str] = ("not_fractured", "fractured")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}


@dataclass(frozen=True)
class Item:
    """One labelled image: ``file`` is relative to the dataset root; ``label`` 1 = fractured."""

    file: str
    label: int
    group: str


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the ``DICM`` magic after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _candidate_files(folder: Path) -> Iterable[Path]:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and (p.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES or is_dicom(p)):
            yield p


def list_dataset(root: Path) -> list[Item]:
    """List a dataset folder (``fractured/``, ``not_fractured/``, optional ``manifest.csv``).

    Without a manifest every image is its own group. Raises ``FileNotFoundError`` when the class folders
    are missing.
    """
    root = Path(root)
    groups: dict[str, str] = {}
    manifest = root / "manifest.csv"
    if manifest.is_file():
        with manifest.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("file") and row.get("group"):
                    groups[row["file"]] = row["group"]
    items: list[Item] = []
    for label, name in enumerate(CLASS_NAMES):
        sub = root / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{root}: no {name}/ folder (expected fractured/ and not_fractured/)")
        for p in _candidate_files(sub):
            rel = p.relative_to(root).as_posix()
            items.append(Item(rel, label, groups.get(rel, rel)))
    if not items:
        raise FileNotFoundError(f"{root}: no images in fractured/ or not_fractured/")
    return items


def split_items(items: list[Item], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[Item]]:
    """Group-aware, label-stratified split into ``train`` and ``val`` (no group on both sides).

    Uses scikit-learn's ``StratifiedGroupKFold`` with ``round(1 / val_fraction)`` folds and takes one fold
    as validation. Deterministic for a given seed.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_splits = max(2, round(1.0 / val_fraction))
    labels = np.array([it.label for it in items])
    groups = np.array([it.group for it in items])
    n_splits = min(n_splits, len(set(groups)))
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_idx = next(iter(sgkf.split(np.zeros(len(items)), labels, groups)))
    val_set = set(val_idx.tolist())
    return {
        "train": [it for i, it in enumerate(items) if i not in val_set],
        "val": [it for i, it in enumerate(items) if i in val_set],
    }


def write_split(path: Path, split: dict[str, list[Item]]) -> None:
    """Write a split CSV: ``file,label,group,split`` (label as class name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "group", "split"])
        for name, items in split.items():
            for it in items:
                w.writerow([it.file, CLASS_NAMES[it.label], it.group, name])


def read_split(path: Path) -> dict[str, list[Item]]:
    """Read a split CSV written by ``write_split``."""
    out: dict[str, list[Item]] = {}
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            label = row["label"]
            lab = CLASS_NAMES.index(label) if label in CLASS_NAMES else int(label)
            out.setdefault(row["split"], []).append(Item(row["file"], lab, row.get("group") or row["file"]))
    return out


# ----------------------------------------------------------------------------------------------------
# Letterboxed image cache
# ----------------------------------------------------------------------------------------------------


def _cache_key(root: Path, items: list[Item], spec: InputSpec) -> str:
    h = hashlib.sha256()
    h.update(str(Path(root).resolve()).encode())
    h.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for it in items:
        h.update(it.file.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def load_images(
    root: Path,
    items: list[Item],
    spec: InputSpec,
    cache_dir: Path | None = None,
    progress: bool = True,
    workers: int = 1,
) -> np.ndarray:
    """Letterboxed uint8 images (N, size, size) for ``items``, via ``preprocess.letterbox``.

    With ``cache_dir`` the array is stored as ``<key>.npy`` (key = dataset path, spec and file list) and
    memory-mapped on later calls. ``workers`` > 1 decodes and letterboxes in that many threads (OpenCV and
    the image decoders release the GIL); the result does not depend on it.
    """
    cache: Path | None = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = cache_dir / f"letterbox-{spec.size}-{_cache_key(root, items, spec)}.npy"
        if cache.is_file():
            arr = np.load(cache, mmap_mode="r")
            if arr.shape == (len(items), spec.size, spec.size):
                return arr
    out = np.zeros((len(items), spec.size, spec.size), dtype=np.uint8)

    def one(i: int) -> int:
        out[i] = letterbox(read_gray(Path(root) / items[i].file), spec)[0]
        return i

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done: Iterable[int] = pool.map(one, range(len(items)))
        if progress:
            from tqdm import tqdm

            done = tqdm(done, total=len(items), desc=f"preprocess {spec.size}px", unit="img")
        for _ in done:
            pass
    if cache is not None:
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache)
    return out
