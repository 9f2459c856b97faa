"""On the GPU machine: .gpu/fa512/*.webp (from pack_fracatlas.py) -> DST/*.png (lossless), the CSVs with .png
names, and .gpu/split.csv (the split of models/reference with .png names) as DST/split.csv."""
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2

src, dst = Path(".gpu/fa512"), Path(sys.argv[1])
files = sorted(src.rglob("*.webp"))
def one(f):
    out = dst / f.relative_to(src).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
    assert img is not None, f
    assert cv2.imwrite(str(out), img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
with ThreadPoolExecutor(16) as p:
    list(p.map(one, files))
for name in ("manifest.csv", "boxes.csv"):
    (dst / name).write_text((src / name).read_text().replace(".jpg,", ".png,"))
(dst / "split.csv").write_text(Path(".gpu/split.csv").read_text())
print(f"unpacked {len(files)} images to {dst}")
