"""Realistic synthetic defects for electroluminescence images of solar cells, with exact masks.

Real EL defects: cracks (thin dark lines, branching, along random paths), inactive areas (cell
parts cut off electrically: dark regions), interrupted fingers (short dark stripes across the
busbars' direction), and bright scratches. Each function returns (image, mask) and places the
defect inside the central 70% of the image so a centre crop keeps it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("crack", "inactive", "fingers", "scratch")


def _canvas(shape) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    m = Image.new("L", (shape[1], shape[0]), 0)
    return m, ImageDraw.Draw(m)


def _inner_point(rng, h, w, margin=0.2):
    return np.array([rng.uniform(margin * h, (1 - margin) * h), rng.uniform(margin * w, (1 - margin) * w)])


def _clip_path(pts, h, w, margin=0.15):
    pts[:, 0] = np.clip(pts[:, 0], margin * h, (1 - margin) * h)
    pts[:, 1] = np.clip(pts[:, 1], margin * w, (1 - margin) * w)
    return pts


def _walk(rng, start, steps, step_len, turn):
    angle = rng.uniform(0, 2 * np.pi)
    pts = [start]
    for _ in range(steps):
        angle += rng.normal(0, turn)
        pts.append(pts[-1] + step_len * np.array([np.sin(angle), np.cos(angle)]))
    return np.array(pts)


def _apply(image, mask, factor=None, add=None):
    out = image.astype(np.float32)
    m = mask.astype(np.float32)
    if out.ndim == 3:
        m = m[..., None]
    if factor is not None:
        out = out * (1 - m + m * factor)
    if add is not None:
        out = out + m * add
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def crack(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin dark crack along a random walk, sometimes with a branch."""
    h, w = image.shape[:2]
    m, draw = _canvas((h, w))
    s = min(h, w)
    paths = [_walk(rng, _inner_point(rng, h, w), int(rng.integers(15, 35)), s / 70, 0.35)]
    if rng.random() < 0.5:
        start = paths[0][len(paths[0]) // 2]
        paths.append(_walk(rng, start, int(rng.integers(6, 15)), s / 70, 0.4))
    width = int(rng.integers(1, 3))
    for p in paths:
        p = _clip_path(p, h, w)
        draw.line([(x, y) for y, x in p], fill=255, width=width, joint="curve")
    mask = np.asarray(m) > 0
    return _apply(image, mask, factor=rng.uniform(0.25, 0.5)), mask


def inactive(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark region with an irregular border (a part cut off by cracks)."""
    h, w = image.shape[:2]
    m, draw = _canvas((h, w))
    c = _inner_point(rng, h, w, 0.3)
    n = int(rng.integers(5, 9))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.06, 0.14, n) * min(h, w)
    poly = _clip_path(np.stack([c[0] + rad * np.sin(ang), c[1] + rad * np.cos(ang)], 1), h, w)
    draw.polygon([(x, y) for y, x in poly], fill=255)
    mask = np.asarray(m) > 0
    return _apply(image, mask, factor=rng.uniform(0.2, 0.5)), mask


def fingers(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A run of parallel short dark stripes: interrupted fingers, across the busbars (which run
    horizontally in ELPV's images)."""
    h, w = image.shape[:2]
    m, draw = _canvas((h, w))
    y0, x0 = _inner_point(rng, h, w, 0.25)
    n = int(rng.integers(3, 8))
    gap = rng.uniform(0.012, 0.02) * w
    length = rng.uniform(0.05, 0.12) * h
    for i in range(n):
        draw.line([(x0 + i * gap, y0), (x0 + i * gap, y0 + length)], fill=255, width=2)
    mask = np.asarray(m) > 0
    return _apply(image, mask, factor=rng.uniform(0.3, 0.55)), mask


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright curved scratch (a quadratic Bezier curve)."""
    h, w = image.shape[:2]
    m, draw = _canvas((h, w))
    a, b = _inner_point(rng, h, w), _inner_point(rng, h, w)
    ctrl = (a + b) / 2 + rng.normal(0, 0.1 * min(h, w), 2)
    t = np.linspace(0, 1, 40)[:, None]
    p = _clip_path((1 - t) ** 2 * a + 2 * (1 - t) * t * ctrl + t**2 * b, h, w)
    draw.line([(x, y) for y, x in p], fill=255, width=int(rng.integers(1, 3)))
    mask = np.asarray(m) > 0
    return _apply(image, mask, add=rng.uniform(60, 110)), mask


DEFECTS = {"crack": crack, "inactive": inactive, "fingers": fingers, "scratch": scratch}


def add_defect(
    image: np.ndarray, rng: np.random.Generator, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Add one defect (``kind`` or a random one) to a copy of ``image``: (image, mask, kind)."""
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    img, mask = DEFECTS[kind](image, rng)
    return img, mask, kind
