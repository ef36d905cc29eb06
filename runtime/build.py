"""Gallery builder: features of normal images through the runtime (no torch), thresholds from a
held-out share of them, written atomically."""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from .detector import Detector
from .errors import ImageError
from .features import FeatureBackend
from .gallery import Gallery
from .images import Preprocess, load_image
from .spade import SpadeConfig

PIXEL_QUANTILE = 0.999


def progress(iterable, total: int, desc: str, show: bool = True, unit: str = "img"):
    """A progress bar on a terminal (none in logs, none when ``show`` is false)."""
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=None)


def extract(backend: FeatureBackend, images: Sequence, preprocess: Preprocess, batch_size: int = 8,
            show: bool = True, desc: str = "features"):
    """Features of ``images`` (paths or arrays): returns (list of per-image feature dicts with
    levels as (h, w, C) and the global vector, list of model inputs, list of geometries)."""
    info = backend.info
    feats, inputs, geoms = [], [], []
    batches = range(0, len(images), batch_size)
    for s in progress(batches, len(batches), desc, show, unit="batch"):
        chunk = images[s : s + batch_size]
        prepared = [preprocess(load_image(im)) for im in chunk]
        x = np.stack([p[0] for p in prepared])
        out = backend(x)
        for i, (xi, geom) in enumerate(prepared):
            f = {lv.name: np.ascontiguousarray(out[lv.name][i].transpose(1, 2, 0)) for lv in info.levels}
            f[info.global_name] = out[info.global_name][i].reshape(-1)
            feats.append(f)
            inputs.append(xi)
            geoms.append(geom)
    return feats, inputs, geoms


def gallery_from_images(
    backend: FeatureBackend,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    holdout: float = 0.2,
    seed: int = 0,
    preprocess: Preprocess | None = None,
    config: SpadeConfig | None = None,
    batch_size: int = 8,
    thumbnails: bool = True,
    show_progress: bool = True,
) -> Gallery:
    """Build a gallery from normal images and write it to ``out``.

    A seeded ``holdout`` share of the images is kept out of the gallery and scored against it;
    the image threshold is the highest held-out score (no false alarm on held-out normal parts)
    and the pixel threshold the 99.9th percentile of held-out pixel scores.
    """
    paths = [Path(p) for p in images]
    if len(paths) < 2:
        raise ImageError(f"a gallery needs at least 2 normal images, got {len(paths)}")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    info = backend.info
    preprocess = preprocess or Preprocess(info.input_size)
    config = config or SpadeConfig()
    config.level_names(info)
    order = np.random.default_rng(seed).permutation(len(paths))
    n_hold = int(round(holdout * len(paths)))
    n_hold = min(max(n_hold, 1 if holdout > 0 else 0), len(paths) - 1)
    hold_idx, train_idx = sorted(order[:n_hold]), sorted(order[n_hold:])

    # decode everything first: a bad file stops the build before anything is written
    feats, inputs, _ = extract(backend, [str(paths[i]) for i in train_idx], preprocess, batch_size, show_progress, "gallery")
    names = [paths[i].name for i in train_idx]
    if len(set(names)) != len(names):
        names = [str(paths[i]) for i in train_idx]
    levels = {lv.name: np.stack([f[lv.name] for f in feats]) for lv in info.levels}
    glob = np.stack([f[info.global_name] for f in feats]).astype(np.float32)
    thumbs = None
    if thumbnails:
        t = max(32, info.input_size // 2)
        from PIL import Image

        thumbs = np.stack([np.asarray(Image.fromarray(x).resize((t, t), Image.BILINEAR)) for x in inputs])
    manifest = {
        "model": {"backbone": info.backbone, "fingerprint": info.fingerprint, "input_size": info.input_size,
                  "levels": [lv.__dict__ for lv in info.levels], "global": info.global_name},
        "preprocess": preprocess.to_dict(),
        "config": config.to_dict(),
        "precision": "fp32",
        "build": {"tool": f"spade-edge {__version__}", "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "images": len(paths), "holdout": holdout, "seed": seed, "source": str(paths[0].parent.resolve())},
        "thresholds": {},
    }
    gallery = Gallery(names, glob, levels, manifest, thumbs)

    if n_hold:
        det = Detector(backend, gallery, config=config, preprocess=preprocess)
        hfeats, hinputs, hgeoms = extract(backend, [str(paths[i]) for i in hold_idx], preprocess, batch_size, show_progress, "thresholds")
        scores, pixels = [], []
        for f, x, geom in zip(hfeats, hinputs, hgeoms):
            chw = {k: (v.transpose(2, 0, 1) if v.ndim == 3 else v) for k, v in f.items()}
            p = det.predict_features(chw, x, geom)
            scores.append(p.score)
            pixels.append(p.anomaly_map.ravel())
        manifest["thresholds"] = {
            "image": float(max(scores)),
            "pixel": float(np.quantile(np.concatenate(pixels), PIXEL_QUANTILE)),
            "rule": f"image: max held-out normal score; pixel: {PIXEL_QUANTILE:.1%} quantile of held-out normal pixels",
            "heldout": [paths[i].name for i in hold_idx],
            "heldout_scores": [float(s) for s in scores],
            "config": config.to_dict(),
        }
    gallery.save(out)
    return Gallery.load(out)
