"""Data sets the toolkit knows: ELPV solar cells (PyPI ``elpv-dataset``) and synthetic defects."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .runtime.errors import require


def elpv_root() -> Path:
    """Folder holding ELPV's labels.csv and images/."""
    elpv = require("elpv_dataset", "demo", "The ELPV solar-cell data set")
    return Path(elpv.__file__).parent / "data"


def elpv_cells(probability: float | None = None, cell_type: str | None = None) -> list[Path]:
    """ELPV image paths, filtered by defect probability (0, 1/3, 2/3, 1) and type ('mono', 'poly')."""
    root = elpv_root()
    out = []
    with open(root / "labels.csv") as f:
        for row in csv.reader(f, delimiter=" ", skipinitialspace=True):
            path, prob, kind = row[0], float(row[1]), row[2]
            if probability is not None and abs(prob - probability) > 0.01:
                continue
            if cell_type is not None and kind != cell_type:
                continue
            out.append(root / path)
    return out


def paste_defect(image: np.ndarray, rng: np.random.Generator, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``image`` (H, W[, 3] uint8) with a dark, textured blob pasted at a random place
    well inside the borders (so a centre crop keeps it), and its mask. A simple stand-in for a
    stain or a chip; realistic defects come with evaluation."""
    h, w = image.shape[:2]
    size = size or max(4, min(h, w) // 10)
    my, mx = int(0.15 * h) + size, int(0.15 * w) + size
    cy, cx = rng.integers(my, h - my + 1), rng.integers(mx, w - mx + 1)
    yy, xx = np.mgrid[:h, :w]
    r = size * (1 + 0.25 * np.sin(np.arctan2(yy - cy, xx - cx) * 3 + rng.uniform(0, 6)))
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    out = image.copy().astype(np.int16)
    noise = rng.integers(-30, 30, size=mask.sum())
    val = np.clip(25 + noise, 0, 255)
    out[mask] = val[:, None] if out.ndim == 3 else val
    return out.astype(np.uint8), mask


def mvtec_category(root: str | Path) -> tuple[list[Path], list[tuple[Path, str, Path | None]]]:
    """Read one category in the MVTec AD layout: ``train/good/*``, ``test/<type>/*`` and
    ``ground_truth/<type>/<stem>_mask.png``. Returns (train images, [(test image, type, mask or None)])."""
    from .runtime.images import list_images

    root = Path(root)
    train = list_images(root / "train" / "good")
    tests = []
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        for img in list_images(folder):
            mask = root / "ground_truth" / folder.name / f"{img.stem}_mask.png"
            tests.append((img, folder.name, mask if mask.is_file() else None))
    return train, tests


def write_elpv_category(
    root: str | Path, cell_type: str = "mono", n_train: int = 20, n_good: int = 5, n_per_type: int = 3, seed: int = 0
) -> Path:
    """Write an MVTec-AD-layout category of real ELPV normal cells, with synthetic defects of every
    kind (crack, inactive, fingers, scratch) and their masks: a small real-image test set."""
    from PIL import Image

    from .synthetic import KINDS, add_defect

    root = Path(root)
    cells = elpv_cells(0.0, cell_type)
    rng = np.random.default_rng(seed)
    rng.shuffle(cells)
    need = n_train + n_good + n_per_type * len(KINDS)
    if need > len(cells):
        raise ValueError(f"asked for {need} cells, ELPV has {len(cells)} normal {cell_type} cells")
    it = iter(cells)
    for sub in ["train/good", "test/good", *[f"test/{k}" for k in KINDS], *[f"ground_truth/{k}" for k in KINDS]]:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for _ in range(n_train):
        p = next(it)
        Image.open(p).save(root / "train/good" / p.name)
    for _ in range(n_good):
        p = next(it)
        Image.open(p).save(root / "test/good" / p.name)
    for kind in KINDS:
        for _ in range(n_per_type):
            p = next(it)
            img, mask, _ = add_defect(np.asarray(Image.open(p)), rng, kind)
            Image.fromarray(img).save(root / "test" / kind / p.name)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / kind / f"{p.stem}_mask.png")
    return root
