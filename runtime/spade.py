"""SPADE's two stages on features, independent of how the features were computed.

Image stage: Euclidean kNN over global features; score = mean distance to the ``k_image`` nearest.
Pixel stage (paper eq. 3): every test pixel feature against every pixel feature of the
``k_gallery`` retrieved normal images; d(y, p) = mean of the ``kappa`` smallest squared distances.
``mode="concat"``: the paper's concatenated pyramid on the finest grid; ``mode="per-level"``:
each level at its own resolution, maps upsampled and averaged (the best-known re-implementation,
there with kappa = 1 and unsquared distances).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .gallery import Gallery
from .modelinfo import ModelInfo
from .resample import gaussian_blur, upsample_map
from .scoring import PixelScorer

MODES = ("concat", "per-level")
SCORES = ("image", "max-pixel", "top-pixels", "combined")
TOP_SHARE = 0.01  # 'top-pixels': the mean of the highest 1% of the anomaly map


@dataclass(frozen=True)
class SpadeConfig:
    """Scoring settings. Defaults chosen on the ELPV benchmark (docs/results.md), which scores every
    setting through this runtime (``Detector.with_config``): K = 50 images for
    the pixel gallery, kappa = 1, levels scored apart and averaged, sigma = 4, and the image scored by
    the image stage (K = 5) plus the mean of the top 1% of the anomaly map, each over its median on
    held-out normal images. K's larger than the gallery are clipped to its size."""

    k_image: int = 5
    k_gallery: int = 50
    kappa: int = 1
    mode: str = "per-level"
    levels: tuple[str, ...] | None = None  # None: every level the model has
    sigma: float = 4.0
    score: str = "combined"  # image score: kNN stage, map maximum, mean of its top 1%, or kNN + top 1%

    def __post_init__(self):
        for name in ("k_image", "k_gallery", "kappa"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(self.levels))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["levels"] = list(self.levels) if self.levels else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SpadeConfig:
        d = dict(d)
        if d.get("levels") is not None:
            d["levels"] = tuple(d["levels"])
        return cls(**d)

    def level_names(self, info: ModelInfo) -> list[str]:
        names = [lv.name for lv in info.levels]
        if self.levels is None:
            return names
        unknown = set(self.levels) - set(names)
        if unknown:
            raise ValueError(f"unknown level(s) {sorted(unknown)}; the model has {names}")
        return [n for n in names if n in self.levels]


@dataclass
class Correspondence:
    """For every cell of a feature grid, the gallery image and location that matched it best.

    ``image`` indexes the gallery's image names; ``y``, ``x`` are grid cells of that image;
    ``stride`` converts grid cells to model-input pixels (cell centre = (y + 0.5) * stride).
    """

    image: np.ndarray
    y: np.ndarray
    x: np.ndarray
    stride: float

    def at(self, row: float, col: float) -> tuple[int, float, float]:
        """(gallery image index, row, col in model-input pixels) that matched input pixel (row, col)."""
        h, w = self.image.shape
        i = min(int(row / self.stride), h - 1)
        j = min(int(col / self.stride), w - 1)
        return int(self.image[i, j]), (self.y[i, j] + 0.5) * self.stride, (self.x[i, j] + 0.5) * self.stride


