"""How a gallery stores a pyramid level: precision, channel projection, per-image coreset.

Everything here is numpy, so a device can encode new normal images itself (``gallery add``).
Fitted parameters (projection, int8 scales) are fitted once, at build time, and stored; images
added later are encoded with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")
PROJECTIONS = ("none", "pca", "random")
_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}
FIT_ROWS = 200_000  # pixel rows sampled to fit a projection or int8 scales

# The storage a gallery gets unless told otherwise, defined here only: `gallery build`'s option
# defaults, Storage() and gallery_from_images(storage=None) all read these. int8 with a coreset of a
# fifth of each image's pixels stores 18.7x fewer bytes per normal image than fp32 (27.5 vs 514.3 kB
# on Lite0) at the same accuracy on the ELPV benchmark: image AUROC +0.005, pixel AUROC -0.000, AUPRO
# -0.002 / -0.000 (`spade-edge bench gallery`, docs/results.md). A coreset serves the per-level mode
# only: in concat mode the default keeps every pixel (Storage.default).
DEFAULT_PRECISION = "int8"
DEFAULT_CORESET = 0.2


@dataclass(frozen=True)
class Storage:
    """Build-time storage settings (refused, not rewritten, when inconsistent). ``Storage()`` is the
    default (:data:`DEFAULT_PRECISION`, :data:`DEFAULT_CORESET`); :meth:`exact` stores features as
    extracted.

    ``precision``: fp32, fp16 or int8 (per-channel symmetric scale).
    ``projection``: none, pca or random (Gaussian, as PaDiM) to ``keep`` of each level's channels.
    ``coreset``: share of each image's pixels kept by greedy k-center (1.0: all; per-level mode only).
    """

    precision: str = DEFAULT_PRECISION
    projection: str = "none"
    keep: float = 1.0
    coreset: float = DEFAULT_CORESET
    seed: int = 0

    @classmethod
    def default(cls, mode: str = "per-level", **settings) -> Storage:
        """The default storage for scoring mode ``mode`` with some ``settings`` (fields) given: as
        ``Storage(**settings)``, except that in concat mode, which compares every pixel, a coreset
        that was not asked for keeps them all."""
        if mode == "concat" and "coreset" not in settings:
            settings["coreset"] = 1.0
        return cls(**settings)

    @classmethod
    def exact(cls, **settings) -> Storage:
        """Features as extracted: fp32, every channel, every pixel (``settings`` change fields). The
        benchmarks' reference, and how a gallery that records no storage settings was stored."""
        return cls(**{"precision": "fp32", "coreset": 1.0, **settings})

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if not 0 < self.keep <= 1 or not 0 < self.coreset <= 1:
            raise ValueError("keep and coreset are shares in (0, 1]")
        if self.projection == "none" and self.keep != 1.0:
            raise ValueError("keep < 1 needs a projection (pca or random)")

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def bytes_ratio(self) -> float:
        """Stored bytes per fp32 native-resolution byte (before index overhead)."""
        return np.dtype(_DTYPES[self.precision]).itemsize / 4 * self.keep * self.coreset


@dataclass
class LevelCodec:
    """Fitted parameters of one level: projection (x - center) @ proj, and int8 scales."""

    proj: np.ndarray | None = None  # (C, C')
    center: np.ndarray | None = None  # (C,)
    scale: np.ndarray | None = None  # (C',) int8 only

    def project(self, x: np.ndarray) -> np.ndarray:
        """Channels-last features (..., C) -> (..., C') float32."""
        x = np.asarray(x, np.float32)
        if self.proj is None:
            return x
        if self.center is not None:
            x = x - self.center
        return x @ self.proj

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored rows -> float32 (one image or a chunk at a time, never the whole gallery)."""
        out = np.asarray(stored, np.float32)
        return out * self.scale if self.scale is not None else out

    def encode(self, projected: np.ndarray, precision: str) -> np.ndarray:
        if precision == "int8":
            return np.clip(np.rint(projected / self.scale), -127, 127).astype(np.int8)
        return projected.astype(_DTYPES[precision])


def fit_codec(sample: np.ndarray, storage: Storage) -> LevelCodec:
    """Fit a level's codec on a (M, C) sample of normal pixel features."""
    rng = np.random.default_rng(storage.seed)
    sample = np.asarray(sample, np.float32)
    if len(sample) > FIT_ROWS:
        sample = sample[rng.choice(len(sample), FIT_ROWS, replace=False)]
    c = sample.shape[1]
    dims = max(1, int(round(c * storage.keep)))
    codec = LevelCodec()
    if storage.projection == "pca":
        codec.center = sample.mean(axis=0)
        cov = np.cov(sample - codec.center, rowvar=False).astype(np.float64)
        _, vecs = np.linalg.eigh(cov)
        codec.proj = np.ascontiguousarray(vecs[:, ::-1][:, :dims], np.float32)
    elif storage.projection == "random":
        # Gaussian projection scaled to preserve squared distances in expectation
        codec.proj = (rng.normal(size=(c, dims)) / np.sqrt(dims)).astype(np.float32)
    if storage.precision == "int8":
        peak = np.abs(codec.project(sample)).max(axis=0)
        codec.scale = (np.maximum(peak, 1e-12) / 127.0).astype(np.float32)
    return codec


def kcenter(x: np.ndarray, n: int) -> np.ndarray:
    """Greedy k-center (PatchCore's coreset): indices of ``n`` rows of ``x`` that cover it, in
    selection order; each pick is the row farthest from everything picked so far. Starts at the
    row farthest from the mean, so an image is always encoded the same way (add == rebuild)."""
    x = np.asarray(x, np.float32)
    n = min(n, len(x))
    picked = np.empty(n, np.int64)
    picked[0] = int(np.argmax(((x - x.mean(axis=0)) ** 2).sum(axis=1)))
    sq = np.einsum("ij,ij->i", x, x)
    dist = np.full(len(x), np.inf, np.float32)
    for i in range(1, n):
        p = x[picked[i - 1]]
        dist = np.minimum(dist, sq - 2 * (x @ p) + p @ p)
        picked[i] = int(np.argmax(dist))
    return picked
