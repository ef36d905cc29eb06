"""CPU scorer: distances by BLAS matrix products over bounded blocks, a running top-kappa, and
exact re-computation of the kept distances (the |q|^2 - 2 q.g + |g|^2 expansion loses digits
when neighbours are close, the re-computation does not)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .base import PixelScorer, TopK


class NumpyScorer(PixelScorer):
    """Exact top-kappa on the CPU; holds at most ``block_bytes`` of distances at a time."""

    name = "numpy"

    def __init__(self, block_bytes: int = 32 << 20):
        self.block_bytes = int(block_bytes)

    def topk(self, query: np.ndarray, blocks: Iterable[np.ndarray], kappa: int) -> TopK:
        if kappa < 1:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        q = np.ascontiguousarray(query, np.float32)
        p = q.shape[0]
        best_d = np.full((p, kappa), np.inf, np.float32)
        best_i = np.full((p, kappa), -1, np.int64)
        rows_per_step = max(1, self.block_bytes // (4 * max(p, 1)))
        offset = 0
        for block in blocks:
            if block.ndim != 2 or block.shape[1] != q.shape[1]:
                raise ValueError(f"gallery block has shape {block.shape}, expected (M, {q.shape[1]})")
            for s in range(0, block.shape[0], rows_per_step):
                g = np.asarray(block[s : s + rows_per_step], np.float32)  # widen one step only
                best_d, best_i = _merge(q, g, offset + s, best_d, best_i)
            offset += block.shape[0]
        if offset < kappa:
            raise ValueError(f"gallery has {offset} features, fewer than kappa = {kappa}")
        return TopK(best_d, best_i)


def _smallest(d: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k smallest entries of each row (unordered); may overwrite ``d``."""
    if k == 1:
        return np.argmin(d, axis=1)[:, None]
    if k <= 8:  # a few argmin passes beat argpartition's full reshuffle
        rows = np.arange(d.shape[0])
        out = np.empty((d.shape[0], k), np.int64)
        for i in range(k):
            out[:, i] = np.argmin(d, axis=1)
            d[rows, out[:, i]] = np.inf
        return out
    return np.argpartition(d, k - 1, axis=1)[:, :k]


def _merge(q, g, offset, best_d, best_i):
    kappa = best_d.shape[1]
    # |g|^2 - 2 q.g orders each row like the squared distance (|q|^2 is constant along a row);
    # scaling the small block by -2 saves a pass over the large product
    d = q @ (g * np.float32(-2.0)).T
    d += np.einsum("ij,ij->i", g, g)[None, :]
    cand = _smallest(d, min(kappa, g.shape[0]))
    # exact distances of the candidates: (P, k, D) is small next to the (P, M) block
    diff = q[:, None, :] - g[cand]
    exact = np.einsum("pkd,pkd->pk", diff, diff)
    all_d = np.concatenate([best_d, exact], axis=1)
    all_i = np.concatenate([best_i, cand + offset], axis=1)
    order = np.argsort(all_d, axis=1, kind="stable")[:, :kappa]
    return np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)