def image_knn(global_feature: np.ndarray, gallery: Gallery, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest gallery images by Euclidean distance of global features: (distances, indices), ascending."""
    f = np.asarray(global_feature, np.float32).ravel()
    g = gallery.global_features
    k = min(k, len(gallery))
    approx = gallery.global_sqnorm - 2.0 * (np.asarray(g, np.float32) @ f) + f @ f
    idx = np.argpartition(approx, k - 1)[:k] if k < len(approx) else np.arange(len(approx))
    exact = np.linalg.norm(np.asarray(g[idx], np.float64) - f, axis=1)  # re-computed: no cancellation
    order = np.argsort(exact, kind="stable")
    return exact[order], idx[order]


def _hwc(feature_chw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(feature_chw, np.float32).transpose(1, 2, 0))


def projected_levels(features: dict[str, np.ndarray], gallery: Gallery, names: Sequence[str]) -> list[np.ndarray]:
    """The test image's levels ``names`` ((C, h, w) arrays) channels-last and through the gallery's
    stored projection: the query of the pixel stage."""
    return [gallery.levels[n].codec.project(_hwc(features[n])) for n in names]


def pixel_scores(
    features: dict[str, np.ndarray],
    gallery: Gallery,
    neighbors: Sequence[int] | np.ndarray,
    info: ModelInfo,
    config: SpadeConfig,
    scorer: PixelScorer,
) -> tuple[np.ndarray, Correspondence]:
    """Pixel anomaly map at the model's input size (before smoothing), and the correspondences.

    ``features``: the test image's levels as (C, h, w) arrays. Test features go through the
    gallery's stored projection; the scorer reads the gallery through a view
    (``Gallery.level_view`` / ``Gallery.pyramid_view``, scoring/base.py), one image at a time.
    """
    names = config.level_names(info)
    stride = {lv.name: lv.stride for lv in info.levels}
    s = info.input_size
    finest = min(names, key=lambda n: stride[n])
    neighbors = np.asarray(neighbors)

    if config.mode == "concat":
        grid = features[finest].shape[1:]
        pyramids = gallery.pyramid_view(names, neighbors, grid)
        top = scorer.topk_pyramid(projected_levels(features, gallery, names), pyramids, grid, config.kappa)
        score = upsample_map(top.distances.mean(axis=1).reshape(grid), s, s)
        return score, _correspondence(top.indices[:, 0], pyramids, neighbors, grid, s / grid[1])

    score = np.zeros((s, s), np.float32)
    corr = None
    for n, q in zip(names, projected_levels(features, gallery, names)):
        h, w = q.shape[:2]
        view = gallery.level_view(n, neighbors)
        top = scorer.topk(q.reshape(h * w, -1), view, config.kappa)
        score += upsample_map(top.distances.mean(axis=1).reshape(h, w), s, s)
        if n == finest:
            corr = _correspondence(top.indices[:, 0], view, neighbors, (h, w), stride[n])
    assert corr is not None  # finest is one of names
    return score / len(names), corr


def _correspondence(idx, view, neighbors, query_grid, stride) -> Correspondence:
    """Turn indices into the view's concatenated blocks into (gallery image, y, x) per query cell."""
    starts = view.starts()
    k = np.searchsorted(starts, idx, side="right") - 1
    image = neighbors[k]
    ys, xs = np.empty(len(idx), np.int64), np.empty(len(idx), np.int64)
    for kk in np.unique(k):
        sel = k == kk
        ys[sel], xs[sel] = view.cells(int(kk), idx[sel] - starts[kk])
    return Correspondence(image.reshape(query_grid), ys.reshape(query_grid), xs.reshape(query_grid), float(stride))


def top_pixels(amap: np.ndarray, share: float = TOP_SHARE) -> float:
    """Mean of the highest ``share`` of the map's pixels (steadier than the single maximum)."""
    flat = amap.ravel()
    n = max(1, int(flat.size * share))
    return float(np.partition(flat, flat.size - n)[-n:].mean())


def final_score(kind: str, image_score: float, amap: np.ndarray, normal: dict | None) -> float:
    """The image score SPADE reports: the image stage's, the anomaly map's maximum or the mean of its
    top 1%, or image stage + top 1%, each divided by its median on held-out normal images (``normal``)."""
    if kind == "image":
        return image_score
    if kind == "max-pixel":
        return float(amap.max())
    if kind == "top-pixels":
        return top_pixels(amap)
    if not normal:
        raise ValueError(
            "score='combined' needs normal statistics: build the gallery with a held-out share (--holdout > 0)"
        )
    return combined_score(image_score, top_pixels(amap), normal)


def combined_score(image_score: float, pixel_score: float, normal: dict) -> float:
    """The 'combined' image score: the image stage's score and the map's (the mean of its top 1%) each
    divided by its median on normal images, ``normal`` = {"image": ..., "top_pixels": ...}, and summed."""
    return image_score / normal["image"] + pixel_score / normal["top_pixels"]


def smooth(score_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of the upsampled map (sigma = 4 in the paper)."""
    return gaussian_blur(score_map, sigma)
