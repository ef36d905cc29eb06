"""CPU scorer: distances by BLAS matrix products over bounded blocks, a running top-kappa, and
exact re-computation of the kept distances (the |q|^2 - 2 q.g + |g|^2 expansion loses digits
when neighbours are close, the re-computation does not)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..resample import interp_matrix
from .base import PixelScorer, TopK, concat_upsampled

# a coarse level's interpolated dot products cost about as much as a GEMM with this many channels
# (memory-bound passes over a grid x grid matrix); measured on WRN50x2 and Lite0 shapes
INTERP_CHANNELS = 48


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


    def topk_pyramid(self, query, images, grid, kappa):
        """Exact concatenated-pyramid distances at per-level cost (docs/speed.md):
        ||concat_l U_l q_l - concat_l U_l g_l||^2 = |Uq|^2 + |Ug|^2 - 2 sum_l U_l (q_l g_l^T) U_l^T,
        with U_l the bilinear upsampling of level l: the dot products of a coarse level are taken at
        its native resolution and interpolated, instead of multiplying upsampled features."""
        fine = [q.shape[:2] == tuple(grid) for q in query]
        p = grid[0] * grid[1]
        d_all = sum(q.shape[2] for q in query)
        c_fine = sum(q.shape[2] for q, f in zip(query, fine) if f)
        if c_fine + INTERP_CHANNELS * (len(query) - sum(fine)) >= 0.8 * d_all:
            return super().topk_pyramid(query, images, grid, kappa)  # narrow pyramids: the plain GEMM wins
        q_up = concat_upsampled(query, grid)
        q_fine = np.concatenate([q.reshape(p, -1) for q, f in zip(query, fine) if f], axis=1) if c_fine else None
        coarse = [(i, q.reshape(-1, q.shape[2]), interp_matrix(grid[0], q.shape[0]), interp_matrix(grid[1], q.shape[1]))
                  for i, (q, f) in enumerate(zip(query, fine)) if not f]
        best_d = np.full((p, kappa), np.inf, np.float32)
        best_i = np.full((p, kappa), -1, np.int64)
        offset = 0
        for g in images:
            g_up = concat_upsampled(g, grid)  # for |Ug|^2 and the exact distances of the candidates
            s = q_fine @ np.concatenate([g[i].reshape(p, -1) for i, f in enumerate(fine) if f], axis=1).T \
                if c_fine else np.zeros((p, p), np.float32)
            for i, ql, ah, aw in coarse:
                s += _interp2(ql @ g[i].reshape(-1, g[i].shape[2]).T, ah, aw, g[i].shape[:2])
            s *= -2.0
            s += np.einsum("ij,ij->i", g_up, g_up)[None, :]
            cand = _smallest(s, min(kappa, p))
            diff = q_up[:, None, :] - g_up[cand]
            exact = np.einsum("pkd,pkd->pk", diff, diff)
            best_d, best_i = _keep(best_d, best_i, exact, cand + offset)
            offset += p
        return TopK(best_d, best_i)


def _interp2(d: np.ndarray, ah: np.ndarray, aw: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """U d U^T for U = kron(ah, aw): a (h*w, h*w) dot-product matrix taken to the (H*W, H*W) grid."""
    h, w = hw
    big_h, big_w = ah.shape[0], aw.shape[0]
    n = h * w
    t = np.tensordot(ah, d.reshape(h, w, n), axes=(1, 0))  # (H, w, n)
    left = np.tensordot(aw, t, axes=(1, 1)).transpose(1, 0, 2).reshape(big_h * big_w, h, w)  # (P, h, w)
    t = np.tensordot(left, ah, axes=(1, 1))  # (P, w, H)
    return np.tensordot(t, aw, axes=(1, 1)).reshape(big_h * big_w, big_h * big_w)  # (P, H, W)


def _keep(best_d, best_i, new_d, new_i):
    """Merge candidate distances into the running top-kappa."""
    kappa = best_d.shape[1]
    all_d = np.concatenate([best_d, new_d], axis=1)
    all_i = np.concatenate([best_i, new_i], axis=1)
    order = np.argsort(all_d, axis=1, kind="stable")[:, :kappa]
    return np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)


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
    return _keep(best_d, best_i, np.einsum("pkd,pkd->pk", diff, diff), cand + offset)
