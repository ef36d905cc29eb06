"""Heat-map pictures for people: input | heat map overlay | the normal part that matched.

Pillow and numpy only, so the device can draw them too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .runtime.detector import Prediction
from .runtime.gallery import Gallery

if TYPE_CHECKING:
    import PIL.Image

# "inferno"-like anchors: black -> purple -> orange -> yellow
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


def colormap(v: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8."""
    v = np.clip(np.nan_to_num(v), 0, 1) * (len(_ANCHORS) - 1)
    i = np.minimum(v.astype(int), len(_ANCHORS) - 2)
    f = (v - i)[..., None]
    return (_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def overlay(image: np.ndarray, amap: np.ndarray, vmax: float, threshold: float | None = None) -> np.ndarray:
    """Blend the colour-mapped ``amap`` (scaled to [0, vmax]) onto ``image``; outline pixels over ``threshold``."""
    v = np.clip(amap / max(vmax, 1e-12), 0, 1)
    alpha = (0.25 + 0.6 * v)[..., None]
    out = image.astype(np.float32) * (1 - alpha) + colormap(v).astype(np.float32) * alpha
    out = out.astype(np.uint8)
    if threshold is not None:
        out[_outline(amap > threshold)] = (0, 255, 255)
    return out


def heatmap_panel(pred: Prediction, gallery: Gallery) -> PIL.Image.Image:
    """Side by side: the input the model saw, the heat map, and the gallery image that matched the
    worst pixel (markers at the worst pixel and at its match), with a caption."""
    from PIL import Image, ImageDraw

    s = pred.input_image.shape[0]
    thr = gallery.thresholds.get("pixel")
    vmax = 2.0 * thr if thr else float(pred.anomaly_map.max())
    r, c = pred.worst_pixel()
    idx, mr, mc = pred.correspondence.at(r, c)
    if gallery.thumbnails is not None:
        match = Image.fromarray(np.asarray(gallery.thumbnails[idx])).resize((s, s), Image.Resampling.BILINEAR)
    else:
        match = Image.new("RGB", (s, s), (64, 64, 64))
    panels = [
        Image.fromarray(pred.input_image),
        Image.fromarray(overlay(pred.input_image, pred.anomaly_map, vmax, thr)),
        match,
    ]
    top = 34
    canvas = Image.new("RGB", (3 * s + 20, s + top), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, p in enumerate(panels):
        canvas.paste(p, (i * (s + 10), top))
    for x0, (y, x) in ((0, (r, c)), (s + 10, (r, c)), (2 * (s + 10), (mr, mc))):
        draw.ellipse([x0 + x - 7, top + y - 7, x0 + x + 7, top + y + 7], outline=(0, 255, 0), width=2)
    verdict = pred.verdict or "no threshold"
    draw.text((4, 2), f"{Path(pred.name or '').name}  score {pred.score:.3f}  {verdict}", fill=(0, 0, 0))
    draw.text((4, 17), f"max pixel {pred.max_pixel_score:.3f}  (colour scale 0-{vmax:.3g})", fill=(0, 0, 0))
    draw.text((2 * (s + 10) + 4, 17), f"matched: {gallery.names[idx]}"[:40], fill=(0, 0, 0))
    return canvas


def save_heatmap(pred: Prediction, gallery: Gallery, folder: str | os.PathLike, name: str | None = None) -> Path:
    """Write the panel of :func:`heatmap_panel` as ``folder/<image stem>.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(name or pred.name or "image").stem
    path = folder / f"{stem}.png"
    heatmap_panel(pred, gallery).save(path)
    return path
